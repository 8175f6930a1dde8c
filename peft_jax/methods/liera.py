"""LieRA: a low-rank multiplicative (Hadamard) update of a kernel (Si et al., 2025)."""

from typing import NamedTuple

import jax.numpy as jnp

from peft_jax._src import checks, initializers
from peft_jax._src.base import Adapter, Array
from peft_jax._src.low_rank import factors, lora_scale
from peft_jax._src.registry import register

# form -> the elementwise map f with w' = w ⊙ f(s · a @ b).
FORMS = {'first_order': lambda delta: 1.0 + delta, 'exp': jnp.exp}


class LieraParams(NamedTuple):
  """LieRA's factors: ``a: (d_in, r)``, ``b: (r, d_out)``."""

  a: Array
  b: Array


@register('liera')
def liera(
  rank: int = 8,
  alpha: float = 16.0,
  *,
  form: str = 'first_order',
  param_dtype: str = 'float32',
) -> Adapter:
  """Elementwise low-rank rescaling: ``w' = w ⊙ (1 + s · a @ b)``.

  Shapes (Flax layout): ``w: (d_in, d_out)``, ``a: (d_in, r)``,
  ``b: (r, d_out)``; ``s = α/r``. Spec (PyTorch layout):
  ``W' = W + W ⊙ (s·BA) = W ⊙ (1 + s·BA)`` with ``A = aᵀ``, ``B = bᵀ``,
  which is what ``layers_LieRA.py`` computes (``form='first_order'``, the
  default). ``form='exp'`` is the paper's Lie-group update
  ``W' = W ⊙ exp(s·BA)``, whose first-order expansion the code uses; the
  spec marks that reading **(inferred)**. Init ``a ~ KU(d_in)``, ``b = 0``:
  identity at init (exactly, in both forms). Trainable count
  ``r · (d_in + d_out)`` (``LieraParams``); no buffers. Mergeable;
  ``unapply`` divides by the factor (defined while no entry of
  ``1 + s·a@b`` is 0; always for ``'exp'``).
  No factored form: the update is elementwise in ``w``, so ``x @ w'`` is no
  cheaper without forming ``w'``. ``factors`` gives ``(a, b)``.

  Args:
    rank: r, with ``0 < r <= min(d_in, d_out)``.
    alpha: α of ``s = α/r``.
    form: ``'first_order'`` (the code) or ``'exp'`` (the paper).
    param_dtype: dtype of ``a`` and ``b``; ``w'`` keeps ``w``'s dtype.

  Returns:
    The LieRA ``Adapter``; its parameters are ``LieraParams``.
  """
  name = 'liera'
  scale = lora_scale(name, rank, alpha, False)
  factor_of = FORMS[checks.choice(name, 'form', form, tuple(FORMS))]
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    d_in, d_out = checks.rank_fits(name, rank, w)
    params = LieraParams(
      a=initializers.kaiming_uniform(key, (d_in, rank), dtype, rank),
      b=jnp.zeros((rank, d_out), dtype),
    )
    return params, None

  def factor(params):
    return factor_of(scale * (params.a @ params.b))

  def apply(w, params, buffers):
    del buffers
    return (w * factor(params)).astype(w.dtype)

  def unapply(w, params, buffers):
    del buffers
    return (w / factor(params)).astype(w.dtype)

  return Adapter(
    init=init,
    apply=apply,
    unapply=unapply,
    num_params=lambda shape: rank * (shape[0] + shape[1]),
    factors=factors,
  )
