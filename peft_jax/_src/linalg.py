"""Linear algebra the methods share: thin SVD, Cayley rotations, safe norms."""

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src.base import Array, PeftError


def thin_svd(w: Array) -> tuple[Array, Array, Array]:
  """The float32 thin SVD of a kernel, in the spec's names: ``(u, sigma, v)``.

  The kernel ``w: (d_in, d_out)`` is ``Wᵀ`` with ``W = U diag(σ) Vᵀ``, so
  ``w = v · diag(sigma) · uᵀ`` with ``u = U: (d_out, k)`` (output side),
  ``v = V: (d_in, k)`` (input side) and ``sigma: (k,)`` in descending order,
  ``k = min(d_in, d_out)``. Computed in float32 whatever ``w``'s dtype.
  """
  left, sigma, right = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
  return right.T, sigma, left


def reconstruct(v: Array, sigma: Array, u: Array) -> Array:
  """``v · diag(sigma) · uᵀ: (d_in, d_out)``, a kernel from SVD triplets."""
  return (v * sigma) @ u.T


def frobenius(x: Array) -> Array:
  """``‖x‖_F`` over the last two axes, with gradient 0 (not NaN) at ``x = 0``
  (like ``torch.norm``). ``x: (..., m, n)`` -> ``(...)``."""
  squared = jnp.sum(jnp.square(x), axis=(-2, -1))
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def column_norms(w: Array) -> Array:
  """The L2 norm of each column of ``w: (d_in, d_out)``, in float32: ``(d_out,)``.

  A column of the Flax kernel is a row of the spec's ``W``: one norm per
  output unit.
  """
  return jnp.linalg.norm(w.astype(jnp.float32), axis=0)


def num_skew(block_size: int) -> int:
  """Free entries of a ``b × b`` skew-symmetric matrix: ``b(b − 1)/2``."""
  return block_size * (block_size - 1) // 2


def skew(q: Array, block_size: int) -> Array:
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


def solve_unpivoted(a: Array, b: Array) -> Array:
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


def cayley(q: Array, block_size: int) -> Array:
  """Orthogonal ``R = (I + Q)(I − Q)⁻¹`` for ``Q = skew(q)``, batched.

  ``I − Q`` is invertible for every real skew-symmetric ``Q`` and the two
  factors commute, so ``R = (I − Q)⁻¹(I + Q)`` is one linear solve. ``q = 0``
  gives ``R = I`` exactly. ``q: (..., b(b − 1)/2)`` -> ``(..., b, b)``.
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
