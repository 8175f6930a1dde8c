"""LoKr / KronA: Kronecker-product update (Edalati et al.; HF PEFT LoKr)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from peft_jax._src import checks, initializers
from peft_jax._src.additive import additive
from peft_jax._src.base import Adapter, Array, PeftError
from peft_jax._src.registry import register


class LokrParams(NamedTuple):
  """LoKr's Kronecker factors, each full or as a rank-r product.

  ``c: (a1, a2)``, or ``c1: (a1, r)`` and ``c2: (r, a2)`` with
  ``decompose_both``; ``d: (b1, b2)``, or ``d1: (b1, r)`` and ``d2: (r, b2)``
  with a rank (unless ``full_d``). The fields a configuration does not use are ``None``.
  """

  c: Array | None = None
  c1: Array | None = None
  c2: Array | None = None
  d: Array | None = None
  d1: Array | None = None
  d2: Array | None = None


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
  """``(m, n)`` with ``m · n = dimension``, as HF PEFT's ``lokr.factorization``.

  If ``factor > 0`` divides ``dimension`` the answer is
  ``(factor, dimension // factor)`` (unsorted). Otherwise ``m`` walks up the
  divisors of ``dimension`` while ``m < n`` and ``m <= factor`` (no bound for
  ``factor = -1``: the divisor pair nearest ``√dimension``), and the pair is
  returned sorted: ``256 -> (16, 16)``, ``128 -> (8, 16)``,
  ``127 -> (1, 127)``, ``(128, factor=3) -> (2, 64)``.
  """
  if factor > 0 and dimension % factor == 0:
    return factor, dimension // factor
  bound = dimension if factor == -1 else factor
  m, n = 1, dimension
  while m < n:
    new_m = m + 1
    while dimension % new_m:
      new_m += 1
    if new_m > bound:
      break
    m, n = new_m, dimension // new_m
  return min(m, n), max(m, n)


def _factor_arg(method: str, factor) -> int:
  if isinstance(factor, bool) or not isinstance(factor, int):
    raise PeftError(f'{method}: factor={factor!r} must be an int')
  if factor != -1 and factor <= 0:
    raise PeftError(f'{method}: factor={factor} must be -1 (near √dim) or > 0')
  return factor


def kron_shapes(shape, factor: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """``((a1, a2), (b1, b2))``, the shapes of ``c`` and ``d`` for ``w: shape``.

  ``(a1, b1) = factorization(d_in, factor)`` and ``(a2, b2) =
  factorization(d_out, factor)`` for ``shape = (d_in, d_out)``.
  """
  (a1, b1), (a2, b2) = (factorization(dim, factor) for dim in shape)
  return (a1, a2), (b1, b2)


def _low_rank_fits(which: str, shape: tuple[int, int], rank: int) -> None:
  if rank > min(shape):
    raise PeftError(
      f'lokr: rank={rank} exceeds min{shape}={min(shape)} of the '
      f'Kronecker factor {which}; lower the rank or change factor'
    )


def init_factors(
  key,
  c_shape,
  d_shape,
  rank: int | None,
  decompose_both: bool,
  dtype,
  full_d: bool = False,
) -> LokrParams:
  """HF PEFT's init of ``c: (a1, a2)`` and ``d: (b1, b2)`` (or their factors).

  ``c = 0`` (with ``decompose_both``, ``c1: (a1, r)`` Kaiming-uniform and
  ``c2: (r, a2)`` zero); ``d`` Kaiming-uniform (with a rank and not
  ``full_d``, ``d1: (b1, r)`` and ``d2: (r, b2)``). Keys: ``split(key, 3)``
  for ``c1``, ``d``/``d1``, ``d2``.

  Raises:
    PeftError: if the rank exceeds a factor it decomposes.
  """
  uniform = initializers.kaiming_uniform
  k_c, k_d1, k_d2 = jax.random.split(key, 3)
  if decompose_both:
    _low_rank_fits('c', c_shape, rank)
    c = {
      'c1': uniform(k_c, (c_shape[0], rank), dtype, rank),
      'c2': jnp.zeros((rank, c_shape[1]), dtype),
    }
  else:
    c = {'c': jnp.zeros(c_shape, dtype)}
  if rank is None or full_d:
    d = {'d': uniform(k_d1, d_shape, dtype, None)}
  else:
    _low_rank_fits('d', d_shape, rank)
    d = {
      'd1': uniform(k_d1, (d_shape[0], rank), dtype, rank),
      'd2': uniform(k_d2, (rank, d_shape[1]), dtype, rank),
    }
  return LokrParams(**c, **d)


def kron_factors(params: LokrParams) -> tuple[Array, Array]:
  """``(c, d)``: ``c = c1 @ c2`` when ``c`` is ``None``, ``d = d1 @ d2`` likewise."""
  c = params.c1 @ params.c2 if params.c is None else params.c
  d = params.d1 @ params.d2 if params.d is None else params.d
  return c, d


def kron_matmul(x: Array, c: Array, d: Array) -> Array:
  """``x @ (c ⊗ d)`` for ``x: (..., a1·b1)``, never forming ``c ⊗ d``.

  ``x`` as ``(..., a1, b1)``, ``einsum('...ik,ij,kl->...jl', x, c, d)`` with
  ``c: (a1, a2)``, ``d: (b1, b2)``, reshaped to ``(..., a2·b2)``.
  """
  xr = x.reshape(*x.shape[:-1], c.shape[0], d.shape[0])
  y = jnp.einsum('...ik,ij,kl->...jl', xr, c, d)
  return y.reshape(*x.shape[:-1], c.shape[1] * d.shape[1])


@register('lokr')
def lokr(
  factor: int = -1,
  rank: int | None = None,
  alpha: float | None = None,
  decompose_both: bool = False,
  full_d: bool = False,
  *,
  param_dtype: str = 'float32',
) -> Adapter:
  """Kronecker-product update: ``w' = w + s · (c ⊗ d)``.

  Shapes (Flax layout): ``w: (d_in, d_out)``, ``c: (a1, a2)``,
  ``d: (b1, b2)`` with ``(a1, b1) = factorization(d_in, factor)`` and
  ``(a2, b2) = factorization(d_out, factor)`` (HF PEFT's rule, so
  ``a1 · b1 = d_in``, ``a2 · b2 = d_out``; ``c`` is the smaller factor
  unless a dividing ``factor`` is given).
  ``(c ⊗ d)[i1·b1 + i2, j1·b2 + j2] = c[i1, j1] · d[i2, j2]``. In HF's
  PyTorch layout ``ΔW = s · kron(lokr_w1, lokr_w2)`` with
  ``lokr_w1 = cᵀ: (a2, a1)`` and ``lokr_w2 = dᵀ: (b2, b1)``; the survey's
  KronA is the same update (``y = x W + s · x (A ⊗ B)``).

  With ``rank`` given, ``d = d1 @ d2`` (``d1: (b1, r)``, ``d2: (r, b2)``), and
  with ``decompose_both`` also ``c = c1 @ c2`` (``c1: (a1, r)``,
  ``c2: (r, a2)``). ``full_d`` keeps ``d: (b1, b2)`` full although a rank is
  given (``decompose_both`` may still factor ``c``), so ``ΔW = (α/r)·(c ⊗
  d)`` with ``c`` full or ``c1 @ c2``. The scale is ``s = α/r`` with a rank
  (``α`` defaults to ``r``), else ``s = α`` (default 1). HF PEFT instead
  always divides by its ``r`` and decides itself which factor is low-rank
  (``d`` iff ``r < max(b1, b2)/2``, ``c`` iff ``decompose_both`` and
  ``r < max(a1, a2)/2``); here the choice is explicit, and ``rank`` with
  ``full_d`` expresses PEFT's full ``lokr_w2`` (beside a full or, with
  ``decompose_both``, factored ``lokr_w1``). ``rank(c ⊗ d) =
  rank(c) · rank(d)``.

  Init as HF PEFT: ``c`` (or ``c2``, HF's ``lokr_w1_a``) zero, so the update
  starts at 0 (identity at init); ``d``, ``d1``, ``d2`` and ``c1``
  Kaiming-uniform ``U(±1/√fan_in)`` (fan-in ``b1``, ``b1``, ``r``, ``a1``).

  Factored form (no ``(d_in, d_out)`` matrix): reshape ``x`` to
  ``(..., a1, b1)``, then ``y = x @ w + s · einsum('...ik,ij,kl->...jl', x, c,
  d)`` reshaped to ``(..., d_out)``. Trainable count
  ``a1·a2 + b1·b2`` (``c`` as ``r(a1 + a2)`` with ``decompose_both``, ``d``
  as ``r(b1 + b2)`` with a rank and not ``full_d``; ``LokrParams``, no
  buffers). Mergeable; ``unapply`` subtracts.

  Args:
    factor: the factorization divider (HF's ``decompose_factor``): ``-1`` for
      factors near ``√dim``, else ``a1``/``a2`` as close to ``factor`` as the
      divisors allow.
    rank: r of the low-rank ``d`` (and ``c``); ``None`` for full factors.
    alpha: α > 0 of the scale.
    decompose_both: also factor ``c`` at rank r (needs ``rank``).
    full_d: keep ``d`` full with a rank (needs ``rank``); ``s`` stays α/r.
    param_dtype: dtype of the factors; ``w'`` keeps ``w``'s dtype.

  Returns:
    The LoKr ``Adapter``.
  """
  name = 'lokr'
  factor = _factor_arg(name, factor)
  decompose_both = checks.flag(name, 'decompose_both', decompose_both)
  full_d = checks.flag(name, 'full_d', full_d)
  if rank is not None:
    rank = checks.positive_int(name, 'rank', rank)
  if rank is None and (decompose_both or full_d):
    option = 'decompose_both' if decompose_both else 'full_d'
    raise PeftError(f'{name}: {option}=True needs a rank; got rank=None')
  if alpha is None:  # α = r with a rank, else 1: s = 1 either way.
    alpha = float(rank or 1)
  scale = checks.positive(name, 'alpha', alpha) / (rank or 1)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    c_shape, d_shape = kron_shapes(checks.matrix(name, w), factor)
    params = init_factors(key, c_shape, d_shape, rank, decompose_both, dtype, full_d)
    return params, None

  def delta(w, params, buffers):
    del w, buffers
    return scale * jnp.kron(*kron_factors(params))

  def delta_product(x, w, params, buffers):
    del w, buffers
    return scale * kron_matmul(x, *kron_factors(params))

  def num_params(shape):
    (a1, a2), (b1, b2) = kron_shapes(shape, factor)
    c_count = rank * (a1 + a2) if decompose_both else a1 * a2
    return c_count + (b1 * b2 if rank is None or full_d else rank * (b1 + b2))

  return additive(init, delta, delta_product=delta_product, num_params=num_params)
