"""PiSSA (Meng et al., 2024): LoRA initialised from the top singular triplets."""

from peft_jax._src.base import Adapter
from peft_jax._src.registry import register
from peft_jax._src.svd_lora import svd_lora


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
  factors are buffers ``a0``, ``b0`` (``SvdLoraBuffers``) and
  ``w' = w + s · (a @ b − a0 @ b0)``: exactly ``w`` at init. Factored form
  ``y = x @ w + s · ((x @ a) @ b − (x @ a0) @ b0)``. Trainable count
  ``r · (d_in + d_out)`` (``SvdLoraParams``; the optimizer never sees the
  buffers). Mergeable; ``unapply`` subtracts the update.

  Unlike the original code (spec §3.2.2, which took the SVD of the random
  init before the pretrained weight was loaded), the SVD is of the ``w``
  passed to ``init``: call it on the pretrained weights.

  Args:
    rank: r, with ``0 < r <= min(d_in, d_out)``.
    alpha: α of the scale ``s = α/r``; must be > 0.
    param_dtype: dtype of ``a``, ``b`` and of their initial copies.
  """
  return svd_lora('pissa', rank, alpha, param_dtype, smallest=False)
