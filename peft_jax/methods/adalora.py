"""AdaLoRA's SVD-form layer (Zhang et al., 2023), with its orthogonality penalty."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from peft_jax._src import checks
from peft_jax._src.base import Adapter, Array, PeftError
from peft_jax._src.low_rank import adalora_scale, low_rank_adapter
from peft_jax._src.patterns import FORMS, pattern_penalty
from peft_jax._src.registry import register


class AdaLoraParams(NamedTuple):
  """AdaLoRA's SVD-form triplets: ``a: (d_in, r)``, ``e: (r,)``, ``b: (r, d_out)``.

  ``adalora_schedule`` governs every leaf whose parameters have this type.
  """

  a: Array
  b: Array
  e: Array


@register('adalora')
def adalora(
  rank: int = 8,
  alpha: float = 16.0,
  *,
  init_std: float = 0.02,
  reg_orth_coef: float = 0.1,
  reg_form: str = 'mean',
  param_dtype: str = 'float32',
) -> Adapter:
  """SVD-form update of a kernel: ``w' = w + s · a @ diag(e) @ b``.

  Shapes (Flax layout): ``w: (d_in, d_out)``, ``a: (d_in, r)``, ``e: (r,)``,
  ``b: (r, d_out)``; ``s = α/(r₀ + 1e-5)`` with ``r₀ = rank`` the *initial*
  rank, kept when a budget schedule later zeroes entries of ``e`` (the
  spec's scaling cheat-sheet; ``α ≤ 0`` is replaced by ``r₀`` as in the
  code). Spec (PyTorch layout): ``h = W x + b + s·B diag(e) A x`` with
  ``A = aᵀ: (r, d_in)``, ``B = bᵀ: (d_out, r)``. Init ``a, b ~ N(0, σ²)``
  with ``σ = init_std = 0.02``, ``e = 0``: identity at init. Trainable count
  ``r · (d_in + d_out + 1)``. Mergeable and invertible. Factored form
  ``y = x @ w + s · ((x @ a) ⊙ e) @ b``. ``factors`` gives ``(a, b)``.

  The paper's "AdaLoRA" includes MPC_o, AdaLoRA's orthogonality penalty, so
  the adapter carries ``reg_orth_coef · R_o(a, b)`` as its regulariser
  (``patterns.pattern_penalty``; ``reg_orth_coef=0`` turns it off). Its
  default ``reg_form='mean'`` with the tree's default
  ``by_rules(..., regularizer='mean')`` is AdaLoRA's code (and HF PEFT's
  ``orth_reg_weight``) exactly: ``γ/(2L) Σ ‖·‖_F`` over the ``2L`` factor
  residuals of ``L`` adapted matrices, so the code's ``reg_orth_coef=0.1``
  is this ``reg_orth_coef=0.1``. ``'squared'`` with ``regularizer='sum'``
  is the paper's Eq. 25. The importance-driven rank budget (masking ``e``)
  is ``adalora_schedule``.

  Args:
    rank: r₀, with ``0 < r₀ <= min(d_in, d_out)``.
    alpha: α of the scale.
    init_std: σ > 0 of the normal init of ``a`` and ``b``.
    reg_orth_coef: γ ≥ 0 of the orthogonality penalty (0 disables it).
    reg_form: ``'mean'`` (AdaLoRA's code) or ``'squared'`` (the paper).
    param_dtype: dtype of ``a``, ``b`` and ``e``; ``w'`` keeps ``w``'s dtype.

  Returns:
    The AdaLoRA ``Adapter``.
  """
  name = 'adalora'
  scale = adalora_scale(name, rank, alpha)
  std = checks.positive(name, 'init_std', init_std)
  coef = checks.real(name, 'reg_orth_coef', reg_orth_coef)
  if coef < 0:
    raise PeftError(f'{name}: reg_orth_coef={coef} must be >= 0')
  checks.choice(name, 'reg_form', reg_form, FORMS)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    d_in, d_out = checks.rank_fits(name, rank, w)
    key_a, key_b = jax.random.split(key)
    params = AdaLoraParams(
      a=std * jax.random.normal(key_a, (d_in, rank), dtype),
      b=std * jax.random.normal(key_b, (rank, d_out), dtype),
      e=jnp.zeros(rank, dtype),
    )
    return params, None

  def regularizer(w, params, buffers):
    del w, buffers
    return coef * pattern_penalty(params.a, params.b, 'o', reg_form)

  layer = low_rank_adapter(
    init,
    scale,
    num_params=lambda shape: rank * (shape[0] + shape[1] + 1),
    mix=lambda params, buffers, h: h * params.e,
  )
  return layer._replace(regularizer=regularizer if coef > 0 else None)
