"""PiSSA (Meng et al., 2024): LoRA initialised from the top singular triplets."""

import jax.numpy as jnp

from peft_jax._src import checks
from peft_jax._src.base import BUFFERS, Adapter, PeftError
from peft_jax._src.registry import register
from peft_jax.methods.sam_parser import thin_svd


def svd_lora(
  name: str, rank: int, alpha: float, param_dtype: str, smallest: bool
) -> Adapter:
  """The PiSSA/MiLoRA adapter: LoRA factors cut from ``r`` singular triplets.

  ``init`` takes the float32 thin SVD of the pretrained ``w`` and keeps the
  top ``r`` triplets (``smallest=False``, PiSSA) or the bottom ``r``
  (``smallest=True``, MiLoRA): ``a = v_r · diag(√(σ_r/s))``,
  ``b = diag(√(σ_r/s)) · u_rᵀ``, so ``s · a @ b`` is exactly the rank-``r``
  part that the spec removes from ``w``. Those initial factors are kept as
  buffers ``a0``, ``b0`` and ``apply`` is ``w + s · (a @ b − a0 @ b0)``.

  Args:
    name: the registry name, for error messages.
    rank: r, with ``0 < r <= min(d_in, d_out)``.
    alpha: α of the scale ``s = α/r``; must be > 0.
    param_dtype: dtype of the factors and of their initial copies.
    smallest: keep the bottom-``r`` triplets instead of the top ones.
  """
  rank = checks.positive_int(name, 'rank', rank)
  alpha = checks.real(name, 'alpha', alpha)
  if alpha <= 0:
    raise PeftError(f'{name}: alpha={alpha} must be > 0 (the factors hold √(σ/s))')
  scale = alpha / rank
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    del key
    checks.rank_fits(name, rank, w)
    u, sigma, v = thin_svd(w)
    keep = slice(sigma.shape[0] - rank, None) if smallest else slice(rank)
    root = jnp.sqrt(sigma[keep] / scale)
    a = (v[:, keep] * root).astype(dtype)
    b = (u[:, keep] * root).T.astype(dtype)
    buffers = {'a0': jnp.array(a, copy=True), 'b0': jnp.array(b, copy=True)}
    return {'a': a, 'b': b, BUFFERS: buffers}

  def delta(theta):
    buffers = theta[BUFFERS]
    return scale * (theta['a'] @ theta['b'] - buffers['a0'] @ buffers['b0'])

  def factored(x, w, theta):
    buffers = theta[BUFFERS]
    y = x @ w + scale * (
      (x @ theta['a']) @ theta['b'] - (x @ buffers['a0']) @ buffers['b0']
    )
    return y.astype(jnp.result_type(x, w))

  return Adapter(
    init=init,
    apply=lambda w, theta: (w + delta(theta)).astype(w.dtype),
    factored=factored,
    unapply=lambda w, theta: (w - delta(theta)).astype(w.dtype),
    num_params=lambda shape: rank * (shape[0] + shape[1]),
    factors=lambda theta: (theta['a'], theta['b']),
  )


@register('pissa')
def pissa(
  rank: int = 8, alpha: float = 16.0, *, param_dtype: str = 'float32'
) -> Adapter:
  """LoRA on the principal singular subspace: ``w' = w_res + s · a @ b``.

  Shapes (Flax layout): ``w: (d_in, d_out) = v · diag(σ) · uᵀ`` (float32
  thin SVD of the pretrained ``w``, taken once in ``init``),
  ``a: (d_in, r)``, ``b: (r, d_out)``, ``s = α/r``. Init from the top-``r``
  triplets: ``a = v_r · diag(√(σ_r/s))``, ``b = diag(√(σ_r/s)) · u_rᵀ``, and
  ``w_res = w − v_r · diag(σ_r) · u_rᵀ``. Spec (PyTorch layout, §3.1):
  ``A = aᵀ = diag(√(σ_r/s)) V_rᵀ``, ``B = bᵀ = U_r diag(√(σ_r/s))``,
  ``W' = W_res + s·BA``.

  The frozen ``w`` cannot be replaced by ``w_res`` here, so the initial
  factors are buffers ``a0``, ``b0`` and ``w' = w + s · (a @ b − a0 @ b0)``:
  exactly ``w`` at init. Factored form
  ``y = x @ w + s · ((x @ a) @ b − (x @ a0) @ b0)``. Trainable count
  ``r · (d_in + d_out)`` (the buffers hold as many again). Mergeable;
  ``unapply`` subtracts the update.

  Unlike the original code (spec §3.2.2, which took the SVD of the random
  init before the pretrained weight was loaded), the SVD is of the ``w``
  passed to ``init``: call it on the pretrained weights.

  Args:
    rank: r, with ``0 < r <= min(d_in, d_out)``.
    alpha: α of the scale ``s = α/r``; must be > 0.
    param_dtype: dtype of ``a``, ``b`` and of their initial copies.
  """
  return svd_lora('pissa', rank, alpha, param_dtype, smallest=False)
