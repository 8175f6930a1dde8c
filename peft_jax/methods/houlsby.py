"""Houlsby bottleneck adapters (Houlsby et al., 2019): a residual MLP per sub-layer."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src import checks, nonlinearities
from peft_jax._src.base import ActivationAdapter, Array, PeftError
from peft_jax._src.registry import register


class BottleneckParams(NamedTuple):
  """``down: (d, r)``, ``down_bias: (r,)``, ``up: (r, d)``, ``up_bias: (d,)``."""

  down: Array
  down_bias: Array
  up: Array
  up_bias: Array


def _hidden_size(name: str, value) -> int:
  """``d`` of a ``(..., d)`` activation, or a one-line error."""
  if isinstance(value, tuple) or len(np.shape(value)) < 2:
    raise PeftError(
      f'{name} acts on a (batch, seq, d) activation such as attention_output or '
      f'ffn_output; got {jax.tree.map(lambda x: tuple(x.shape), value)}'
    )
  return value.shape[-1]


@register('houlsby')
def houlsby(
  reduction_factor: int = 16,
  *,
  activation: str = 'swish',
  init_std: float = 1e-2,
  param_dtype: str = 'float32',
) -> ActivationAdapter:
  """A sequential bottleneck adapter: ``h' = h + f(h @ down + b_d) @ up + b_u``.

  At a hook point with value ``h: (b, s, d)`` (a sub-layer output before
  its residual and LayerNorm: ``attention_output``, ``ffn_output``):
  ``down: (d, r)``, ``up: (r, d)``, ``r = max(1, d // reduction_factor)``,
  ``f = activation``. Houlsby et al. place one after the attention output
  and one after the FFN of every layer (rules on ``.*attention_output`` and
  ``.*ffn_output``) and also train the LayerNorms (add ``ln_tuning``
  rules); Pfeiffer's variant is the FFN one only. Init as the paper:
  ``down``, ``up`` from a zero-mean Gaussian with standard deviation
  ``init_std = 1e-2`` truncated at two standard deviations, biases 0, so the
  adapter starts *near* (not exactly at) the identity. adapter-transformers'
  ``double_seq_bn`` defaults: ``r = d/16``, ``f = swish``. Trainable count
  ``2dr + r + d`` (``BottleneckParams``); computed in the activation's dtype.
  Not mergeable (the branch is nonlinear).

  Args:
    reduction_factor: d / r, an int > 0.
    activation: ``'swish'``/``'silu'`` (default), ``'relu'``, ``'gelu'`` or
      ``'tanh'``.
    init_std: σ > 0 of the truncated-normal init.
    param_dtype: dtype of the parameters.

  Returns:
    The Houlsby ``ActivationAdapter``.
  """
  name = 'houlsby'
  factor = checks.positive_int(name, 'reduction_factor', reduction_factor)
  act = nonlinearities.get(name, 'activation', activation)
  std = checks.positive(name, 'init_std', init_std)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def bottleneck(value) -> tuple[int, int]:
    d = _hidden_size(name, value)
    return d, max(1, d // factor)

  def init(key, value):
    d, r = bottleneck(value)
    normal = lambda k, shape: std * jax.random.truncated_normal(k, -2, 2, shape, dtype)
    key_down, key_up = jax.random.split(key)
    params = BottleneckParams(
      down=normal(key_down, (d, r)),
      down_bias=jnp.zeros(r, dtype),
      up=normal(key_up, (r, d)),
      up_bias=jnp.zeros(d, dtype),
    )
    return params, None

  def apply(value, params, buffers):
    del buffers
    _hidden_size(name, value)
    p = jax.tree.map(lambda t: t.astype(value.dtype), params)
    return value + act(value @ p.down + p.down_bias) @ p.up + p.up_bias

  def num_params(value):
    d, r = bottleneck(value)
    return 2 * d * r + r + d

  return ActivationAdapter(init=init, apply=apply, num_params=num_params)
