"""Prefix tuning (Li & Liang, 2021): trained keys and values in every layer."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src import checks, gating, initializers
from peft_jax._src.base import ActivationAdapter, Array, PeftError, Shared
from peft_jax._src.hooks import AttentionKV
from peft_jax._src.registry import register


class PrefixParams(NamedTuple):
  """One layer's prefix: ``keys``, ``values``, each ``(l, h, d_h)`` (flat)
  or ``(l, h·d_h)`` (made by the MLP); read as ``(l, h, d_h)``."""

  keys: Array
  values: Array


class PrefixMlp(NamedTuple):
  """The shared part of the reparametrisation: ``embedding: (l, e)``,
  ``hidden: (e, b)``, ``hidden_bias: (b,)``."""

  embedding: Array
  hidden: Array
  hidden_bias: Array


class PrefixHead(NamedTuple):
  """One layer's slice of the MLP's output layer: ``out: (b, 2·h·d_h)``,
  ``out_bias: (2·h·d_h,)``."""

  out: Array
  out_bias: Array


def _keys_values(name: str, value) -> AttentionKV:
  """The ``AttentionKV`` of an ``attention_kv`` point, or a one-line error."""
  ok = (
    isinstance(value, AttentionKV)
    and len(np.shape(value.keys)) == 4
    and np.shape(value.keys) == np.shape(value.values)
  )
  if not ok:
    raise PeftError(
      f'{name} acts at an attention_kv hook point, whose value is '
      'AttentionKV(keys, values, mask_bias, inputs) with keys and values '
      f'(batch, seq, heads, head_dim); got {jax.tree.map(np.shape, value)}'
    )
  return value


def _heads(name: str, value) -> tuple[int, int]:
  """``(h, d_h)``: the key/value heads and head size at the point."""
  return tuple(_keys_values(name, value).keys.shape[2:])


def prepend(value: AttentionKV, prefix: PrefixParams, gate=None) -> AttentionKV:
  """``keys = concat(g·P_k, k)``, ``values = concat(g·P_v, v)`` along the
  sequence, and ``mask_bias`` (if any) with ``l`` zeros in front: every
  query attends to the ``l`` prefix positions. ``gate``: ``g: (b, 1, 1)``
  per example, or None (``g = 1``)."""
  k, v, bias = value.keys, value.values, value.mask_bias
  batch, length = k.shape[0], prefix.keys.shape[0]
  shape = (batch, length, *k.shape[2:])

  def expand(p, x):
    p = jnp.broadcast_to(p.reshape(shape[1:]).astype(x.dtype), shape)
    return p if gate is None else p * gate[..., None].astype(x.dtype)

  k = jnp.concatenate([expand(prefix.keys, k), k], axis=1)
  v = jnp.concatenate([expand(prefix.values, v), v], axis=1)
  if bias is not None:
    visible = jnp.zeros((*bias.shape[:-1], length), bias.dtype)
    bias = jnp.concatenate([visible, bias], axis=-1)
  return value._replace(keys=k, values=v, mask_bias=bias)


@register('prefix_tuning')
def prefix_tuning(
  length: int = 30,
  *,
  bottleneck: int | None = 512,
  gated: bool = False,
  param_dtype: str = 'float32',
) -> ActivationAdapter:
  """Prepends ``l`` trained key and value vectors in every attention layer.

  At an ``attention_kv`` hook point with keys and values ``k, v: (b, s, h,
  d_h)`` (and BERT/DeBERTa's ``mask_bias: (b, 1, 1, s)``):
  ``K = [P_k; k]``, ``V = [P_v; v]`` along the sequence, ``P_k, P_v: (l,
  h, d_h)`` broadcast over the batch, and ``mask_bias`` gets ``l`` zeros in
  front, so every query attends to the prefix (the guide's
  ``K = [P_k; C W_k]``). On Llama the prefix keys are read as cached keys
  at positions ``0..l-1`` and the tokens' positions count on from ``l``
  (as Li & Liang's past activations and Hugging Face PEFT's prefix; see
  ``LlamaAttention``). Select one point per layer: ``('.*/attention_kv',
  'prefix_tuning()')``.

  ``bottleneck=b`` (default 512, adapter-transformers' and the guide's
  choice; 800 in MAM): the reparametrisation of Li & Liang,
  ``[P_k, P_v] = tanh(E W_1 + b_1) W_2 + b_2`` with ``E: (l, e)``,
  ``W_1: (e, b)``, ``b_1`` shared by all layers of the rule
  (``params['@shared']['prefix_tuning']``, ``e = h·d_h``) and ``W_2: (b,
  2·h·d_h)``, ``b_2`` per layer (the layer's slice of the paper's ``b →
  2·L·d`` output layer). Init as torch: ``E ~ N(0, 1)`` (``nn.Embedding``),
  linear weights and biases ``U(±1/√fan_in)``. Trainable count per layer
  ``2·h·d_h·(b + 1)``, shared ``l·e + e·b + b``. After training the MLP can
  be dropped: the plan's per-layer ``PrefixParams`` are the flat prefix.

  ``bottleneck=None``: flat, ``P_k, P_v`` trained directly (Hugging Face
  PEFT's default, ``prefix_projection=False``), init ``N(0, 1)`` as theirs;
  ``2·l·h·d_h`` per layer. Not mergeable: there is no weight-space form.

  ``gated=True``: UniPELT's gated prefix (Mao et al.; adapter-hub/adapters
  ``PrefixTuningLayer`` with ``use_gating`` and its default
  ``shared_gating``): ``P_k``, ``P_v`` of each example scaled by
  ``g = mean_s σ(x W_g + b_g)``, ``x: (b, s, d)`` the attention's input
  (``AttentionKV.inputs``), ``W_g: (d, 1)`` ``~ N(0, 0.02²)``,
  ``b_g ~ U(±1/√d)``, per layer; the parameters are ``Gated(inner, gate)``
  (``d + 1`` more per layer).

  Args:
    length: l > 0, the number of prefix positions.
    bottleneck: b > 0, the MLP's hidden size, or None for the flat prefix.
    gated: scale the prefix by UniPELT's per-example gate.
    param_dtype: dtype of the parameters; the keys keep the model's dtype.

  Returns:
    The prefix-tuning ``ActivationAdapter``.
  """
  name = 'prefix_tuning'
  length = checks.positive_int(name, 'length', length)
  if bottleneck is not None:
    bottleneck = checks.positive_int(name, 'bottleneck', bottleneck)
  gated = checks.flag(name, 'gated', gated)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def with_gate(key, value, params):
    """``params``, or ``Gated(params, gate)`` for the attention input's width."""
    if not gated:
      return params
    return gating.Gated(params, gating.init_gate(key, value.inputs.shape[-1], dtype))

  def gate_count(value) -> int:
    return value.inputs.shape[-1] + 1 if gated else 0

  def apply(value, params, buffers):
    del buffers
    _keys_values(name, value)
    if not gated:
      return prepend(value, params)
    gate = gating.sequence_gate(name, value.inputs, *params.gate)
    return prepend(value, params.inner, gate)

  if bottleneck is None:

    def init_flat(key, value):
      h, d_h = _heads(name, value)
      key_k, key_v, key_g = jax.random.split(key, 3)
      normal = lambda k: jax.random.normal(k, (length, h, d_h), dtype)
      return with_gate(key_g, value, PrefixParams(normal(key_k), normal(key_v))), None

    return ActivationAdapter(
      init=init_flat,
      apply=apply,
      num_params=lambda value: (
        2 * length * int(np.prod(_heads(name, value))) + gate_count(value)
      ),
    )

  def init_head(key, value):
    width = 2 * int(np.prod(_heads(name, value)))
    key_w, key_b, key_g = jax.random.split(key, 3)
    out = initializers.kaiming_uniform(key_w, (bottleneck, width), dtype, 0)
    bound = 1.0 / np.sqrt(bottleneck)
    head = PrefixHead(out, jax.random.uniform(key_b, (width,), dtype, -bound, bound))
    return with_gate(key_g, value, head), None

  def init_shared(key, value):
    width = int(np.prod(_heads(name, value)))
    key_e, key_w, key_b = jax.random.split(key, 3)
    bound = 1.0 / np.sqrt(width)
    return PrefixMlp(
      embedding=jax.random.normal(key_e, (length, width), dtype),
      hidden=initializers.kaiming_uniform(key_w, (width, bottleneck), dtype, 0),
      hidden_bias=jax.random.uniform(key_b, (bottleneck,), dtype, -bound, bound),
    )

  def derive(shared: PrefixMlp, own) -> PrefixParams:
    """``tanh(E W_1 + b_1) W_2 + b_2``: ``(..., l, 2·h·d_h)``, each layer's
    keys then its values (the layout of Hugging Face PEFT and
    adapter-transformers), leading layer axes of ``head`` broadcast; a gate
    passes through."""
    head = own.inner if gated else own
    hidden = jnp.tanh(shared.embedding @ shared.hidden + shared.hidden_bias)
    out = hidden @ head.out + head.out_bias[..., None, :]
    prefix = PrefixParams(*jnp.split(out, 2, axis=-1))
    return own._replace(inner=prefix) if gated else prefix

  return ActivationAdapter(
    init=init_head,
    apply=apply,
    num_params=lambda value: (
      2 * int(np.prod(_heads(name, value))) * (bottleneck + 1) + gate_count(value)
    ),
    shared=Shared(
      init=init_shared,
      derive=derive,
      num_params=lambda value: (
        length * (w := int(np.prod(_heads(name, value)))) + w * bottleneck + bottleneck
      ),
    ),
  )
