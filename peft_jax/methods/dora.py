"""DoRA (Liu et al., 2024): LoRA with a learned per-output magnitude."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from peft_jax._src import checks, initializers
from peft_jax._src.base import Adapter, Array, Linear
from peft_jax._src.linalg import column_norms
from peft_jax._src.low_rank import factors, lora_scale
from peft_jax._src.registry import register


class DoraParams(NamedTuple):
  """DoRA's trained arrays: ``a: (d_in, r)``, ``b: (r, d_out)``, ``m: (d_out,)``.

  ``a``, ``b`` are LoRA's factors, ``m`` the magnitude of each output unit.
  """

  a: Array
  b: Array
  m: Array


@register('dora')
def dora(
  rank: int = 8,
  alpha: float = 16.0,
  *,
  rslora: bool = False,
  a_init: str = 'kaiming_uniform',
  param_dtype: str = 'float32',
) -> Adapter:
  """Weight-decomposed LoRA: ``w' = (w + s · a @ b) · diag(m ⊘ sg(n))``.

  Shapes (Flax layout): ``w: (d_in, d_out)``, ``a: (d_in, r)``,
  ``b: (r, d_out)``, ``m: (d_out,)``, ``s = α/r`` (``α/√r`` with
  ``rslora``); ``n: (d_out,)`` holds the column norms of ``w + s · a @ b``
  (over ``d_in``, one per output unit) and ``sg`` is stop-gradient, the
  ``dora_simple`` default of the reference code and HF PEFT. Spec (PyTorch
  layout, §3.1):
  ``W' = diag(m ⊘ sg‖W + sBA‖_row) · (W + sBA)``, ``A = aᵀ``, ``B = bᵀ``.
  Init: ``a`` as LoRA's (``a_init``), ``b = 0``, ``m`` = the column norms of
  the pretrained ``w``, so ``w' = w`` exactly at init. ``m`` is a parameter
  from step 0 (loralib's DoRA re-created it lazily, so it was never trained:
  spec §3.2.1). A column whose norm ``n`` is 0 stays 0 (no 0/0).

  Factored form ``y = (x @ w + s · (x @ a) @ b) ⊙ (m ⊘ sg(n))``. The norms
  ``n`` need ``w + s · a @ b`` itself: every call forms that ``(d_in, d_out)``
  matrix (``d_in · d_out · r`` FLOPs, once per call, not per token, and
  under stop-gradient, so no weight gradient), as HF PEFT does.

  Trainable count ``r · (d_in + d_out) + d_out`` (``DoraParams``); no
  buffers. Not additive (``w'`` rescales the columns of ``w + s · a @ b``),
  so ``apply`` and ``linear`` are written here. Mergeable. No ``unapply``:
  the norms of ``w + s · a @ b`` cannot be recovered from the merged weight.

  Args:
    rank: r, with ``0 < r <= min(d_in, d_out)``.
    alpha: α of the scale ``s = α/r``.
    rslora: use ``s = α/√r`` (rank-stabilised, HF PEFT's ``use_rslora``).
    a_init: init of ``a``: ``'kaiming_uniform'`` (``U(±1/√d_in)``, LoRA's
      default), ``'gaussian'`` (``N(0, 1/r²)``) or ``'normal'``
      (``N(0, 0.02²)``); ``b`` starts at 0.
    param_dtype: dtype of ``a``, ``b`` and ``m``; ``w'`` keeps ``w``'s dtype.

  Returns:
    The DoRA ``Adapter``; its parameters are ``DoraParams``.
  """
  name = 'dora'
  scale = lora_scale(name, rank, alpha, rslora)
  init_a = initializers.get(name, 'a_init', a_init)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    d_in, d_out = checks.rank_fits(name, rank, w)
    params = DoraParams(
      a=init_a(key, (d_in, rank), dtype, rank),
      b=jnp.zeros((rank, d_out), dtype),
      m=column_norms(w).astype(dtype),
    )
    return params, None

  def magnitude_scale(w, params):
    """``m ⊘ sg(n)``; 1 where a column of ``w + s · a @ b`` is 0."""
    norms = jax.lax.stop_gradient(column_norms(w + scale * params.a @ params.b))
    return params.m / jnp.where(norms == 0, 1, norms)

  def apply(w, params, buffers):
    del buffers
    directions = w + scale * (params.a @ params.b)
    return (directions * magnitude_scale(w, params)).astype(w.dtype)

  def factored(x, w, params, buffers):
    del buffers
    y = x @ w + scale * ((x @ params.a) @ params.b)
    return (y * magnitude_scale(w, params)).astype(jnp.result_type(x, w))

  return Adapter(
    init=init,
    apply=apply,
    linear=Linear(factored),
    num_params=lambda shape: rank * (shape[0] + shape[1]) + shape[1],
    factors=factors,
  )
