"""OFT: orthogonal fine-tuning with block-diagonal Cayley rotations (Qiu et al.)."""

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src import checks
from peft_jax._src.base import Adapter, PeftError
from peft_jax._src.registry import register


def num_skew(block_size: int) -> int:
  """Free entries of a ``b × b`` skew-symmetric matrix: ``b(b − 1)/2``."""
  return block_size * (block_size - 1) // 2


def skew(q, block_size: int):
  """``Q = S − Sᵀ`` with ``S`` strictly upper triangular holding ``q`` row by row.

  Args:
    q: ``(..., b(b − 1)/2)``, the entries above the diagonal in
      ``np.triu_indices(b, 1)`` order (HF PEFT's layout).
    block_size: b.

  Returns:
    ``(..., b, b)`` skew-symmetric matrices.
  """
  rows, cols = np.triu_indices(block_size, 1)
  upper = jnp.zeros((*q.shape[:-1], block_size, block_size), q.dtype)
  upper = upper.at[..., rows, cols].set(q)
  return upper - jnp.swapaxes(upper, -1, -2)


def solve_unpivoted(a, b):
  """``a⁻¹ b`` by Gauss–Jordan elimination without pivoting, batched, pure jnp.

  Stable for ``a = I − Q`` with ``Q`` skew-symmetric: its symmetric part is
  ``I``, so every pivot is at least 1 in magnitude. Used instead of
  ``jnp.linalg.solve``: on jaxlib 0.10.2's CPU backend, one jitted program
  with a dozen independent batched LAPACK solves (one per adapted layer)
  never finished (measured, 2026-11-22); this loop has no custom calls.

  Args:
    a: ``(..., n, n)``.
    b: ``(..., n, m)``.

  Returns:
    ``(..., n, m)``.
  """

  def eliminate(i, ab):
    a, b = ab
    pivot = a[..., i, i][..., None]
    row_a, row_b = a[..., i, :] / pivot, b[..., i, :] / pivot
    column = a[..., :, i][..., None]
    a = (a - column * row_a[..., None, :]).at[..., i, :].set(row_a)
    b = (b - column * row_b[..., None, :]).at[..., i, :].set(row_b)
    return a, b

  return jax.lax.fori_loop(0, a.shape[-1], eliminate, (a, b))[1]


def cayley(q, block_size: int):
  """Orthogonal ``R = (I + Q)(I − Q)⁻¹`` for ``Q = skew(q)``, batched.

  ``I − Q`` is invertible for every real skew-symmetric ``Q`` and the two
  factors commute, so ``R = (I − Q)⁻¹(I + Q)`` is one linear solve. ``q = 0``
  gives ``R = I`` exactly.
  """
  q_mat = skew(q, block_size)
  eye = jnp.eye(block_size, dtype=q.dtype)
  return solve_unpivoted(eye - q_mat, jnp.broadcast_to(eye + q_mat, q_mat.shape))


def check_blocks(method: str, block_size: int, d_in: int) -> int:
  """``d_in // block_size``; raises if ``block_size`` does not divide ``d_in``."""
  if d_in % block_size:
    raise PeftError(
      f'{method}: block_size={block_size} does not divide d_in={d_in}; '
      'pick a divisor of the input dimension'
    )
  return d_in // block_size


@register('oft')
def oft(
  block_size: int = 32, *, block_share: bool = False, param_dtype: str = 'float32'
) -> Adapter:
  """Orthogonal rotation of every neuron's input weights: ``w' = R @ w``.

  Shapes (Flax layout): ``w: (d_in, d_out)``,
  ``R = blockdiag(R_1, ..., R_k): (d_in, d_in)`` with ``k = d_in / b`` blocks
  ``R_i = (I + Q_i)(I − Q_i)⁻¹`` (Cayley), ``Q_i = S_i − S_iᵀ`` built from
  ``q: (k, b(b − 1)/2)`` (one shared block, ``q: (1, b(b − 1)/2)``, with
  ``block_share``). In the PyTorch layout ``W' = W Rᵀ``, i.e. each neuron's
  weight vector (a row of ``W``) is rotated by ``R``: this is the paper's
  ``z = (R W0)ᵀ x`` (its ``W0: (d_in, n)`` is our ``w``) and what HF PEFT
  computes, both in its forward (``x ↦ x R`` blockwise, then the base layer)
  and in ``merge`` (``Wᵀ ← R Wᵀ``). ``R`` is orthogonal, so the
  angles between neurons (hyperspherical energy) are preserved.

  Differences from HF PEFT: we use the exact Cayley transform (HF's
  ``use_cayley_neumann=False`` branch, which computes ``(I − Q)(I + Q)⁻¹``,
  i.e. ours with ``Q ↦ −Q``; HF's default truncates the Neumann series of our
  ``(I + Q)(I − Q)⁻¹`` at 5 terms, so its ``R`` is only approximately
  orthogonal); a ``block_size`` that does not divide ``d_in`` is an error
  (HF silently adjusts it); COFT (``coft``/``eps``) and block dropout are not
  provided.

  Init ``q = 0`` (HF's ``init_weights=True``): ``R = I``, identity at init.
  Trainable count ``(d_in / b) · b(b − 1)/2 = d_in (b − 1)/2`` (``b(b − 1)/2``
  with ``block_share``). Factored form ``y = (x R) @ w`` with ``x R`` computed
  blockwise (``x`` as ``(..., k, b)``), never forming ``w'``. Mergeable;
  ``unapply`` is ``w = Rᵀ w'``.

  Args:
    block_size: b, the size of each orthogonal block; must divide ``d_in``.
      HF's default is 32.
    block_share: one block ``R_1`` shared by all ``k`` positions.
    param_dtype: dtype of ``q``; ``w'`` keeps ``w``'s dtype.

  Returns:
    The OFT ``Adapter``.
  """
  name = 'oft'
  block_size = checks.positive_int(name, 'block_size', block_size)
  block_share = checks.flag(name, 'block_share', block_share)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    del key
    blocks = check_blocks(name, block_size, checks.matrix(name, w)[0])
    return {'q': jnp.zeros((1 if block_share else blocks, num_skew(block_size)), dtype)}

  def rotations(theta, d_in):
    r = cayley(theta['q'], block_size)
    return jnp.broadcast_to(r, (d_in // block_size, block_size, block_size))

  def left_multiply(r, w):
    """``blockdiag(r) @ w`` for ``w: (d_in, d_out)``."""
    d_in, d_out = w.shape
    rw = jnp.einsum('kij,kjo->kio', r, w.reshape(-1, block_size, d_out))
    return rw.reshape(d_in, d_out)

  def apply(w, theta):
    return left_multiply(rotations(theta, w.shape[0]), w).astype(w.dtype)

  def unapply(w, theta):
    r_t = jnp.swapaxes(rotations(theta, w.shape[0]), -1, -2)
    return left_multiply(r_t, w).astype(w.dtype)

  def factored(x, w, theta):
    r = rotations(theta, w.shape[0])
    xb = x.reshape(*x.shape[:-1], -1, block_size)
    xr = jnp.einsum('...ki,kij->...kj', xb, r).reshape(x.shape)
    return (xr @ w).astype(jnp.result_type(x, w))

  def num_params(shape):
    return (1 if block_share else shape[0] // block_size) * num_skew(block_size)

  return Adapter(
    init=init,
    apply=apply,
    factored=factored,
    unapply=unapply,
    num_params=num_params,
  )
