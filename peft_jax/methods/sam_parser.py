"""SAM-PARSER (Mode-1 reconstruction): train the singular values of a kernel.

Also home of the thin SVD that the SVD-based methods share (``thin_svd``).
"""

import jax.numpy as jnp

from peft_jax._src import checks
from peft_jax._src.base import BUFFERS, Adapter
from peft_jax._src.registry import register


def thin_svd(w):
  """The float32 thin SVD of a kernel, in the spec's names: ``(u, sigma, v)``.

  The kernel ``w: (d_in, d_out)`` is ``Wᵀ`` with ``W = U diag(σ) Vᵀ``, so
  ``w = v · diag(sigma) · uᵀ`` with ``u = U: (d_out, k)`` (output side),
  ``v = V: (d_in, k)`` (input side) and ``sigma: (k,)`` in descending order,
  ``k = min(d_in, d_out)``. Computed in float32 whatever ``w``'s dtype.
  """
  left, sigma, right = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
  return right.T, sigma, left


def reconstruct(v, sigma, u):
  """``v · diag(sigma) · uᵀ: (d_in, d_out)``, a kernel from SVD triplets."""
  return (v * sigma) @ u.T


@register('sam_parser')
def sam_parser(*, param_dtype: str = 'float32') -> Adapter:
  """Trained singular values: ``w' = v · diag(σ') · uᵀ``, ``σ'`` init ``σ``.

  Shapes: ``w: (d_in, d_out) = v · diag(σ) · uᵀ`` (the float32 thin SVD of
  the pretrained ``w``, taken once in ``init``), ``v: (d_in, k)``,
  ``u: (d_out, k)``, ``σ, σ': (k,)``, ``k = min(d_in, d_out)``. Spec
  (PyTorch layout): ``W' = U diag(σ') Vᵀ``. Only ``σ'`` is trainable
  (count ``k``); ``u``, ``v`` and the initial ``σ`` are buffers.

  ``apply`` computes the same matrix as ``w' = w + v · diag(σ' − σ) · uᵀ``, so
  it is exactly ``w`` at init (no SVD round-off in the merged weight) and
  ``unapply`` subtracts the same term. Mergeable.

  No factored form: with full rank ``k``, ``((x @ v) ⊙ σ') @ uᵀ`` costs
  ``2k(d_in + d_out)`` FLOPs per token, twice ``x @ w`` for a square kernel,
  so it is no faster than the weight-space path (which forms ``w'`` once per
  call, ``d_in · d_out · k`` FLOPs); ``peft_jax.factored`` applies this
  method in weight space.

  Unlike the original code (spec §3.2.1, which re-created ``σ'`` lazily after
  the optimiser was built, so it was never trained), ``σ'`` is a parameter
  from step 0.

  Args:
    param_dtype: dtype of ``σ'`` (the bases stay float32).
  """
  name = 'sam_parser'
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    del key
    checks.matrix(name, w)
    u, sigma, v = thin_svd(w)
    sigma = sigma.astype(dtype)
    buffers = {'u': u, 'v': v, 'sigma0': jnp.array(sigma, copy=True)}
    return {'sigma': sigma, BUFFERS: buffers}

  def delta(theta):
    buffers = theta[BUFFERS]
    return reconstruct(buffers['v'], theta['sigma'] - buffers['sigma0'], buffers['u'])

  return Adapter(
    init=init,
    apply=lambda w, theta: (w + delta(theta)).astype(w.dtype),
    unapply=lambda w, theta: (w - delta(theta)).astype(w.dtype),
    num_params=lambda shape: min(shape),
  )
