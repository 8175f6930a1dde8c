"""Pfeiffer adapter (Pfeiffer et al., 2021): one bottleneck after the FFN."""

from peft_jax._src import bottleneck, checks, nonlinearities
from peft_jax._src.base import ActivationAdapter
from peft_jax._src.registry import register

INITS = {
  'bert': bottleneck.normal(0.02),
  'houlsby': bottleneck.truncated_normal(1e-2),
}


@register('pfeiffer')
def pfeiffer(
  reduction_factor: int = 16,
  *,
  activation: str = 'relu',
  init: str = 'bert',
  gated: bool = False,
  param_dtype: str = 'float32',
) -> ActivationAdapter:
  """A sequential bottleneck after the FFN: ``h' = h + f(h @ down + b_d) @ up + b_u``.

  At the ``ffn_output`` hook point (rule ``.*/ffn_output``), value
  ``h: (b, s, d)``, the FFN output before its residual and LayerNorm:
  ``down: (d, r)``, ``b_d: (r,)``, ``up: (r, d)``, ``b_u: (d,)``,
  ``r = max(1, d // reduction_factor)``, ``f = activation``. ``houlsby`` is
  the two-adapter variant (one more after the attention output, plus
  trained LayerNorms). Trainable count ``2dr + r + d`` per layer
  (``BottleneckParams``); computed in the activation's dtype. Not
  mergeable (the branch is nonlinear).

  Defaults are adapter-transformers' ``seq_bn`` (formerly ``pfeiffer``):
  ``r = d/16``, ``f = ReLU``, and its ``init_weights='bert'``: ``down``,
  ``up`` from ``N(0, 0.02²)`` (not truncated), biases 0, so the adapter
  starts near the identity. ``init='houlsby'`` draws them as ``houlsby``
  does (``N(0, 10⁻⁴)`` truncated at ``±2σ``). One difference in placement:
  ``seq_bn`` (``original_ln_before=True``) feeds the adapter
  ``LayerNorm(x + h)`` with residual ``h``; here the adapter reads ``h``, as
  in the guide's formula and ``houlsby``.

  ``gated=True`` is UniPELT's adapter (``SeqBnConfig(use_gating=True)``):
  ``h' = h + g · (f(h @ down + b_d) @ up + b_u)`` with
  ``g = mean_s σ(h @ w_g + b_g): (b, 1, 1)``, ``w_g: (d, 1)`` from
  ``N(0, 0.02²)``, ``b_g = 0``: the gate reads the adapter's input, as
  adapter-transformers' ``Adapter.forward`` computes it from ``x``, not
  from the residual. Count ``2dr + r + 2d + 1``
  (``GatedBottleneckParams``).

  Args:
    reduction_factor: d / r, an int > 0.
    activation: ``'relu'`` (default), ``'swish'``/``'silu'``, ``'gelu'`` or
      ``'tanh'``.
    init: ``'bert'`` (default) or ``'houlsby'``.
    gated: scale the branch by UniPELT's gate.
    param_dtype: dtype of the parameters.

  Returns:
    The Pfeiffer ``ActivationAdapter``.
  """
  name = 'pfeiffer'
  return bottleneck.sequential(
    name,
    checks.positive_int(name, 'reduction_factor', reduction_factor),
    nonlinearities.get(name, 'activation', activation),
    INITS[checks.choice(name, 'init', init, tuple(INITS))],
    checks.float_dtype(name, 'param_dtype', param_dtype),
    checks.flag(name, 'gated', gated),
  )
