"""Prefix tuning (Li & Liang, 2021): trained keys and values in every layer."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src import checks, initializers
from peft_jax._src.base import ActivationAdapter, Array, PeftError, Shared
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


def _keys_values(name: str, value) -> tuple:
  """``(k, v, *rest)`` of an ``attention_kv`` point, or a one-line error."""
  ok = (
    isinstance(value, tuple)
    and len(value) in (2, 3)
    and len(np.shape(value[0])) == 4
    and np.shape(value[0]) == np.shape(value[1])
  )
  if not ok:
    raise PeftError(
      f'{name} acts at an attention_kv hook point, whose value is (keys, values'
      '[, mask_bias]) with keys and values (batch, seq, heads, head_dim); got '
      f'{jax.tree.map(lambda x: tuple(x.shape), value)}'
    )
  return value


def _heads(name: str, value) -> tuple[int, int]:
  """``(h, d_h)``: the key/value heads and head size at the point."""
  return tuple(_keys_values(name, value)[0].shape[2:])


def prepend(value, prefix: PrefixParams):
  """``(concat(P_k, k), concat(P_v, v)[, concat(0_l, mask_bias)])`` along the
  sequence: every query attends to the ``l`` prefix positions."""
  k, v, *rest = value
  batch, length = k.shape[0], prefix.keys.shape[0]
  shape = (batch, length, *k.shape[2:])
  expand = lambda p, x: jnp.broadcast_to(p.reshape(shape[1:]).astype(x.dtype), shape)
  k = jnp.concatenate([expand(prefix.keys, k), k], axis=1)
  v = jnp.concatenate([expand(prefix.values, v), v], axis=1)
  if not rest:
    return k, v
  (bias,) = rest
  visible = jnp.zeros((*bias.shape[:-1], length), bias.dtype)
  return k, v, jnp.concatenate([visible, bias], axis=-1)


@register('prefix_tuning')
def prefix_tuning(
  length: int = 30,
  *,
  bottleneck: int | None = 512,
  param_dtype: str = 'float32',
) -> ActivationAdapter:
  """Prepends ``l`` trained key and value vectors in every attention layer.

  At an ``attention_kv`` hook point with keys and values ``k, v: (b, s, h,
  d_h)`` (and BERT/DeBERTa's ``mask_bias: (b, 1, 1, s)``):
  ``K = [P_k; k]``, ``V = [P_v; v]`` along the sequence, ``P_k, P_v: (l,
  h, d_h)`` broadcast over the batch, and ``mask_bias`` gets ``l`` zeros in
  front, so every query attends to the prefix (the guide's
  ``K = [P_k; C W_k]``). Keys are taken after RoPE on Llama (the prefix has
  no position). Select one point per layer: ``('.*/attention_kv',
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

  Args:
    length: l > 0, the number of prefix positions.
    bottleneck: b > 0, the MLP's hidden size, or None for the flat prefix.
    param_dtype: dtype of the parameters; the keys keep the model's dtype.

  Returns:
    The prefix-tuning ``ActivationAdapter``.
  """
  name = 'prefix_tuning'
  length = checks.positive_int(name, 'length', length)
  if bottleneck is not None:
    bottleneck = checks.positive_int(name, 'bottleneck', bottleneck)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def apply(value, params, buffers):
    del buffers
    _keys_values(name, value)
    return prepend(value, params)

  if bottleneck is None:

    def init_flat(key, value):
      h, d_h = _heads(name, value)
      key_k, key_v = jax.random.split(key)
      normal = lambda k: jax.random.normal(k, (length, h, d_h), dtype)
      return PrefixParams(normal(key_k), normal(key_v)), None

    return ActivationAdapter(
      init=init_flat,
      apply=apply,
      num_params=lambda value: 2 * length * int(np.prod(_heads(name, value))),
    )

  def init_head(key, value):
    width = 2 * int(np.prod(_heads(name, value)))
    key_w, key_b = jax.random.split(key)
    out = initializers.kaiming_uniform(key_w, (bottleneck, width), dtype, 0)
    bound = 1.0 / np.sqrt(bottleneck)
    return PrefixHead(
      out, jax.random.uniform(key_b, (width,), dtype, -bound, bound)
    ), None

  def init_shared(key, value):
    width = int(np.prod(_heads(name, value)))
    key_e, key_w, key_b = jax.random.split(key, 3)
    bound = 1.0 / np.sqrt(width)
    return PrefixMlp(
      embedding=jax.random.normal(key_e, (length, width), dtype),
      hidden=initializers.kaiming_uniform(key_w, (width, bottleneck), dtype, 0),
      hidden_bias=jax.random.uniform(key_b, (bottleneck,), dtype, -bound, bound),
    )

  def derive(shared: PrefixMlp, head: PrefixHead) -> PrefixParams:
    """``tanh(E W_1 + b_1) W_2 + b_2``: ``(..., l, 2·h·d_h)``, each layer's
    keys then its values (the layout of Hugging Face PEFT and
    adapter-transformers), leading layer axes of ``head`` broadcast."""
    hidden = jnp.tanh(shared.embedding @ shared.hidden + shared.hidden_bias)
    out = hidden @ head.out + head.out_bias[..., None, :]
    return PrefixParams(*jnp.split(out, 2, axis=-1))

  return ActivationAdapter(
    init=init_head,
    apply=apply,
    num_params=lambda value: 2 * int(np.prod(_heads(name, value))) * (bottleneck + 1),
    shared=Shared(
      init=init_shared,
      derive=derive,
      num_params=lambda value: (
        length * (w := int(np.prod(_heads(name, value)))) + w * bottleneck + bottleneck
      ),
    ),
  )
