"""AdaLoRA's SVD-form layer (Zhang et al., 2023), with its orthogonality penalty."""

import jax
import jax.numpy as jnp

from peft_jax._src import checks
from peft_jax._src.base import Adapter, PeftError
from peft_jax._src.low_rank import low_rank_adapter
from peft_jax._src.registry import register
from peft_jax.methods.mpc import FORMS, pattern_penalty


def adalora_scale(method: str, rank: int, alpha: float) -> float:
  """``s = α/(r₀ + 1e-5)``, with ``α ≤ 0`` replaced by ``r₀`` (the code's rule)."""
  rank = checks.positive_int(method, 'rank', rank)
  alpha = checks.real(method, 'alpha', alpha)
  return (alpha if alpha > 0 else float(rank)) / (rank + 1e-5)


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
  (``mpc.pattern_penalty``; ``reg_orth_coef=0`` turns it off). Its default
  ``reg_form='mean'`` is AdaLoRA's code (and HF PEFT's ``orth_reg_weight``):
  unsquared norms averaged per leaf, whose coefficient relates to the
  code's by ``γ_code = L · reg_orth_coef`` for ``L`` adapted leaves (see
  ``mpc``); ``'squared'`` is the paper's Eq. 25. The importance-driven rank
  budget (masking ``e``) is not part of this layer.

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
  std = checks.real(name, 'init_std', init_std)
  if std <= 0:
    raise PeftError(f'{name}: init_std={std} must be > 0')
  coef = checks.real(name, 'reg_orth_coef', reg_orth_coef)
  if coef < 0:
    raise PeftError(f'{name}: reg_orth_coef={coef} must be >= 0')
  checks.choice(name, 'reg_form', reg_form, FORMS)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    d_in, d_out = checks.rank_fits(name, rank, w)
    key_a, key_b = jax.random.split(key)
    return {
      'a': std * jax.random.normal(key_a, (d_in, rank), dtype),
      'b': std * jax.random.normal(key_b, (rank, d_out), dtype),
      'e': jnp.zeros(rank, dtype),
    }

  def regularizer(w, theta):
    del w
    return coef * pattern_penalty(theta['a'], theta['b'], 'o', reg_form)

  layer = low_rank_adapter(
    init,
    scale,
    num_params=lambda shape: rank * (shape[0] + shape[1] + 1),
    mix=lambda theta, h: h * theta['e'],
  )
  return layer._replace(regularizer=regularizer if coef > 0 else None)
