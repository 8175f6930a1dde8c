"""Bottleneck adapters' shared parts: parameters, sizes, init, the sequential form.

A bottleneck maps ``(..., d)`` to ``(..., d)`` through ``r`` hidden units:
``f(v @ down + b_d) @ up``. Sequential adapters (Houlsby, Pfeiffer) read the
sub-layer output ``h`` and add ``b_u`` too; the scaled parallel adapter
(He et al.) reads the sub-layer input ``x`` and scales the result.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src import gating
from peft_jax._src.base import ActivationAdapter, Array, PeftError

# (key, shape, dtype) -> array: how ``down`` and ``up`` are drawn.
Sampler = Callable[[Array, tuple[int, ...], jnp.dtype], Array]


class BottleneckParams(NamedTuple):
  """``down: (d, r)``, ``down_bias: (r,)``, ``up: (r, d)``, ``up_bias: (d,)``."""

  down: Array
  down_bias: Array
  up: Array
  up_bias: Array


class GatedBottleneckParams(NamedTuple):
  """``BottleneckParams`` plus UniPELT's gate: ``gate: (d, 1)``, ``gate_bias: (1,)``."""

  down: Array
  down_bias: Array
  up: Array
  up_bias: Array
  gate: Array
  gate_bias: Array


def hidden_size(name: str, value) -> int:
  """``d`` of a ``(..., d)`` activation, or a one-line error."""
  if isinstance(value, tuple) or len(np.shape(value)) < 2:
    raise PeftError(
      f'{name} acts on a (batch, seq, d) activation such as attention_output or '
      f'ffn_output; got {jax.tree.map(lambda x: tuple(x.shape), value)}'
    )
  return value.shape[-1]


def reduced(d: int, reduction_factor: int) -> int:
  """``r = max(1, d // reduction_factor)``."""
  return max(1, d // reduction_factor)


def truncated_normal(std: float) -> Sampler:
  """``N(0, std²)`` truncated at ``±2·std``: Houlsby et al.'s init."""
  return lambda key, shape, dtype: (
    std * jax.random.truncated_normal(key, -2, 2, shape, dtype)
  )


def normal(std: float) -> Sampler:
  """``N(0, std²)``: adapter-transformers' ``init_weights='bert'`` (std 0.02)."""
  return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def init_params(key, d: int, r: int, dtype, sample: Sampler) -> BottleneckParams:
  """``down``, ``up`` from ``sample``; both biases 0."""
  key_down, key_up = jax.random.split(key)
  return BottleneckParams(
    down=sample(key_down, (d, r), dtype),
    down_bias=jnp.zeros(r, dtype),
    up=sample(key_up, (r, d), dtype),
    up_bias=jnp.zeros(d, dtype),
  )


def init_gated(key, d: int, r: int, dtype, sample: Sampler) -> GatedBottleneckParams:
  """``init_params`` plus a gate as adapter-transformers' ``init_weights='bert'``:
  ``gate ~ N(0, 0.02²)``, ``gate_bias = 0``."""
  key, key_gate = jax.random.split(key)
  return GatedBottleneckParams(
    *init_params(key, d, r, dtype, sample),
    gate=normal(0.02)(key_gate, (d, 1), dtype),
    gate_bias=jnp.zeros(1, dtype),
  )


def sequential(
  name: str,
  reduction_factor: int,
  activation: Callable[[Array], Array],
  sample: Sampler,
  dtype,
  gated: bool = False,
) -> ActivationAdapter:
  """``h' = h + f(h @ down + b_d) @ up + b_u`` at a ``(..., d)`` point.

  ``r = reduced(d, reduction_factor)``; trainable count ``2dr + r + d``;
  computed in the activation's dtype. With ``gated``, UniPELT's form:
  ``h' = h + g · (f(h @ down + b_d) @ up + b_u)``, ``g = mean_s σ(h @ w_g +
  b_g): (..., 1, 1)`` from the adapter's input ``h`` (``gating``), and
  ``d + 1`` more parameters (``GatedBottleneckParams``).
  """

  def sizes(value) -> tuple[int, int]:
    d = hidden_size(name, value)
    return d, reduced(d, reduction_factor)

  def init(key, value):
    make = init_gated if gated else init_params
    return make(key, *sizes(value), dtype, sample), None

  def apply(value, params, buffers):
    del buffers
    hidden_size(name, value)
    p = jax.tree.map(lambda t: t.astype(value.dtype), params)
    branch = activation(value @ p.down + p.down_bias) @ p.up
    if gated:
      g = gating.sequence_gate(name, value, p.gate, p.gate_bias)
      return value + g * (branch + p.up_bias)
    return value + branch + p.up_bias

  def num_params(value):
    d, r = sizes(value)
    return 2 * d * r + r + d + gated * (d + 1)

  return ActivationAdapter(init=init, apply=apply, num_params=num_params)
