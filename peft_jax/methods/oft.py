"""OFT: orthogonal fine-tuning with block-diagonal Cayley rotations (Qiu et al.)."""

from typing import NamedTuple

import jax.numpy as jnp

from peft_jax._src import checks
from peft_jax._src.base import Adapter, Array, Linear, PeftError
from peft_jax._src.linalg import cayley, check_blocks, num_skew, skew
from peft_jax._src.registry import register


class OftParams(NamedTuple):
  """OFT's skew entries: ``q: (k, b(b − 1)/2)`` (``(1, b(b − 1)/2)`` shared)."""

  q: Array


def cayley_neumann(q: Array, block_size: int, terms: int) -> Array:
  """HF PEFT's truncated Neumann series of ``(I + Q)(I − Q)⁻¹``, batched.

  ``(I + Q)(I − Q)⁻¹ = I + 2 Σ_{j≥1} Qʲ``; PEFT keeps ``n = terms`` terms with
  the last one halved: ``R = I + 2Q + 2Q² + … + 2Qⁿ⁻² + Qⁿ⁻¹`` for ``n ≥ 4``,
  ``R = I + 2Q + 2Q² + Q³`` for ``n = 3``, ``I + 2Q`` for ``n = 2``, ``I`` for
  ``n = 1`` (``OFTRotationModule._cayley_batch``). ``R`` is orthogonal only up
  to ``O(‖Q‖ⁿ⁻¹)``. ``q: (..., b(b − 1)/2)`` -> ``(..., b, b)``, ``Q = skew(q)``.
  """
  q_mat = skew(q, block_size)
  eye = jnp.broadcast_to(jnp.eye(block_size, dtype=q.dtype), q_mat.shape)
  if terms == 1:
    return eye
  r = eye + 2 * q_mat
  if terms == 2:
    return r
  power = q_mat @ q_mat
  r = r + 2 * power
  for _ in range(3, terms - 1):
    power = power @ q_mat
    r = r + 2 * power
  return r + power @ q_mat


def coft_project(q: Array, block_size: int, eps: float) -> Array:
  """COFT's constraint (HF PEFT's ``_project_batch``): ``q_i`` scaled to
  ``‖Q_i‖_F = ε'`` where it is larger, ``ε' = eps / √k``.

  ``q: (k, b(b − 1)/2)`` -> ``(k, b(b − 1)/2)``; ``‖Q_i‖_F = √2 ‖q_i‖``
  (both triangles of ``Q_i = skew(q_i)``), ``k`` the stored blocks.
  """
  radius = eps / jnp.sqrt(jnp.asarray(q.shape[0], q.dtype))
  norms = jnp.sqrt(2 * jnp.sum(jnp.square(q), axis=-1, keepdims=True))
  safe = jnp.where(norms > radius, norms, 1.0)
  return jnp.where(norms > radius, q * (radius / safe), q)


@register('oft')
def oft(
  block_size: int = 32,
  *,
  block_share: bool = False,
  neumann_terms: int = 0,
  coft_eps: float = 0.0,
  param_dtype: str = 'float32',
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

  With ``neumann_terms = n > 0`` each block is instead HF PEFT's default
  Cayley–Neumann approximation ``R_i = I + 2Q_i + … + 2Q_iⁿ⁻² + Q_iⁿ⁻¹``
  (``cayley_neumann``; PEFT's ``use_cayley_neumann=True,
  num_cayley_neumann_terms=n``), only approximately orthogonal. With
  ``coft_eps = ε > 0`` (COFT, PEFT's ``coft=True, eps=ε``) the rotations are
  built from ``coft_project(q)``: each ``Q_i`` clipped to Frobenius norm
  ``ε / √k`` (``k`` the stored blocks).

  Differences from HF PEFT: HF's exact branch (``use_cayley_neumann=False``)
  computes ``(I − Q)(I + Q)⁻¹``, i.e. ours with ``q ↦ −q`` (the interop
  negates ``q``); a ``block_size`` that does not divide ``d_in`` is an error
  (HF silently adjusts it); COFT's projection is applied on the fly (HF also
  writes it back into its parameter); no block dropout.

  Init ``q = 0`` (HF's ``init_weights=True``): ``R = I``, identity at init.
  Trainable count ``(d_in / b) · b(b − 1)/2 = d_in (b − 1)/2`` (``b(b − 1)/2``
  with ``block_share``; ``OftParams``, no buffers). Factored form
  ``y = (x R) @ w`` with ``x R`` computed blockwise (``x`` as ``(..., k, b)``),
  never forming ``w'``. Mergeable; ``unapply`` is ``w = R⁻¹ w'`` (``Rᵀ w'``
  for the exact Cayley form).

  Args:
    block_size: b, the size of each orthogonal block; must divide ``d_in``.
      HF's default is 32.
    block_share: one block ``R_1`` shared by all ``k`` positions.
    neumann_terms: 0 for the exact Cayley transform, else n ≥ 1, the terms
      of HF PEFT's Cayley–Neumann series (its default is 5).
    coft_eps: ε of COFT's norm constraint; 0 turns it off.
    param_dtype: dtype of ``q``; ``w'`` keeps ``w``'s dtype.

  Returns:
    The OFT ``Adapter``.
  """
  name = 'oft'
  block_size = checks.positive_int(name, 'block_size', block_size)
  block_share = checks.flag(name, 'block_share', block_share)
  if neumann_terms != 0:
    neumann_terms = checks.positive_int(name, 'neumann_terms', neumann_terms)
  coft_eps = checks.real(name, 'coft_eps', coft_eps)
  if coft_eps < 0:
    raise PeftError(f'{name}: coft_eps={coft_eps} must be >= 0 (0 turns COFT off)')
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    del key
    blocks = check_blocks(name, block_size, checks.matrix(name, w)[0])
    q = jnp.zeros((1 if block_share else blocks, num_skew(block_size)), dtype)
    return OftParams(q=q), None

  def rotations(params, d_in):
    q = coft_project(params.q, block_size, coft_eps) if coft_eps else params.q
    if neumann_terms:
      r = cayley_neumann(q, block_size, neumann_terms)
    else:
      r = cayley(q, block_size)
    return jnp.broadcast_to(r, (d_in // block_size, block_size, block_size))

  def left_multiply(r, w):
    """``blockdiag(r) @ w`` for ``w: (d_in, d_out)``."""
    d_in, d_out = w.shape
    rw = jnp.einsum('kij,kjo->kio', r, w.reshape(-1, block_size, d_out))
    return rw.reshape(d_in, d_out)

  def apply(w, params, buffers):
    del buffers
    return left_multiply(rotations(params, w.shape[0]), w).astype(w.dtype)

  def unapply(w, params, buffers):
    del buffers
    r = rotations(params, w.shape[0])
    r_inv = jnp.linalg.inv(r) if neumann_terms else jnp.swapaxes(r, -1, -2)
    return left_multiply(r_inv, w).astype(w.dtype)

  def factored(x, w, params, buffers):
    del buffers
    r = rotations(params, w.shape[0])
    xb = x.reshape(*x.shape[:-1], -1, block_size)
    xr = jnp.einsum('...ki,kij->...kj', xb, r).reshape(x.shape)
    return (xr @ w).astype(jnp.result_type(x, w))

  def num_params(shape):
    return (1 if block_share else shape[0] // block_size) * num_skew(block_size)

  return Adapter(
    init=init,
    apply=apply,
    unapply=unapply,
    linear=Linear(factored),
    num_params=num_params,
  )
