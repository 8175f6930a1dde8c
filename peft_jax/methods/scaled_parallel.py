"""Scaled parallel adapter (He et al., 2022): a bottleneck beside a sub-layer."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src import bottleneck, checks, initializers, nonlinearities
from peft_jax._src.base import ActivationAdapter, Array, PeftError
from peft_jax._src.registry import register


class ScaledParallelParams(NamedTuple):
  """``down: (d, r)``, ``down_bias: (r,)``, ``up: (r, d)``; the scale fixed."""

  down: Array
  down_bias: Array
  up: Array


class LearnedScaledParallelParams(NamedTuple):
  """``ScaledParallelParams`` plus the trained scalar ``scale: ()``."""

  down: Array
  down_bias: Array
  up: Array
  scale: Array


def _input_and_output(name: str, value) -> tuple:
  """``(x, h)`` of an ``ffn_block``/``attention_block`` point, or a one-line error."""
  if not (
    isinstance(value, tuple)
    and len(value) == 2
    and len(np.shape(value[0])) == 3
    and np.shape(value[0]) == np.shape(value[1])
  ):
    raise PeftError(
      f'{name} acts at an ffn_block or attention_block hook point, whose value is '
      '(x (batch, seq, d), h (batch, seq, d)); got '
      f'{jax.tree.map(lambda x: tuple(x.shape), value)}'
    )
  return value


@register('scaled_parallel')
def scaled_parallel(
  reduction_factor: int = 2,
  *,
  rank: int | None = None,
  scale: float = 4.0,
  learned_scale: bool = False,
  activation: str = 'relu',
  param_dtype: str = 'float32',
) -> ActivationAdapter:
  """A bottleneck reading a sub-layer's input: ``h' = h + s · f(x @ down + b_d) @ up``.

  At an ``ffn_block`` or ``attention_block`` hook point (rules
  ``.*/ffn_block``, ``.*/attention_block``) with value ``(x, h)``: ``x: (b,
  s, d)`` the sub-layer's input (for the FFN, the post-attention-LayerNorm
  hidden state), ``h: (b, s, d)`` its output before the residual; returns
  ``(x, h')``. ``down: (d, r)``, ``b_d: (r,)``, ``up: (r, d)``,
  ``r = rank`` or ``max(1, d // reduction_factor)``, ``f = activation``.
  There is no up bias, as in the guide's ``FFN(x) + s · ReLU(x W_d + b_d)
  W_u`` (adapter-transformers has one, zero at init). Init as He et al.'s
  MAM code: ``down ~ U(±1/√d)`` (Kaiming-uniform), ``b_d = 0``, ``up = 0``,
  so the adapter starts exactly at the identity. Trainable count
  ``2dr + r`` (``ScaledParallelParams``), ``+ 1`` with ``learned_scale``
  (``LearnedScaledParallelParams``); computed in the activation's dtype.
  Not mergeable (the branch is nonlinear).

  ``s = scale = 4`` fixed is He et al.'s scaled parallel adapter (their MAM
  recipe: at ``ffn_block``, ``r = 512`` on BART-large); ``scale=1.0`` is
  their plain parallel adapter. ``learned_scale=True`` trains ``s`` from
  ``scale``; adapter-transformers' ``scaled_par_bn`` learns it from 1
  (``torch.ones(1)``), i.e. ``scaled_parallel(scale=1.0,
  learned_scale=True)``. Default ``r = d/2`` as ``par_bn``.

  Args:
    reduction_factor: d / r, an int > 0 (ignored when ``rank`` is given).
    rank: r > 0, overriding ``reduction_factor``.
    scale: s ≠ 0, the fixed scale or the learned one's initial value (with
      ``up = 0`` at init, ``s = 0`` leaves every gradient 0).
    learned_scale: train ``s``.
    activation: ``'relu'`` (default), ``'gelu'``, ``'silu'``/``'swish'`` or
      ``'tanh'``.
    param_dtype: dtype of the parameters.

  Returns:
    The scaled-parallel ``ActivationAdapter``.
  """
  name = 'scaled_parallel'
  factor = checks.positive_int(name, 'reduction_factor', reduction_factor)
  if rank is not None:
    rank = checks.positive_int(name, 'rank', rank)
  scale = checks.nonzero(name, 'scale', scale)
  learned = checks.flag(name, 'learned_scale', learned_scale)
  act = nonlinearities.get(name, 'activation', activation)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def sizes(value) -> tuple[int, int]:
    d = _input_and_output(name, value)[0].shape[-1]
    return d, rank or bottleneck.reduced(d, factor)

  def init(key, value):
    d, r = sizes(value)
    down = initializers.kaiming_uniform(key, (d, r), dtype, r)
    branch = (down, jnp.zeros(r, dtype), jnp.zeros((r, d), dtype))
    if learned:
      return LearnedScaledParallelParams(*branch, jnp.asarray(scale, dtype)), None
    return ScaledParallelParams(*branch), None

  def apply(value, params, buffers):
    del buffers
    x, h = _input_and_output(name, value)
    p = jax.tree.map(lambda t: t.astype(h.dtype), params)
    s = p.scale if learned else scale
    return x, h + s * (act(x.astype(h.dtype) @ p.down + p.down_bias) @ p.up)

  def num_params(value):
    d, r = sizes(value)
    return 2 * d * r + r + learned

  return ActivationAdapter(init=init, apply=apply, num_params=num_params)
