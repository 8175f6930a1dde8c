"""BOFT: orthogonal fine-tuning with butterfly factorisation (Liu et al.; HF PEFT)."""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from peft_jax._src import checks
from peft_jax._src.base import Adapter, Array, Linear, PeftError
from peft_jax._src.linalg import cayley, check_blocks, num_skew
from peft_jax._src.registry import register


class BoftParams(NamedTuple):
  """BOFT's skew entries ``q: (m, k, b(b − 1)/2)`` and magnitude ``s: (d_out,)``.

  ``s`` is ``None`` with ``scale=False``.
  """

  q: Array
  s: Array | None = None


def butterfly_perm(d: int, block_size: int, i: int) -> np.ndarray:
  """The permutation ``p_i`` of factor ``i`` (HF PEFT's ``block_butterfly_perm``).

  Within each group of ``b · 2^i`` consecutive indices, cut into
  ``2^(i+1)`` chunks of ``b/2``, the even-numbered chunks come first, then
  the odd ones. ``p_0`` is the identity. The permutation matrix is
  ``P_i[j, p_i[j]] = 1``, i.e. ``(P_i v)[j] = v[p_i[j]]``.
  """
  half, chunks = block_size // 2, 2 ** (i + 1)
  order = np.r_[np.arange(0, chunks, 2), np.arange(1, chunks, 2)]
  return np.arange(d).reshape(-1, chunks, half)[:, order].reshape(d)


def butterfly_perms(d_in: int, block_size: int, factors: int) -> list:
  """``[None, (p_1, p_1⁻¹), ..., (p_{m−1}, p_{m−1}⁻¹)]`` for ``m = factors``.

  ``p_i = butterfly_perm(d_in, block_size, i)``; ``None`` stands for the
  identity ``p_0``.
  """
  perms = [None]
  for i in range(1, factors):
    p = butterfly_perm(d_in, block_size, i)
    perms.append((p, np.argsort(p)))
  return perms


def check_shape(w, block_size: int, factors: int) -> tuple[int, int]:
  """``(k, d_out)`` of ``w: (d_in, d_out)``, ``k = d_in / b`` blocks.

  Raises:
    PeftError: unless ``b`` and ``b · 2^(m−1)`` divide ``d_in``.
  """
  d_in, d_out = checks.matrix('boft', w)
  blocks = check_blocks('boft', block_size, d_in)
  span = block_size * 2 ** (factors - 1)
  if d_in % span:
    raise PeftError(
      f'boft: d_in={d_in} is not a multiple of block_size·2^(m−1)={span} '
      f'(block_size={block_size}, n_butterfly_factor={factors})'
    )
  return blocks, d_out


def rotate_rows(w: Array, r: Array, perm) -> Array:
  """``M @ w = P B Pᵀ @ w`` for ``w: (d_in, d_out)``.

  ``r: (k, b, b)`` are the blocks of ``B = blockdiag(r_1, ..., r_k)``
  (``k · b = d_in``); ``perm = (p, p⁻¹)`` gives ``P`` (``(Pᵀ v)[j] =
  v[p⁻¹[j]]``), ``None`` for ``P = I``. Returns ``(d_in, d_out)``.
  """
  if perm is not None:
    w = w[perm[1]]
  w = jnp.einsum('kij,kjo->kio', r, w.reshape(-1, r.shape[-1], w.shape[1]))
  w = w.reshape(-1, w.shape[-1])
  return w if perm is None else w[perm[0]]


def rotate_inputs(x: Array, r: Array, perm) -> Array:
  """``x @ P B Pᵀ`` for ``x: (..., d_in)``; ``r``, ``perm`` as in ``rotate_rows``."""
  if perm is not None:
    x = x[..., perm[1]]
  xb = x.reshape(*x.shape[:-1], -1, r.shape[-1])
  x = jnp.einsum('...ki,kij->...kj', xb, r).reshape(x.shape)
  return x if perm is None else x[..., perm[0]]


def butterfly(w: Array, r: Array, perms: list) -> Array:
  """``R @ w = M_{m−1} ⋯ M_0 @ w`` (``M_0`` first), ``w: (d_in, d_out)``.

  ``r: (m, k, b, b)`` are the factors' blocks, ``perms`` from
  ``butterfly_perms``. Returns ``(d_in, d_out)``.
  """
  for r_i, perm in zip(r, perms, strict=True):
    w = rotate_rows(w, r_i, perm)
  return w


def butterfly_transposed(w: Array, r: Array, perms: list) -> Array:
  """``Rᵀ @ w = M_0ᵀ ⋯ M_{m−1}ᵀ @ w`` for ``w: (d_in, d_out)``.

  ``M_iᵀ = P_i B_iᵀ P_iᵀ``; ``r`` and ``perms`` as in ``butterfly``.
  """
  r_t = jnp.swapaxes(r, -1, -2)
  for r_i, perm in reversed(list(zip(r_t, perms, strict=True))):
    w = rotate_rows(w, r_i, perm)
  return w


def butterfly_inputs(x: Array, r: Array, perms: list) -> Array:
  """``x R = x M_{m−1} ⋯ M_0`` (``M_{m−1}`` first) for ``x: (..., d_in)``."""
  for r_i, perm in reversed(list(zip(r, perms, strict=True))):
    x = rotate_inputs(x, r_i, perm)
  return x


@register('boft')
def boft(
  block_size: int = 4,
  n_butterfly_factor: int = 1,
  *,
  scale: bool = True,
  param_dtype: str = 'float32',
) -> Adapter:
  """Butterfly product of block-diagonal rotations: ``w' = (R @ w) · diag(s)``.

  Shapes (Flax layout): ``w: (d_in, d_out)``; ``m = n_butterfly_factor``
  factors ``R = M_{m−1} ⋯ M_1 M_0``, ``M_i = P_i B_i P_iᵀ``, where
  ``B_i = blockdiag(R_i1, ..., R_ik)`` has ``k = d_in / b`` Cayley blocks
  ``R_ij = (I + Q_ij)(I − Q_ij)⁻¹`` (``Q = S − Sᵀ`` from
  ``q: (m, k, b(b − 1)/2)``, as in ``oft``) and ``P_i`` is the butterfly
  permutation of ``butterfly_perm`` (``P_0 = I``): each factor doubles the
  number of nonzeros in a row of ``R``, and ``m = log2(k) + 1`` make it dense.
  ``s: (d_out,)`` is a learned per-neuron magnitude (HF's ``boft_s``;
  ``scale=False`` drops it). In the PyTorch layout
  ``W' = diag(s) W Rᵀ``; HF merges ``Wᵀ ← R Wᵀ`` then ``W ← W ⊙ s`` with
  ``R = P_{m−1}B_{m−1}P_{m−1}ᵀ ⋯ P_0 B_0 P_0ᵀ``, the same product. ``R`` is
  orthogonal.

  Differences from HF PEFT: each block stores only its ``b(b − 1)/2`` free
  entries (HF stores a full ``b × b`` tensor and uses its skew part
  ``½(A − Aᵀ)``, so half of its parameters are dead); the exact Cayley
  transform ``(I + Q)(I − Q)⁻¹`` (HF's solve gives ``(I − Q)(I + Q)⁻¹``,
  i.e. ``Q ↦ −Q``: the same set of rotations); HF's PyTorch fallback without
  its CUDA kernel silently forces ``n_butterfly_factor = 1``, here any valid
  ``m`` is honoured; only ``block_size`` is taken (not HF's alternative
  ``boft_block_num = d_in / b``); no block dropout.

  Init ``q = 0`` and ``s = 1``: ``R = I``, identity at init. Trainable count
  ``m · (d_in / b) · b(b − 1)/2 (+ d_out with scale)`` (``BoftParams``; no
  buffers: the permutations are fixed by the shape). Factored form
  ``y = ((x R) @ w) · s`` with ``x R = x M_{m−1} ⋯ M_0`` applied as index
  gathers and blockwise products, never forming ``R`` or ``w'``. Mergeable;
  ``unapply`` is ``w = Rᵀ (w' / s)``.

  Args:
    block_size: b; must divide ``d_in``, and be even with ``b · 2^(m−1)``
      dividing ``d_in`` when ``m > 1``. HF's default is 4.
    n_butterfly_factor: m, the number of butterfly factors (1 is block OFT).
    scale: learn the output magnitude ``s`` (HF always does).
    param_dtype: dtype of ``q`` and ``s``; ``w'`` keeps ``w``'s dtype.

  Returns:
    The BOFT ``Adapter``.
  """
  name = 'boft'
  block_size = checks.positive_int(name, 'block_size', block_size)
  factors = checks.positive_int(name, 'n_butterfly_factor', n_butterfly_factor)
  scale = checks.flag(name, 'scale', scale)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)
  if factors > 1 and block_size % 2:
    raise PeftError(
      f'{name}: block_size={block_size} must be even when n_butterfly_factor > 1'
    )

  def init(key, w):
    del key
    blocks, d_out = check_shape(w, block_size, factors)
    params = BoftParams(
      q=jnp.zeros((factors, blocks, num_skew(block_size)), dtype),
      s=jnp.ones(d_out, dtype) if scale else None,
    )
    return params, None

  def rotation(params, d_in):
    """The factors' blocks ``(m, k, b, b)`` and permutations."""
    return cayley(params.q, block_size), butterfly_perms(d_in, block_size, factors)

  def magnitude(params):
    return params.s if scale else 1.0

  def apply(w, params, buffers):
    del buffers
    rw = butterfly(w, *rotation(params, w.shape[0]))
    return (rw * magnitude(params)).astype(w.dtype)

  def unapply(w, params, buffers):
    del buffers
    u = butterfly_transposed(w / magnitude(params), *rotation(params, w.shape[0]))
    return u.astype(w.dtype)

  def factored(x, w, params, buffers):
    del buffers
    xr = butterfly_inputs(x, *rotation(params, w.shape[0]))
    return ((xr @ w) * magnitude(params)).astype(jnp.result_type(x, w))

  def num_params(shape):
    rotations = factors * (shape[0] // block_size) * num_skew(block_size)
    return rotations + (shape[1] if scale else 0)

  return Adapter(
    init=init,
    apply=apply,
    unapply=unapply,
    linear=Linear(factored),
    num_params=num_params,
  )
