"""SVDiff (Han et al., 2023): a ReLU-clipped shift of the singular values."""

import jax
import jax.numpy as jnp

from peft_jax._src import checks
from peft_jax._src.base import BUFFERS, Adapter
from peft_jax._src.registry import register
from peft_jax._src.linalg import reconstruct, thin_svd


@register('svdiff')
def svdiff(*, param_dtype: str = 'float32') -> Adapter:
  """Shifted singular values: ``w' = v · diag(ReLU(σ + δ)) · uᵀ``.

  Shapes: ``w: (d_in, d_out) = v · diag(σ) · uᵀ`` (the float32 thin SVD of
  the pretrained ``w``, taken once in ``init``), ``v: (d_in, k)``,
  ``u: (d_out, k)``, ``σ, δ: (k,)``, ``k = min(d_in, d_out)``. Spec
  (PyTorch layout): ``W' = U diag(ReLU(σ + δ)) Vᵀ``. Only ``δ`` is trainable
  (init 0, count ``k``); ``u``, ``σ``, ``v`` are buffers. No scale (spec
  cheat-sheet).

  ``apply`` computes the same matrix as
  ``w' = w + v · diag(ReLU(σ + δ) − σ) · uᵀ``; since ``σ ≥ 0`` this is exactly
  ``w`` at init, and ``unapply`` subtracts the same term. Mergeable.

  No factored form: as for ``sam_parser``, a full-rank ``k`` form costs at
  least twice ``x @ w`` per token, so ``peft_jax.factored`` applies this
  method in weight space.

  Args:
    param_dtype: dtype of ``δ`` (the bases stay float32).
  """
  name = 'svdiff'
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    del key
    checks.matrix(name, w)
    u, sigma, v = thin_svd(w)
    buffers = {'u': u, 'v': v, 'sigma': sigma}
    return {'delta': jnp.zeros(sigma.shape, dtype), BUFFERS: buffers}

  def shifted(theta):
    return jax.nn.relu(theta[BUFFERS]['sigma'] + theta['delta'])

  def update(theta):
    buffers = theta[BUFFERS]
    return reconstruct(buffers['v'], shifted(theta) - buffers['sigma'], buffers['u'])

  return Adapter(
    init=init,
    apply=lambda w, theta: (w + update(theta)).astype(w.dtype),
    unapply=lambda w, theta: (w - update(theta)).astype(w.dtype),
    num_params=lambda shape: min(shape),
  )
