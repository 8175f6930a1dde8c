"""FlexLoRA (Liu, Si, Jia, 2026): the AdaLoRA layer with a per-leaf rank that moves."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from peft_jax._src import checks
from peft_jax._src.base import Adapter, Array, PeftError
from peft_jax._src.linalg import frobenius
from peft_jax._src.low_rank import adalora_scale, low_rank_adapter
from peft_jax._src.patterns import FORMS
from peft_jax._src.registry import register


class FlexLoraParams(NamedTuple):
  """FlexLoRA's triplet slots: ``a: (d_in, R)``, ``b: (R, d_out)``, ``e: (R,)``.

  ``flexlora_schedule`` governs every leaf whose parameters have this type.
  """

  a: Array
  b: Array
  e: Array


class FlexLoraBuffers(NamedTuple):
  """``active: (R,)`` bool, the slots in use (``flexlora_schedule`` moves them)."""

  active: Array


def active_factors(params: FlexLoraParams, buffers: FlexLoraBuffers):
  """``(a ⊙ m, m ⊙ b)``: the factors with the inactive slots zeroed.

  ``a: (..., d_in, R)``, ``b: (..., R, d_out)``, ``m = active: (..., R)``;
  leading axes are stacked layers.
  """
  active = buffers.active
  down = jnp.where(active[..., None, :], params.a, jnp.zeros_like(params.a))
  up = jnp.where(active[..., :, None], params.b, jnp.zeros_like(params.b))
  return down, up


def active_penalty(down: Array, up: Array, active: Array, form: str) -> Array:
  """MPC_o on the active slots only: ``R_o(down[:, I], up[I])``, one per matrix.

  ``I`` = the slots where ``active`` is true. With ``D = down ⊙ m`` and
  ``U = m ⊙ up`` the residuals are ``DᵀD − diag(m)`` and ``U Uᵀ − diag(m)``,
  whose inactive rows and columns are zero: they equal the residuals of the
  active sub-matrices against ``I_r``, and inactive slots get no gradient.
  ``form='squared'`` sums their squared Frobenius norms (the paper),
  ``'mean'`` averages their Frobenius norms (AdaLoRA's code).

  Args:
    down: ``(..., d_in, R)``.
    up: ``(..., R, d_out)``.
    active: ``(..., R)`` bool.
    form: ``'squared'`` or ``'mean'``.

  Returns:
    ``(...)``, float32: one penalty per matrix.
  """
  mask = active.astype(jnp.float32)
  down = down.astype(jnp.float32) * mask[..., None, :]
  up = up.astype(jnp.float32) * mask[..., :, None]
  gram = lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)
  target = mask[..., None, :] * jnp.eye(mask.shape[-1], dtype=jnp.float32)
  residuals = (
    gram(jnp.swapaxes(down, -1, -2), down) - target,
    gram(up, jnp.swapaxes(up, -1, -2)) - target,
  )
  if form == 'squared':
    return sum(jnp.sum(jnp.square(r), axis=(-2, -1)) for r in residuals)
  return sum(frobenius(r) for r in residuals) / len(residuals)


@register('flexlora')
def flexlora(
  rank: int = 8,
  alpha: float = 16.0,
  *,
  max_rank: int | None = None,
  init_std: float = 0.02,
  reg_orth_coef: float = 0.1,
  reg_form: str = 'mean',
  param_dtype: str = 'float32',
) -> Adapter:
  """AdaLoRA's layer over ``R`` slots, of which ``r`` are active.

  ``w' = w + s · (a ⊙ (e ⊙ m)) @ b``. Shapes (Flax layout):
  ``w: (d_in, d_out)``, params ``FlexLoraParams(a: (d_in, R), b: (R, d_out),
  e: (R,))``, buffers ``FlexLoraBuffers(active: (R,))``, the bool mask
  ``m`` (the first ``r₀`` slots at init); ``s = α/(r₀ + 1e-5)`` with
  ``r₀ = rank`` the *initial* rank, kept when ``flexlora_schedule`` prunes
  and grows slots (spec §3.1 and its scaling cheat-sheet; ``α ≤ 0`` is
  replaced by ``r₀`` as in the code). Spec (PyTorch layout):
  ``h = W x + b + s·B diag(e) A x`` over the ``r`` active triplets,
  ``A = aᵀ``, ``B = bᵀ``. The reference resizes its parameters; here shapes
  are static, so ``R = max_rank`` slots are allocated (default
  ``min(2·r₀, d_in, d_out)``) and ``m`` masks the inactive ones.

  Init: ``a, b ~ N(0, σ²)`` (``σ = init_std``) in every slot, ``e = 0``:
  identity at init. Trainable count ``R · (d_in + d_out + 1)``: every
  allocated slot is counted, inactive ones are trainable-but-masked (their
  gradients are zero; the schedule re-initialises a slot when it grows).
  Mergeable and invertible. Factored form
  ``y = x @ w + s · ((x @ a) ⊙ (e ⊙ m)) @ b``. ``factors`` gives
  ``(a ⊙ m, m ⊙ b)`` (inactive slots zeroed).

  Regulariser: ``reg_orth_coef · R_o`` over the active slots
  (``active_penalty``, one term per matrix; AdaLoRA's ``reg_form='mean'``
  with the tree's default ``by_rules(..., regularizer='mean')`` is the
  code's ``γ/(2L) Σ ‖·‖_F``, the paper's ``'squared'`` with
  ``regularizer='sum'`` its Eq. 25, as for ``adalora``); 0 disables it.

  Args:
    rank: r₀, the initial active rank, ``0 < r₀ <= R``.
    alpha: α of the scale.
    max_rank: R, the allocated slots, ``r₀ <= R <= min(d_in, d_out)``;
      ``None`` for ``min(2·r₀, d_in, d_out)``.
    init_std: σ > 0 of the normal init of ``a`` and ``b``.
    reg_orth_coef: γ ≥ 0 of the orthogonality penalty.
    reg_form: ``'mean'`` (AdaLoRA's code) or ``'squared'`` (the paper).
    param_dtype: dtype of ``a``, ``b`` and ``e``; ``w'`` keeps ``w``'s dtype.

  Returns:
    The FlexLoRA ``Adapter``; train it with ``flexlora_schedule``.
  """
  name = 'flexlora'
  scale = adalora_scale(name, rank, alpha)
  if max_rank is not None and checks.positive_int(name, 'max_rank', max_rank) < rank:
    raise PeftError(f'{name}: max_rank={max_rank} must be >= rank={rank}')
  std = checks.positive(name, 'init_std', init_std)
  coef = checks.real(name, 'reg_orth_coef', reg_orth_coef)
  if coef < 0:
    raise PeftError(f'{name}: reg_orth_coef={coef} must be >= 0')
  checks.choice(name, 'reg_form', reg_form, FORMS)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def slots(shape) -> int:
    return min(2 * rank, *shape) if max_rank is None else max_rank

  def init(key, w):
    d_in, d_out = checks.rank_fits(name, rank, w)
    n_slots = slots((d_in, d_out))
    if n_slots > min(d_in, d_out):
      raise PeftError(
        f'{name}: max_rank={n_slots} exceeds min(d_in, d_out)={min(d_in, d_out)} '
        f'of the kernel of shape {(d_in, d_out)}'
      )
    key_a, key_b = jax.random.split(key)
    params = FlexLoraParams(
      a=std * jax.random.normal(key_a, (d_in, n_slots), dtype),
      b=std * jax.random.normal(key_b, (n_slots, d_out), dtype),
      e=jnp.zeros(n_slots, dtype),
    )
    return params, FlexLoraBuffers(active=jnp.arange(n_slots) < rank)

  def mix(params, buffers, h):
    return h * jnp.where(buffers.active, params.e, jnp.zeros_like(params.e))

  def regularizer(w, params, buffers):
    del w
    return coef * active_penalty(params.a, params.b, buffers.active, reg_form)

  layer = low_rank_adapter(
    init,
    scale,
    num_params=lambda shape: slots(shape) * (shape[0] + shape[1] + 1),
    mix=mix,
  )
  return layer._replace(
    regularizer=regularizer if coef > 0 else None, factors=active_factors
  )
