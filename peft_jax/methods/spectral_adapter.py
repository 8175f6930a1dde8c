"""Spectral Adapter (Zhang & Pilanci, 2024): tune the top singular vectors."""

from typing import NamedTuple

import jax.numpy as jnp

from peft_jax._src import checks, linalg
from peft_jax._src.additive import additive
from peft_jax._src.base import Adapter, Array
from peft_jax._src.low_rank import lora_scale
from peft_jax._src.registry import register


class SpectralAdapterParams(NamedTuple):
  """Trained shifts of the top singular vectors: ``p: (d_out, r)``, ``q: (d_in, r)``."""

  p: Array
  q: Array


class SpectralAdapterBuffers(NamedTuple):
  """The frozen top-``r`` triplets of ``w``.

  ``u: (d_out, r)`` (output side), ``v: (d_in, r)`` (input side),
  ``sigma: (r,)`` (descending), float32.
  """

  u: Array
  v: Array
  sigma: Array


@register('spectral_adapter')
def spectral_adapter(
  rank: int = 8, alpha: float = 16.0, *, param_dtype: str = 'float32'
) -> Adapter:
  """Additive tuning of the top-``r`` singular vectors.

  Flax layout: ``w' = w + s · [(v_r + q) · diag(σ_r) · (u_r + p)ᵀ
  − v_r · diag(σ_r) · u_rᵀ]`` with ``w: (d_in, d_out) = v · diag(σ) · uᵀ``
  (float32 thin SVD of the pretrained ``w``, taken once in ``init``),
  ``v_r: (d_in, r)``, ``u_r: (d_out, r)``, ``σ_r: (r,)`` the top-``r``
  triplets (buffers, ``SpectralAdapterBuffers``, which the optimizer never
  sees), trainable ``p: (d_out, r)`` and ``q: (d_in, r)``
  (``SpectralAdapterParams``), both initialised to 0, and ``s = α/r`` (spec
  cheat-sheet). Spec (PyTorch layout):
  ``W' = W + s[(U_r+P) diag(σ_r) (V_r+Q)ᵀ − U_r diag(σ_r) V_rᵀ]``.

  The bracket is computed expanded,
  ``q · diag(σ_r) · (u_r + p)ᵀ + v_r · diag(σ_r) · pᵀ``, so ``apply`` is
  exactly ``w`` at init. The gradient is non-zero at init through the cross
  terms (``∂/∂q ∝ σ_r u_r``, ``∂/∂p ∝ σ_r v_r``); unlike the original code
  (spec §3.2.1, which re-created ``p`` lazily so it was never trained), both
  are parameters from step 0. Factored form
  ``y = x @ w + s · [((x @ q) ⊙ σ_r) @ (u_r + p)ᵀ + ((x @ v_r) ⊙ σ_r) @ pᵀ]``.
  Trainable count ``r · (d_in + d_out)``. Mergeable; ``unapply`` subtracts
  the update.

  Args:
    rank: r, with ``0 < r <= min(d_in, d_out)``.
    alpha: α of the scale ``s = α/r``.
    param_dtype: dtype of ``p`` and ``q`` (the bases stay float32).

  Returns:
    The Spectral Adapter ``Adapter``.
  """
  name = 'spectral_adapter'
  scale = lora_scale(name, rank, alpha, rslora=False)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    del key
    d_in, d_out = checks.rank_fits(name, rank, w)
    u, sigma, v = linalg.thin_svd(w)
    params = SpectralAdapterParams(
      p=jnp.zeros((d_out, rank), dtype), q=jnp.zeros((d_in, rank), dtype)
    )
    buffers = SpectralAdapterBuffers(u=u[:, :rank], v=v[:, :rank], sigma=sigma[:rank])
    return params, buffers

  def delta(w, params, buffers):
    del w
    u, v, sigma, p = buffers.u, buffers.v, buffers.sigma, params.p
    return scale * (
      linalg.reconstruct(params.q, sigma, u + p) + linalg.reconstruct(v, sigma, p)
    )

  def delta_product(x, w, params, buffers):
    del w
    u, v, sigma, p = buffers.u, buffers.v, buffers.sigma, params.p
    return scale * (
      linalg.reconstruct(x @ params.q, sigma, u + p)
      + linalg.reconstruct(x @ v, sigma, p)
    )

  return additive(
    init,
    delta,
    delta_product=delta_product,
    num_params=lambda shape: rank * (shape[0] + shape[1]),
  )
