"""SAM-PARSER (Mode-1 reconstruction): train the singular values of a kernel."""

from typing import NamedTuple

import jax.numpy as jnp

from peft_jax._src import checks, linalg
from peft_jax._src.additive import additive
from peft_jax._src.base import Adapter, Array
from peft_jax._src.registry import register


class SamParserParams(NamedTuple):
  """The trained singular values ``sigma: (k,)``."""

  sigma: Array


class SvdBasis(NamedTuple):
  """The frozen SVD of ``w``: ``u: (d_out, k)``, ``v: (d_in, k)``, ``sigma0: (k,)``."""

  u: Array
  v: Array
  sigma0: Array


@register('sam_parser')
def sam_parser(*, param_dtype: str = 'float32') -> Adapter:
  """Trained singular values: ``w' = v · diag(σ') · uᵀ``, ``σ'`` init ``σ``.

  Shapes: ``w: (d_in, d_out) = v · diag(σ) · uᵀ`` (the float32 thin SVD of
  the pretrained ``w``, taken once in ``init``), ``v: (d_in, k)``,
  ``u: (d_out, k)``, ``σ, σ': (k,)``, ``k = min(d_in, d_out)``. Spec
  (PyTorch layout): ``W' = U diag(σ') Vᵀ``. Only ``σ'`` is trainable
  (``SamParserParams``, count ``k``); ``u``, ``v`` and the initial ``σ`` are
  buffers (``SvdBasis``), which the optimizer never sees.

  ``apply`` computes the same matrix as ``w' = w + v · diag(σ' − σ) · uᵀ``, so
  it is exactly ``w`` at init (no SVD round-off in the merged weight) and
  ``unapply`` subtracts the same term. Mergeable.

  No factored form: with full rank ``k``, ``((x @ v) ⊙ σ') @ uᵀ`` costs
  ``2k(d_in + d_out)`` FLOPs per token, twice ``x @ w`` for a square kernel,
  so it is no faster than the weight-space path (which forms ``w'`` once per
  call, ``d_in · d_out · k`` FLOPs); the factored path applies this method
  in weight space.

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
    u, sigma, v = linalg.thin_svd(w)
    sigma = sigma.astype(dtype)
    return SamParserParams(sigma), SvdBasis(u=u, v=v, sigma0=jnp.copy(sigma))

  def delta(w, params, buffers):
    del w
    return linalg.reconstruct(buffers.v, params.sigma - buffers.sigma0, buffers.u)

  return additive(init, delta, num_params=min)
