"""Houlsby bottleneck adapters (Houlsby et al., 2019): a residual MLP per sub-layer."""

from peft_jax._src import bottleneck, checks, nonlinearities
from peft_jax._src.base import ActivationAdapter
from peft_jax._src.registry import register


@register('houlsby')
def houlsby(
  reduction_factor: int = 16,
  *,
  activation: str = 'swish',
  init_std: float = 1e-2,
  gated: bool = False,
  param_dtype: str = 'float32',
) -> ActivationAdapter:
  """A sequential bottleneck adapter: ``h' = h + f(h @ down + b_d) @ up + b_u``.

  At a hook point with value ``h: (b, s, d)`` (a sub-layer output before
  its residual and LayerNorm: ``attention_output``, ``ffn_output``):
  ``down: (d, r)``, ``up: (r, d)``, ``r = max(1, d // reduction_factor)``,
  ``f = activation``. Houlsby et al. place one after the attention output
  and one after the FFN of every layer (rules on ``.*attention_output`` and
  ``.*ffn_output``) and also train the LayerNorms (add ``ln_tuning``
  rules); ``pfeiffer`` is the FFN one only. Init as the paper:
  ``down``, ``up`` from a zero-mean Gaussian with standard deviation
  ``init_std = 1e-2`` truncated at two standard deviations, biases 0, so the
  adapter starts *near* (not exactly at) the identity. adapter-transformers'
  ``double_seq_bn`` defaults: ``r = d/16``, ``f = swish``. Trainable count
  ``2dr + r + d`` (``BottleneckParams``); computed in the activation's dtype.
  Not mergeable (the branch is nonlinear).

  ``gated=True`` scales each branch by UniPELT's gate, as ``pfeiffer``:
  ``h' = h + g · (f(h @ down + b_d) @ up + b_u)``,
  ``g = mean_s σ(h @ w_g + b_g)``, ``w_g ~ N(0, 0.02²)``, ``b_g = 0``
  (``GatedBottleneckParams``, ``d + 1`` more parameters). With
  ``init_weights='houlsby'`` adapter-transformers leaves its gate at torch's
  default ``nn.Linear`` init; here the gate is always drawn as above.

  Args:
    reduction_factor: d / r, an int > 0.
    activation: ``'swish'``/``'silu'`` (default), ``'relu'``, ``'gelu'`` or
      ``'tanh'``.
    init_std: σ > 0 of the truncated-normal init.
    gated: scale the branch by UniPELT's gate.
    param_dtype: dtype of the parameters.

  Returns:
    The Houlsby ``ActivationAdapter``.
  """
  name = 'houlsby'
  return bottleneck.sequential(
    name,
    checks.positive_int(name, 'reduction_factor', reduction_factor),
    nonlinearities.get(name, 'activation', activation),
    bottleneck.truncated_normal(checks.positive(name, 'init_std', init_std)),
    checks.float_dtype(name, 'param_dtype', param_dtype),
    checks.flag(name, 'gated', gated),
  )
