"""LoRA at any rank ``r ≤ R`` inside a rank-``R`` structure: a rank mask.

N adapters trained as one program (``make_many_train_step``) share one
structure; adapters of different ranks share it when each is a rank-``R``
LoRA whose extra rank components are masked out (``rank_masked``, with
``with_rank`` or ``pad_rank`` to set the rank).
"""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from peft_jax._src import checks, paths, registry
from peft_jax._src.base import Adapter, AdapterParams, Array, Buffers, PeftError
from peft_jax._src.registry import register_wrapper
from peft_jax._src.tree import entries
from peft_jax.wrappers.stacked import leaf_method


class RankMask(NamedTuple):
  """``rank_masked``'s buffer: the adapter's rank ``r`` (int32, ``1 ≤ r ≤ R``;
  one per layer under ``stacked``)."""

  rank: Array


@register_wrapper('rank_masked')
def rank_masked(method: str | Adapter) -> Adapter:
  """``lora(rank=R, alpha=α)`` that acts as ``lora(rank=r, alpha=α)`` for the
  rank ``r ≤ R`` held in its buffer.

  Shapes as LoRA's: ``a: (d_in, R)``, ``b: (R, d_out)``; buffer
  ``RankMask(rank=r)``. With the column scale ``c: (R,)``,
  ``c_k = s(r)/s(R)`` for ``k < r`` and ``0`` for ``k ≥ r`` (``s(r) = α/r``,
  or ``α/√r`` with ``rslora``: HF PEFT's scale for a module whose
  ``rank_pattern`` rank is ``r`` and whose α is the config's):

    w' = w + s(R) · (a ⊙ c) @ b = w + s(r) · a[:, :r] @ b[:r]

  (factored: ``y = x @ w + s(R) · (x @ (a ⊙ c)) @ b``), so
  ``∂L/∂a[:, :r]`` and ``∂L/∂b[:r]`` are those of the rank-``r`` LoRA and
  ``∂L/∂a[:, r:] = ∂L/∂b[r:] = 0``. Rows that start at 0 stay exactly 0
  under Adam (zero moments, zero update) and weight decay (``λ · 0``), so
  training a padded adapter trains the rank-``r`` LoRA (``with_rank``
  zeroes them; ``pad_rank`` writes a rank-``r`` LoRA's factors in).

  ``init`` gives rank ``R`` (``c = 1``: exactly ``lora(rank=R)``). Trainable
  count (``num_params``, ``count``): ``R · (d_in + d_out)``, the θ the
  optimizer holds; at rank ``r`` only ``r · (d_in + d_out)`` of it moves.
  ``factors`` are ``(a ⊙ m, b ⊙ mᵀ)`` with the 0/1 mask ``m_k = [k < r]``.
  Other wrappers go outside it: ``stacked(rank_masked(...))`` (a rank per
  layer), ``mpc(rank_masked(...))`` (on the masked factors).

  Args:
    method: a ``lora`` spec string (``'lora(rank=8, alpha=16)'``) or the
      adapter ``lora(...)`` built by the registry; its rank is ``R``.
  """
  name = 'rank_masked'
  inner = leaf_method(name, method)
  kind, _, kwargs = registry.parse(inner.name) if inner.name else ('', (), {})
  if kind != 'lora':
    got = registry.brief(inner.name) or 'a hand-built adapter'
    raise PeftError(
      f'rank_masked wraps lora; got {got} (wrap the other way round: '
      'stacked(rank_masked(...)))'
    )
  max_rank, rslora = kwargs['rank'], kwargs['rslora']

  def column_scale(buffers, dtype):
    """``c: (R,)``: ``s(r)/s(R)`` on the first ``r`` components, else 0."""
    ratio = max_rank / buffers.rank.astype(jnp.float32)
    ratio = jnp.sqrt(ratio) if rslora else ratio
    return jnp.where(_kept(buffers.rank, max_rank), ratio, 0).astype(dtype)

  def masked(params, buffers):
    return params._replace(a=params.a * column_scale(buffers, params.a.dtype))

  def init(key, w):
    params, _ = inner.init(key, w)
    return params, RankMask(jnp.asarray(max_rank, jnp.int32))

  def factors(params, buffers):
    kept = _kept(buffers.rank, max_rank)
    return params.a * kept, params.b * kept[:, None]

  return inner._replace(
    init=init,
    apply=lambda w, params, buffers: inner.apply(w, masked(params, buffers), None),
    unapply=lambda w, params, buffers: inner.unapply(w, masked(params, buffers), None),
    linear=inner.linear._replace(
      factored=lambda x, w, params, buffers: inner.linear.factored(
        x, w, masked(params, buffers), None
      )
    ),
    factors=factors,
  )


def _kept(rank: Array, max_rank: int) -> Array:
  """``m_k = [k < r]`` for ``k < R``: booleans ``(..., R)`` for ranks ``(...)``."""
  return jnp.arange(max_rank) < jnp.asarray(rank)[..., None]


def _pad(x: Array, axis: int, size: int) -> Array:
  """``x`` with zeros appended along ``axis`` to length ``size``."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def with_rank(
  params: AdapterParams, buffers: Buffers, rank: int
) -> tuple[AdapterParams, Buffers]:
  """One adapter's ``(params, buffers)`` with every ``rank_masked`` leaf at
  rank ``rank``: ``a[..., r:]`` and ``b[..., r:, :]`` zeroed, ``RankMask.rank
  = r``; other leaves unchanged.

  Set it before ``TrainState.create`` (on ``adapter.init``'s output): Adam's
  moments of the zeroed rows must be zero for them to stay zero. The kept
  columns of ``a`` come from the rank-``R`` init (LoRA's default
  ``kaiming_uniform`` does not depend on the rank; ``'gaussian'``'s
  ``N(0, 1/R²)`` does).

  Raises:
    PeftError: for no ``rank_masked`` leaf, or a rank outside ``[1, R]``.
  """
  rank = checks.positive_int('with_rank', 'rank', rank)
  masked = _masked_entries(buffers, 'with_rank')
  params_of = entries(params)
  new_params, new_buffers = {}, {}
  for name, mask in masked.items():
    lora = params_of[name]
    max_rank = lora.a.shape[-1]
    if rank > max_rank:
      raise PeftError(f"with_rank: rank={rank} exceeds {name}'s R={max_rank}")
    kept = _kept(jnp.full(np.shape(mask.rank), rank), max_rank)
    new_params[name] = lora._replace(
      a=jnp.where(kept[..., None, :], lora.a, 0),
      b=jnp.where(kept[..., None], lora.b, 0),
    )
    new_buffers[name] = RankMask(jnp.full_like(mask.rank, rank))
  return paths.replace(params, new_params), paths.replace(buffers, new_buffers)


def pad_rank(
  params: AdapterParams,
  buffers: Buffers,
  like: tuple[AdapterParams, Buffers],
) -> tuple[AdapterParams, Buffers]:
  """A lower-rank adapter written into the structure of a padded one.

  ``(params, buffers)`` come from rules with ``lora(rank=r, ...)`` where
  ``like``'s have ``rank_masked(...)`` of rank ``R ≥ r`` (same α and
  ``rslora``), fresh or trained; ``r`` may differ per leaf. Each such leaf
  becomes ``a = [a_r, 0]: (d_in, R)``, ``b = [b_r; 0]: (R, d_out)``,
  ``RankMask(rank=r)``, which ``rank_masked`` applies exactly as the
  rank-``r`` LoRA; every other leaf is taken from ``(params, buffers)``.

  Args:
    params, buffers: the lower-rank adapter's.
    like: ``(params, buffers)`` of the padded adapter (``adapter.init``'s
      output, or ``jax.eval_shape`` of it): where to pad and to which ``R``.

  Raises:
    PeftError: for no ``rank_masked`` leaf in ``like``, a leaf missing from
      ``params``, or a rank above ``R``.
  """
  masked = _masked_entries(like[1], 'pad_rank')
  params_of, like_params = entries(params), entries(like[0])
  new_params, new_buffers = {}, {}
  for name, mask in masked.items():
    if name not in params_of:
      raise PeftError(f'pad_rank: params have no entry {name!r}; like has one')
    lora, max_rank = params_of[name], like_params[name].a.shape[-1]
    rank = lora.a.shape[-1]
    if rank > max_rank:
      raise PeftError(f"pad_rank: {name} has rank {rank} > like's R={max_rank}")
    new_params[name] = lora._replace(
      a=_pad(lora.a, lora.a.ndim - 1, max_rank),
      b=_pad(lora.b, lora.b.ndim - 2, max_rank),
    )
    new_buffers[name] = RankMask(jnp.full(np.shape(mask.rank), rank, jnp.int32))
  return paths.replace(params, new_params), paths.replace(buffers or {}, new_buffers)


def _masked_entries(buffers: Buffers, caller: str) -> dict[str, RankMask]:
  """``{name: RankMask}`` of the ``rank_masked`` leaves, or a one-line error."""
  masked = {n: b for n, b in entries(buffers).items() if isinstance(b, RankMask)}
  if not masked:
    raise PeftError(
      f'{caller}: the buffers hold no RankMask; expected an adapter with '
      "rank_masked leaves (rules such as ('.*', \"rank_masked('lora(rank=8)')\"))"
    )
  return masked
