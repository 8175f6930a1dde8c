"""LoRA factors cut from singular triplets: the PiSSA/MiLoRA adapter."""

from typing import NamedTuple

import jax.numpy as jnp

from peft_jax._src import checks, linalg
from peft_jax._src.additive import additive
from peft_jax._src.base import Adapter, Array, PeftError
from peft_jax._src.low_rank import factors


class SvdLoraParams(NamedTuple):
  """PiSSA's and MiLoRA's trained factors: ``a: (d_in, r)``, ``b: (r, d_out)``."""

  a: Array
  b: Array


class SvdLoraBuffers(NamedTuple):
  """The initial factors ``a0: (d_in, r)``, ``b0: (r, d_out)``: ``w' = w`` at init."""

  a0: Array
  b0: Array


def svd_factors(
  method: str, w: Array, rank: int, scale: float, dtype, smallest: bool
) -> tuple[Array, Array]:
  """LoRA factors cut from ``r`` singular triplets of the pretrained ``w``.

  With the float32 thin SVD ``w = v · diag(σ) · uᵀ``, keeps the top ``r``
  triplets (``smallest=False``, PiSSA) or the bottom ``r`` (MiLoRA):
  ``a = v_r · diag(√(σ_r/s))``, ``b = diag(√(σ_r/s)) · u_rᵀ``, so
  ``s · a @ b`` is exactly that rank-``r`` part of ``w``.
  """
  checks.rank_fits(method, rank, w)
  u, sigma, v = linalg.thin_svd(w)
  keep = slice(sigma.shape[0] - rank, None) if smallest else slice(rank)
  root = jnp.sqrt(sigma[keep] / scale)
  return (v[:, keep] * root).astype(dtype), (u[:, keep] * root).T.astype(dtype)


def svd_lora(
  name: str, rank: int, alpha: float, param_dtype: str, smallest: bool
) -> Adapter:
  """The PiSSA/MiLoRA adapter: ``w' = w + s · (a @ b − a0 @ b0)``.

  ``init`` cuts ``a``, ``b`` from ``r`` singular triplets of the pretrained
  ``w`` (``svd_factors``: top for PiSSA, bottom for MiLoRA) and
  keeps copies ``a0``, ``b0`` as buffers. Factored form
  ``y = x @ w + s · ((x @ a) @ b − (x @ a0) @ b0)``.
  """
  rank = checks.positive_int(name, 'rank', rank)
  alpha = checks.real(name, 'alpha', alpha)
  if alpha <= 0:
    raise PeftError(f'{name}: alpha={alpha} must be > 0 (the factors hold √(σ/s))')
  scale = alpha / rank
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    del key
    a, b = svd_factors(name, w, rank, scale, dtype, smallest)
    return SvdLoraParams(a, b), SvdLoraBuffers(jnp.copy(a), jnp.copy(b))

  def delta(w, params, buffers):
    del w
    return scale * (params.a @ params.b - buffers.a0 @ buffers.b0)

  def delta_product(x, w, params, buffers):
    del w
    return scale * ((x @ params.a) @ params.b - (x @ buffers.a0) @ buffers.b0)

  return additive(
    init,
    delta,
    delta_product=delta_product,
    num_params=lambda shape: rank * (shape[0] + shape[1]),
    factors=factors,
  )
