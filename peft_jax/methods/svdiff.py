"""SVDiff (Han et al., 2023): a ReLU-clipped shift of the singular values."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from peft_jax._src import checks, linalg
from peft_jax._src.additive import additive
from peft_jax._src.base import Adapter, Array
from peft_jax._src.registry import register


class SvdiffParams(NamedTuple):
  """The trained shift of the singular values, ``delta: (k,)``."""

  delta: Array


class SvdiffBuffers(NamedTuple):
  """The frozen SVD of ``w``: ``u: (d_out, k)``, ``v: (d_in, k)``, ``sigma: (k,)``."""

  u: Array
  v: Array
  sigma: Array


@register('svdiff')
def svdiff(*, param_dtype: str = 'float32') -> Adapter:
  """Shifted singular values: ``w' = v · diag(ReLU(σ + δ)) · uᵀ``.

  Shapes: ``w: (d_in, d_out) = v · diag(σ) · uᵀ`` (the float32 thin SVD of
  the pretrained ``w``, taken once in ``init``), ``v: (d_in, k)``,
  ``u: (d_out, k)``, ``σ, δ: (k,)``, ``k = min(d_in, d_out)``. Spec
  (PyTorch layout): ``W' = U diag(ReLU(σ + δ)) Vᵀ``. Only ``δ`` is trainable
  (``SvdiffParams``, init 0, count ``k``); ``u``, ``σ``, ``v`` are buffers
  (``SvdiffBuffers``), which the optimizer never sees. No scale (spec
  cheat-sheet).

  ``apply`` computes the same matrix as
  ``w' = w + v · diag(ReLU(σ + δ) − σ) · uᵀ``; since ``σ ≥ 0`` this is exactly
  ``w`` at init, and ``unapply`` subtracts the same term. Mergeable.

  No factored form: as for ``sam_parser``, a full-rank ``k`` form costs at
  least twice ``x @ w`` per token, so ``peft_jax.adapted(...,
  factored=True)`` applies this method in weight space.

  Args:
    param_dtype: dtype of ``δ`` (the bases stay float32).

  Returns:
    The SVDiff ``Adapter``.
  """
  name = 'svdiff'
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    del key
    checks.matrix(name, w)
    u, sigma, v = linalg.thin_svd(w)
    return SvdiffParams(jnp.zeros(sigma.shape, dtype)), SvdiffBuffers(u, v, sigma)

  def delta(w, params, buffers):
    del w
    shifted = jax.nn.relu(buffers.sigma + params.delta)
    return linalg.reconstruct(buffers.v, shifted - buffers.sigma, buffers.u)

  return additive(init, delta, num_params=min)
