"""Gated LoRA: UniPELT's LoRA module (Mao et al., ACL 2022)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from peft_jax._src import checks, gating, initializers
from peft_jax._src.base import Adapter, Array, Linear
from peft_jax._src.low_rank import factors
from peft_jax._src.registry import register


class GatedLoraParams(NamedTuple):
  """``a: (d_in, r)``, ``b: (r, d_out)``, ``gate: (d_in, 1)``, ``gate_bias: (1,)``."""

  a: Array
  b: Array
  gate: Array
  gate_bias: Array


@register('gated_lora')
def gated_lora(rank: int = 8, *, param_dtype: str = 'float32') -> Adapter:
  """LoRA scaled by an input-dependent gate: ``y = x @ w + g(x) · (x @ a) @ b``.

  Shapes (Flax layout): ``x: (..., s, d_in)``, ``w: (d_in, d_out)``,
  ``a: (d_in, r)``, ``b: (r, d_out)``, and the gate
  ``g(x) = mean_s σ(x @ w_g + b_g): (..., 1, 1)`` with ``w_g: (d_in, 1)``,
  ``b_g: (1,)``: one scalar per sequence (the mean over axis −2, padding
  included), broadcast over its positions and outputs. An ``x`` of rank 2
  is one sequence ``(s, d_in)``: on a kernel fed pooled ``(batch, d_in)``
  vectors the mean would run over the batch, so put the method only on
  per-token projections (UniPELT: the query and value kernels). Not
  mergeable: ``g`` depends on ``x``, so there is no ``w'``; the method has
  only the linear-layer form (``apply`` is ``None``), which
  ``peft_jax.adapted`` and ``make_train_step`` run on either path.

  Source: adapter-hub/adapters ``methods/lora.py`` (``LoRA`` with
  ``use_gating=True``, as in ``UniPELTConfig``). Init as there: ``a`` from
  ``kaiming_uniform_(a=√5)`` (``U(±1/√d_in)``), ``b = 0`` (identity at
  init), ``w_g ~ N(0, 0.02²)``, ``b_g ~ U(±1/√d_in)`` (torch's default
  ``nn.Linear`` bias). No ``α/r`` scale: with gating the library multiplies
  the branch by ``g`` instead of ``α/r``. Its dropout on the branch input is
  left out. Trainable count ``r · (d_in + d_out) + d_in + 1``
  (``GatedLoraParams``); ``factors`` gives ``(a, b)``.

  Args:
    rank: r, with ``0 < r <= min(d_in, d_out)``.
    param_dtype: dtype of the parameters; ``y`` keeps the dtype of ``x @ w``.

  Returns:
    The gated-LoRA ``Adapter``.
  """
  name = 'gated_lora'
  rank = checks.positive_int(name, 'rank', rank)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    d_in, d_out = checks.rank_fits(name, rank, w)
    key_a, key_gate = jax.random.split(key)
    gate = gating.init_gate(key_gate, d_in, dtype)
    params = GatedLoraParams(
      a=initializers.kaiming_uniform(key_a, (d_in, rank), dtype, rank),
      b=jnp.zeros((rank, d_out), dtype),
      gate=gate.weight,
      gate_bias=gate.bias,
    )
    return params, None

  def factored(x, w, params, buffers):
    del buffers
    g = gating.sequence_gate(name, x, params.gate, params.gate_bias)
    y = x @ w + g * ((x @ params.a) @ params.b)
    return y.astype(jnp.result_type(x, w))

  return Adapter(
    init=init,
    linear=Linear(factored, token_wise=False),  # The gate pools over the sequence.
    num_params=lambda shape: rank * (shape[0] + shape[1]) + shape[0] + 1,
    factors=factors,
  )
