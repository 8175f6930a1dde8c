"""LLaMA-Adapter (Zhang et al., 2023): adaption prompts with zero-init gates."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src import checks
from peft_jax._src.base import ActivationAdapter, Array, PeftError
from peft_jax._src.registry import register


class AdaptionPromptParams(NamedTuple):
  """One layer's adaption prompt ``prompt: (l, d)`` and its gate ``gate: ()``."""

  prompt: Array
  gate: Array


def _width(name: str, value) -> int:
  """``d`` of an ``adaption_prompt`` point's value, or a one-line error."""
  ok = (
    isinstance(value, tuple)
    and len(value) == 2
    and len(np.shape(value[0])) == 2
    and np.shape(value[1]) == ()
  )
  if not ok:
    raise PeftError(
      f'{name} acts at an adaption_prompt hook point, whose value is '
      f'(prompt (0, d), gate ()); got {jax.tree.map(np.shape, value)}'
    )
  return np.shape(value[0])[1]


@register('adaption_prompt')
def adaption_prompt(
  length: int = 10, *, param_dtype: str = 'float32'
) -> ActivationAdapter:
  """Gives one attention layer ``l`` trained prompt vectors and a zero-init gate.

  At an ``adaption_prompt`` hook point (the Llama decoder's
  ``self_attn/adaption_prompt``), whose value is the placeholder ``(zeros
  (0, d), 0)``, it returns ``(P, g)``, ``P: (l, d)``, ``g: ()``, and the
  attention adds to its output ``y: (b, s, d)``::

    y' = y + o_proj(g · softmax(q Kᵀ / √d_h) V)

  with ``q: (b, heads, s, d_h)`` the layer's queries after RoPE, ``K =
  k_proj(P)``, ``V = v_proj(P): (l, kv_heads, d_h)`` from the layer's own
  projections (no RoPE; repeated to ``heads`` for grouped-query attention)
  and the softmax over the ``l`` prompt positions alone, in float32. This is
  Hugging Face PEFT's ``AdaptedAttention`` (``tuners/adaption_prompt``);
  the sum happens before the ``attention_output`` hook point. Sequence
  lengths do not change and the prompt needs no KV cache, so decoding with
  ``generate`` works.

  Init as HF: ``P ~ N(0, 1)`` (``torch.empty(1, l, d).normal_()``), ``g = 0``
  (HF's ``adaption_gate``, shape ``(1,)`` there), so the model is unchanged
  at init (with no ``o_proj`` bias: HF's branch adds that bias once more).
  Trainable count ``l · d + 1`` per layer; no buffers. Not mergeable: the
  branch is a second softmax attention, with no weight-space form.

  HF's ``adapter_layers=L`` (the top ``L`` of ``N`` layers) is the rule:
  with unrolled layers, ``'layers_(2[2-9])/self_attn/adaption_prompt'`` for
  the top 8 of 30 (``'layers_\\d+/self_attn/adaption_prompt'`` for all).
  Under ``scan_layers`` every layer shares the one point
  ``layers/self_attn/adaption_prompt``, so a rule selects all ``N`` layers
  or none: the top-``L`` choice needs the unrolled model.

  Args:
    length: l > 0, the number of prompt vectors (HF's ``adapter_len``).
    param_dtype: dtype of ``P`` and ``g``; they reach the model in its
      compute dtype.

  Returns:
    The LLaMA-Adapter ``ActivationAdapter``.
  """
  name = 'adaption_prompt'
  length = checks.positive_int(name, 'length', length)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, value):
    prompt = jax.random.normal(key, (length, _width(name, value)), dtype)
    return AdaptionPromptParams(prompt, jnp.zeros((), dtype)), None

  def apply(value, params, buffers):
    del buffers
    _width(name, value)
    placeholder, gate = value
    return params.prompt.astype(placeholder.dtype), params.gate.astype(gate.dtype)

  return ActivationAdapter(
    init=init,
    apply=apply,
    num_params=lambda value: length * _width(name, value) + 1,
  )
