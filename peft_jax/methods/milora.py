"""MiLoRA (Wang et al., 2024): LoRA initialised from the minor singular triplets."""

from peft_jax._src.base import Adapter
from peft_jax._src.registry import register
from peft_jax._src.svd_lora import svd_lora


@register('milora')
def milora(
  rank: int = 8, alpha: float = 16.0, *, param_dtype: str = 'float32'
) -> Adapter:
  """LoRA on the minor singular subspace: ``w' = w_res + s · a @ b``.

  As ``pissa`` but with the bottom-``r`` triplets (the ``r`` smallest
  singular values of the float32 thin SVD of the pretrained
  ``w: (d_in, d_out) = v · diag(σ) · uᵀ``, taken once in ``init``):
  ``a = v_{-r} · diag(√(σ_{-r}/s)): (d_in, r)``,
  ``b = diag(√(σ_{-r}/s)) · u_{-r}ᵀ: (r, d_out)``, ``s = α/r``. Spec
  (PyTorch layout, §3.1): ``ΔW = s·(U_{-r} diag(√(σ_{-r}/s)))
  (diag(√(σ_{-r}/s)) V_{-r}ᵀ)``, ``W' = W_res + s·BA``.

  ``w' = w + s · (a @ b − a0 @ b0)`` with the initial factors as buffers
  ``a0``, ``b0``: exactly ``w`` at init. Factored form
  ``y = x @ w + s · ((x @ a) @ b − (x @ a0) @ b0)``. Trainable count
  ``r · (d_in + d_out)``. Mergeable; ``unapply`` subtracts the update.

  Unlike the original code (spec §3.2.1, which re-created the factors lazily
  after the optimiser was built, so they were never trained), ``a`` and ``b``
  are parameters from step 0.

  Args:
    rank: r, with ``0 < r <= min(d_in, d_out)``.
    alpha: α of the scale ``s = α/r``; must be > 0.
    param_dtype: dtype of ``a``, ``b`` and of their initial copies.
  """
  return svd_lora('milora', rank, alpha, param_dtype, smallest=True)
