"""Subspace analysis of a weight update: spectra, similarity, projection shares.

The numbers *See Further When Clear* (Si, Yang, Shen, arXiv 2407.05417) and
LoRA (Hu et al., arXiv 2106.09685, §7) reason with, for a frozen matrix ``W``
and an update ``ΔW = W' − W`` (e.g. ``pj.merge(...)[leaf] − frozen[leaf]``):

* ``spectrum``, ``numerical_rank``: the singular values of ``ΔW`` and how
  many of them are above float32 round-off; ``update_rank``: the rank of a
  merged model's ``W' − W`` that rounding ``W'`` cannot explain (the results
  rows' ``update_rank``).
* ``subspace_similarity``, ``similarity_curve``: Hu et al.'s normalised
  subspace similarity ``φ`` between ``W``'s top-k singular directions and
  ``ΔW``'s top-r ones; ``expected_random_similarity`` is its value for a
  uniformly random r-dimensional subspace.
* ``amplification``, ``projected_norm``: Hu et al.'s ``‖U_rᵀ W V_r‖_F`` and
  amplification factor ``‖ΔW‖_F / ‖U_rᵀ W V_r‖_F`` (§7.3, Table 7).
* ``split``, ``projection_shares``: the projection view of the paper's
  reconstruction/extension decomposition: the part of ``ΔW`` inside the span
  of ``W``'s top-k singular directions and the rest, with
  ``expected_random_shares`` for a random matrix.

The functions take matrices ``(m, n)`` (rows × columns); wherever they take
``W`` or ``ΔW``, its ``svd(...)`` may stand in for it (to decompose each
matrix once). They work in float32 with ``jax.numpy``. *Left* singular
vectors span the column space (``R^m``), *right* ones the row space
(``R^n``). A Flax kernel ``w: (d_in, d_out)`` is the paper's row-convention
``W_p`` (``y = x W_p``), so on a kernel *left* is the input side and
*right* the output side, as in the paper's names SSL/SSB; on the PyTorch
layout ``W = wᵀ`` they swap.
Thin SVD: ``W = U diag(σ) Vᵀ``, ``U: (m, p)``, ``V: (n, p)``,
``p = min(m, n)``, ``σ`` descending; ``U_k``, ``V_k`` are the first k
columns.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src.base import Array, PeftError

SIDES = ('left', 'right', 'both')
EPS = float(np.finfo(np.float32).eps)  # 2⁻²³ ≈ 1.19e-7


class Svd(NamedTuple):
  """A thin SVD ``W = U diag(σ) Vᵀ`` (``svd``); it unpacks as ``u, sigma, v``."""

  u: Array  # U: (m, p), orthonormal columns
  sigma: Array  # σ: (p,), descending
  v: Array  # V: (n, p), orthonormal columns (V, not Vᵀ)

  @property
  def shape(self) -> tuple[int, int]:
    """``(m, n)`` of the decomposed matrix."""
    return self.u.shape[0], self.v.shape[0]


Matrix = Array | Svd  # a matrix (m, n), or its Svd


def _matrix(x: Array, name: str) -> Array:
  x = jnp.asarray(x, jnp.float32)
  if x.ndim != 2:
    raise PeftError(f'{name} must be a matrix (m, n); got shape {x.shape}')
  return x


def _decomposed(x: Matrix, name: str) -> Svd:
  return x if isinstance(x, Svd) else svd(_matrix(x, name))


def _dense(x: Matrix, name: str) -> Array:
  """The matrix itself (an ``Svd`` multiplied out: ``U diag(σ) Vᵀ``)."""
  return (x.u * x.sigma) @ x.v.T if isinstance(x, Svd) else _matrix(x, name)


def _shape(x: Matrix, name: str) -> tuple[int, int]:
  return x.shape if isinstance(x, Svd) else _matrix(x, name).shape


def _same_shape(w: Matrix, delta: Matrix) -> None:
  if _shape(w, 'w') != _shape(delta, 'delta'):
    raise PeftError(
      f'w has shape {_shape(w, "w")} and delta {_shape(delta, "delta")}; '
      'expected the same shape'
    )


def _side(side: str) -> str:
  if side not in SIDES:
    raise PeftError(f'side={side!r} is not one of {SIDES}')
  return side


def _rank_arg(r: int, p: int, name: str = 'r') -> int:
  if not (isinstance(r, int | np.integer) and 1 <= r <= p):
    raise PeftError(f'{name}={r!r} must be an int in [1, min(m, n)={p}]')
  return int(r)


def svd(w: Array) -> Svd:
  """The float32 thin SVD ``W = U diag(σ) Vᵀ``.

  Args:
    w: ``W: (m, n)``.

  Returns:
    ``Svd(U: (m, p), σ: (p,), V: (n, p))``, ``p = min(m, n)``, σ descending.
    Note ``V``, not ``Vᵀ`` (``jnp.linalg.svd`` returns ``Vᵀ``). Pass it to
    the other functions in place of ``w`` to reuse it.
  """
  u, sigma, vt = jnp.linalg.svd(_matrix(w, 'w'), full_matrices=False)
  return Svd(u, sigma, vt.T)


def top_singular(w: Matrix, r: int) -> tuple[Array, Array, Array]:
  """The top-r singular triplets ``(U_r: (m, r), σ_r: (r,), V_r: (n, r))``
  of ``W: (m, n)``."""
  u, sigma, v = _decomposed(w, 'w')
  r = _rank_arg(r, sigma.shape[0])
  return u[:, :r], sigma[:r], v[:, :r]


def spectrum(delta: Matrix, normalize: bool = False) -> Array:
  """Singular values of ``ΔW: (m, n)``, descending: ``σ: (p,)``,
  ``p = min(m, n)``; with ``normalize``, ``σ / σ_1`` (all 0 for ``ΔW = 0``)."""
  if isinstance(delta, Svd):
    sigma = delta.sigma
  else:
    sigma = jnp.linalg.svd(_matrix(delta, 'delta'), compute_uv=False)
  if not normalize:
    return sigma
  return jnp.where(sigma[0] > 0, sigma / jnp.where(sigma[0] > 0, sigma[0], 1.0), 0.0)


def rank_tolerance(delta: Matrix, rtol: float | None = None) -> Array:
  """``tol = rtol · σ_1(ΔW)``, by default ``rtol = ε_f32 · max(m, n)``.

  The default is the rule of NumPy's and MATLAB's ``matrix_rank`` (also in
  *Numerical Recipes*) with float32's ``ε = 2⁻²³``: about the round-off a
  float32 SVD of an ``(m, n)`` matrix leaves on its singular values.
  """
  rtol = EPS * max(_shape(delta, 'delta')) if rtol is None else rtol
  return rtol * spectrum(delta)[0]


def numerical_rank(delta: Matrix, rtol: float | None = None) -> Array:
  """``rank(ΔW) = #{i : σ_i(ΔW) > tol}``, ``tol = rtol · σ_1(ΔW)``,
  ``rtol = ε_f32 · max(m, n)`` by default (``rank_tolerance``); 0 for
  ``ΔW = 0``. ``ΔW: (m, n)`` -> an int32 scalar.

  Round-off in ``ΔW`` itself counts: an update formed as ``W' − W`` in
  float32 carries errors of about ``ε·|W|`` per entry, which are above the
  tolerance when ``ΔW`` is tiny next to ``W``.
  """
  sigma = spectrum(delta)
  rtol = EPS * max(_shape(delta, 'delta')) if rtol is None else rtol
  return jnp.sum(sigma > rtol * sigma[0]).astype(jnp.int32)


def update_rank(new: np.ndarray, old: np.ndarray) -> int:
  """Rank of an update formed in float32, ``ΔW = new − old``, that rounding
  cannot explain. ``new``, ``old``: float32 ``(..., m, n)``; the most over
  the leading axes (stacked layers).

  Counts the singular values of ``ΔW`` above
  ``max(σ_1(ΔW) · max(m, n), ‖new‖_F) · ε_f32``: the first term is
  ``numerical_rank``'s tolerance; the second bounds what rounding ``new`` to
  float32 adds (at most ``ε·|new_ij|`` per entry, so by Weyl's inequality no
  singular value of ``ΔW`` moves by more than ``ε·‖new‖_F``), which matters
  when ``ΔW`` is tiny next to ``W``. In float64 NumPy.
  """
  delta = np.asarray(new, np.float64) - np.asarray(old, np.float64)
  sigma = np.linalg.svd(delta, compute_uv=False)
  rounding = np.linalg.norm(np.asarray(new, np.float64), axis=(-2, -1))[..., None]
  largest = sigma.max(axis=-1, keepdims=True) * max(delta.shape[-2:])
  tol = EPS * np.maximum(largest, rounding)
  return int(np.max(np.sum(sigma > tol, axis=-1)))


def subspace_similarity(a: Array, b: Array) -> Array:
  """Hu et al.'s normalised subspace similarity (LoRA §7.2, Eq. 4).

  ``φ(A, B) = ‖Aᵀ B‖_F² / min(i, j) ∈ [0, 1]`` for orthonormal columns
  ``A: (m, i)`` and ``B: (m, j)``: 1 when one span contains the other, 0
  when they are orthogonal. It is the mean squared cosine of the principal
  angles between the two subspaces.
  """
  a, b = _matrix(a, 'a'), _matrix(b, 'b')
  if a.shape[0] != b.shape[0]:
    raise PeftError(
      f'a: {a.shape} and b: {b.shape} must span subspaces of the same R^m'
    )
  return jnp.sum(jnp.square(a.T @ b)) / min(a.shape[1], b.shape[1])


def similarity_curve(w: Matrix, delta: Matrix, r: int, side: str = 'left') -> Array:
  """``φ(U_{W,k}, U_{ΔW,r})`` for ``k = 1..p``: how much of ``ΔW``'s top-r
  singular subspace lies in ``W``'s top-k one.

  ``φ_k = ‖U_{W,k}ᵀ U_{ΔW,r}‖_F² / min(k, r)`` with ``U_{W,k}: (m, k)`` the
  top-k left singular vectors of ``W: (m, n)`` and ``U_{ΔW,r}: (m, r)``
  those of ``ΔW: (m, n)`` (``side='left'``), or the right singular vectors
  ``V: (n, ·)`` (``side='right'``).

  Returns:
    ``(p,)``, ``p = min(m, n)``; entry ``k − 1`` is ``φ_k``. A random
    subspace gives ``max(k, r)/m`` on average (``expected_random_similarity``).
  """
  _same_shape(w, delta)
  if _side(side) == 'both':
    raise PeftError("similarity_curve takes side='left' or 'right'")
  base_u, _, base_v = _decomposed(w, 'w')
  top_u, _, top_v = top_singular(_decomposed(delta, 'delta'), r)
  base, top = (base_u, top_u) if side == 'left' else (base_v, top_v)
  per_direction = jnp.sum(jnp.square(base.T @ top), axis=1)  # (p,): ‖u_kᵀ U_ΔW‖²
  k = jnp.arange(1, base.shape[1] + 1)
  return jnp.cumsum(per_direction) / jnp.minimum(k, r)


def expected_random_similarity(dim: int, r: int, ks: Array) -> Array:
  """``E φ(U_k, Q_r) = max(k, r)/dim`` for a fixed ``U_k: (dim, k)`` and a
  uniformly random r-dimensional subspace ``Q_r`` of ``R^dim``
  (``E[Q Qᵀ] = (r/dim) I`` gives ``E‖U_kᵀ Q‖_F² = k r/dim``)."""
  ks = jnp.asarray(ks)
  return jnp.maximum(ks, r) / dim


def random_orthonormal(key: jax.Array, m: int, r: int) -> Array:
  """``Q: (m, r)`` with orthonormal columns spanning a uniformly random
  r-dimensional subspace (QR of a Gaussian ``(m, r)``, signs fixed by
  ``R``'s diagonal so that ``Q`` is Haar-distributed)."""
  q, upper = jnp.linalg.qr(jax.random.normal(key, (m, r), jnp.float32))
  return q * jnp.where(jnp.diagonal(upper) < 0, -1.0, 1.0)


def projected_norm(w: Matrix, u: Array, v: Array) -> Array:
  """``‖Uᵀ W V‖_F`` for ``W: (m, n)``, ``U: (m, r)``, ``V: (n, r)``
  (orthonormal columns): the size of ``W`` inside the subspace pair
  ``(span U, span V)``. With ``W``'s own top-r vectors it is
  ``√(σ_1² + … + σ_r²)``."""
  w = _dense(w, 'w')
  return jnp.linalg.norm(_matrix(u, 'u').T @ w @ _matrix(v, 'v'))


class Amplification(NamedTuple):
  """Hu et al.'s Table 7 numbers for one ``(W, ΔW, r)``."""

  delta_norm: Array  # ‖ΔW‖_F
  projected_norm: Array  # ‖U_rᵀ W V_r‖_F, U_r, V_r: ΔW's top-r singular vectors
  factor: Array  # ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F


def amplification(w: Matrix, delta: Matrix, r: int) -> Amplification:
  """How much ``ΔW`` amplifies directions that ``W`` barely uses (LoRA §7.3).

  ``U_r: (m, r)``, ``V_r: (n, r)`` are the top-r left/right singular vectors
  of ``ΔW: (m, n)``; ``W: (m, n)`` projected onto them is ``U_rᵀ W V_r:
  (r, r)``, and the amplification factor is ``‖ΔW‖_F / ‖U_rᵀ W V_r‖_F``
  (Hu et al. report 21.5 = 6.91/0.32 for GPT-3's ``W_q`` at r = 4).
  Compare ``projected_norm`` against ``projected_norm(w, U_{W,r}, V_{W,r})``
  (W's own top-r directions) and against random orthonormal ``U, V``.
  """
  _same_shape(w, delta)
  delta = _decomposed(delta, 'delta')
  u, _, v = top_singular(delta, r)
  inside = projected_norm(w, u, v)
  norm = jnp.linalg.norm(delta.sigma)  # ‖ΔW‖_F² = Σ σ_i²
  return Amplification(norm, inside, norm / inside)


def split(w: Matrix, delta: Matrix, k: int, side: str = 'left') -> tuple[Array, Array]:
  """``ΔW = ΔW_in + ΔW_out`` with ``ΔW_in`` inside the span of ``W``'s top-k
  singular directions.

  With ``P_k = U_k U_kᵀ: (m, m)`` and ``Q_k = V_k V_kᵀ: (n, n)`` from
  ``W: (m, n)``, ``ΔW_in: (m, n)`` is ``P_k ΔW`` (``side='left'``: columns in
  ``W``'s top-k column space), ``ΔW Q_k`` (``'right'``: rows in its top-k
  row space) or ``P_k ΔW Q_k`` (``'both'``: a combination of the ``u_i v_jᵀ``
  with ``i, j ≤ k``, i.e. a re-weighting of ``W``'s own top-k subspaces,
  the paper's reconstruction). ``ΔW_out = ΔW − ΔW_in`` is orthogonal to it
  (``⟨ΔW_in, ΔW_out⟩_F = 0``): the extension beyond those k directions.
  """
  _same_shape(w, delta)
  u, _, v = top_singular(w, k)
  side = _side(side)
  delta = _dense(delta, 'delta')
  inside = delta
  if side in ('left', 'both'):
    inside = u @ (u.T @ inside)
  if side in ('right', 'both'):
    inside = (inside @ v) @ v.T
  return inside, delta - inside


def projection_shares(w: Matrix, delta: Matrix, side: str = 'left') -> Array:
  """``s_k = ‖ΔW_in(k)‖_F² / ‖ΔW‖_F²`` for ``k = 1..p`` (``split``).

  ``'left'``: ``s_k = ‖U_kᵀ ΔW‖_F² / ‖ΔW‖_F²``; ``'right'``:
  ``‖ΔW V_k‖_F² / ‖ΔW‖_F²``; ``'both'``: ``‖U_kᵀ ΔW V_k‖_F² / ‖ΔW‖_F²``,
  with ``U_k: (m, k)``, ``V_k: (n, k)`` from ``W: (m, n)`` and
  ``ΔW: (m, n)``. Non-decreasing in k, in ``[0, 1]``; at ``k = p`` the
  left (right) share is 1 unless ``m > n`` (``n > m``): what remains is
  outside ``W``'s column (row) space altogether. A ``ΔW ∝ W`` gives
  ``(σ_1² + … + σ_k²)/‖W‖_F²`` for every side; a random ``ΔW`` gives
  ``expected_random_shares``.

  Returns:
    ``(p,)``, ``p = min(m, n)``; entry ``k − 1`` is ``s_k``; all 0 for
    ``ΔW = 0``.
  """
  _same_shape(w, delta)
  u, _, v = _decomposed(w, 'w')
  side = _side(side)
  delta = _dense(delta, 'delta')
  if side == 'left':
    inside = jnp.cumsum(jnp.sum(jnp.square(u.T @ delta), axis=1))
  elif side == 'right':
    inside = jnp.cumsum(jnp.sum(jnp.square(delta @ v), axis=0))
  else:  # ‖U_kᵀ ΔW V_k‖² = sum of the leading k × k block of (UᵀΔWV)².
    block = jnp.cumsum(jnp.cumsum(jnp.square(u.T @ delta @ v), axis=0), axis=1)
    inside = jnp.diagonal(block)
  total = jnp.sum(jnp.square(delta))
  return jnp.where(total > 0, inside / jnp.where(total > 0, total, 1.0), 0.0)


def expected_random_shares(m: int, n: int, side: str = 'left') -> Array:
  """``E s_k`` for ``ΔW: (m, n)`` with i.i.d. (isotropic) random entries:
  ``k/m`` (``'left'``), ``k/n`` (``'right'``), ``k²/(m n)`` (``'both'``),
  for ``k = 1..min(m, n)``: ``(min(m, n),)``."""
  k = jnp.arange(1, min(m, n) + 1, dtype=jnp.float32)
  side = _side(side)
  if side == 'left':
    return k / m
  if side == 'right':
    return k / n
  return k * k / (m * n)
