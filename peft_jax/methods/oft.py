"""OFT: orthogonal fine-tuning with block-diagonal Cayley rotations (Qiu et al.)."""

from typing import NamedTuple

import jax.numpy as jnp

from peft_jax._src import checks
from peft_jax._src.base import Adapter, Array, Linear
from peft_jax._src.linalg import cayley, check_blocks, num_skew
from peft_jax._src.registry import register


class OftParams(NamedTuple):
  """OFT's skew entries: ``q: (k, b(b − 1)/2)`` (``(1, b(b − 1)/2)`` shared)."""

  q: Array


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
  with ``block_share``; ``OftParams``, no buffers). Factored form
  ``y = (x R) @ w`` with ``x R`` computed blockwise (``x`` as ``(..., k, b)``),
  never forming ``w'``. Mergeable; ``unapply`` is ``w = Rᵀ w'``.

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
    q = jnp.zeros((1 if block_share else blocks, num_skew(block_size)), dtype)
    return OftParams(q=q), None

  def rotations(params, d_in):
    r = cayley(params.q, block_size)
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
    r_t = jnp.swapaxes(rotations(params, w.shape[0]), -1, -2)
    return left_multiply(r_t, w).astype(w.dtype)

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
