"""Hook points: where activation-side adapters act inside a Linen model.

Weight-space methods need nothing from a model. Methods that act on
activations (prompt tuning, bottleneck adapters, prefix tuning, (IA)³ on
activations) need named points where a value is read and replaced. The
model-side protocol is one call inside a Linen module:

  x = peft_jax.hook_point(self, 'ffn_output', x)

The point's name is the module path joined with ``/`` plus the point
(``bert/encoder/layer_3/ffn_output``). Rules select activation adapters by
these names, as they select weight-space adapters by leaf names.

How it works, and why it is safe under ``jit`` and ``nn.scan``:

* ``hook_points(model, *inputs)`` traces ``model.init`` abstractly and
  records every point, the shapes of its value, and how many layers share
  it: at each point it creates a scalar probe parameter, which ``nn.scan``
  stacks like any other parameter, so a point inside a scan over ``L``
  layers reports ``stack=(L,)``.
* To run a model with activation adapters, ``peft_jax.adapted`` puts each
  point's parameters *into the weight tree* the model receives, beside the
  module's own parameters (key ``'@<point>'``), wrapped in a ``Hooked``
  pytree node whose static part is the adapter. ``hook_point`` finds it in
  its module's ``params`` and applies the adapter. There is no global
  handler: the adapter is part of the traced inputs' structure, so a cached
  ``jit`` trace cannot miss it, and ``nn.scan`` slices stacked parameters
  per layer exactly as it slices the layer's kernels.

Without a ``Hooked`` entry ``hook_point`` returns ``x`` unchanged and adds
nothing to the traced computation.

Standard points (the shipped models document theirs):

* ``input_embeddings``: ``(embeddings (b, s, d), attention_mask (b, s))``;
  prompt tuning returns both with a prompt prepended.
* ``attention_kv``: an ``AttentionKV(keys, values, mask_bias, inputs)`` of
  one attention layer, for prefix tuning to prepend to: keys and values
  ``(b, s, h, d_h)`` (Llama: after RoPE, ``h`` = key/value heads),
  BERT/DeBERTa's ``mask_bias (b, 1, 1, s)`` (prepend to it too; ``None`` on
  the Llama decoder, which makes prepended keys visible to every query) and
  the attention's input hidden states ``(b, s, d)`` (read-only).
* ``attention_output`` / ``ffn_output``: the sub-layer output ``(b, s, d)``
  before the residual; sequential bottleneck adapters (``houlsby``,
  ``pfeiffer``).
* ``attention_block`` / ``ffn_block``: ``(x, h)``, the sub-layer's input ``x``
  (for the FFN, the hidden state after the attention block's LayerNorm or the
  pre-FFN norm) and its output ``h`` after the ``*_output`` point, each
  ``(b, s, d)``; the adapter returns ``(x, h')`` and the model continues with
  ``h'``: parallel adapters (``scaled_parallel``). Named in the same module
  as the ``*_output`` point.
* ``ffn_intermediate``: the activation after the FFN non-linearity
  ``(b, s, d_ff)``; (IA)³'s ``l_ff``.
"""

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from peft_jax._src import paths
from peft_jax._src.base import (
  ActivationAdapter,
  AdapterParams,
  Buffers,
  Entry,
  Params,
  PeftError,
)

PREFIX = '@'  # Key of a hook point's entry inside its module's params.


class AttentionKV(NamedTuple):
  """The value of an ``attention_kv`` hook point (one attention layer).

  Attributes:
    keys: ``(b, s, h, d_h)`` (Llama: ``h`` = key/value heads, after RoPE).
    values: ``(b, s, h, d_h)``.
    mask_bias: BERT/DeBERTa's additive key bias ``(b, 1, 1, s)``; ``None``
      on the Llama decoder, which makes prepended keys visible itself.
    inputs: ``(b, s, d)``, the hidden states the attention reads (its
      ``q``/``k``/``v`` projections' input), for adapters that depend on
      them (UniPELT's prefix gate); read-only: the model ignores what an
      adapter returns here.

  An adapter returns an ``AttentionKV`` (or a tuple in this order); it may
  prepend positions to ``keys``, ``values`` and ``mask_bias``.
  """

  keys: Any
  values: Any
  mask_bias: Any
  inputs: Any


class HookPoint(NamedTuple):
  """A hook point as the model shows it.

  Attributes:
    value: ``jax.ShapeDtypeStruct``s of the value of one call (one layer).
    stack: the sizes of the layer axes that share the point (``(L,)`` inside
      ``nn.scan`` over ``L`` layers, ``()`` otherwise).
  """

  value: Any
  stack: tuple[int, ...] = ()


@jax.tree_util.register_pytree_with_keys_class
class Hooked:
  """An activation adapter's parameters as they travel inside a weight tree.

  Children: ``params`` and ``buffers`` (sliced per layer by ``nn.scan``);
  static: the adapter.
  """

  def __init__(self, params: AdapterParams, buffers: Buffers, adapter):
    self.params, self.buffers, self.adapter = params, buffers, adapter

  def tree_flatten_with_keys(self):
    keys = (jax.tree_util.GetAttrKey('params'), jax.tree_util.GetAttrKey('buffers'))
    return tuple(zip(keys, (self.params, self.buffers), strict=True)), self.adapter

  @classmethod
  def tree_unflatten(cls, adapter, children):
    return cls(*children, adapter)


_RECORDING: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
  'peft_jax_hook_recording', default=None
)


def _name(module: nn.Module, point: str) -> str:
  return paths.SEPARATOR.join([*map(str, module.path), point])


def hook_point(module: nn.Module, point: str, value: Any) -> Any:
  """Returns ``value``, or what the activation adapter at this point makes of it.

  Args:
    module: the calling Linen module (``self``); its path names the point
      and its ``params`` carry the adapter.
    point: the point's name within the module, e.g. ``'ffn_output'``.
    value: the activation (or tuple of activations) at this point.
  """
  if not isinstance(module, nn.Module):
    raise PeftError(
      f'hook_point({point!r}) needs the calling Linen module as its first '
      f'argument; got {type(module).__name__}'
    )
  key = PREFIX + point
  recording = _RECORDING.get()
  if module.is_initializing():
    if recording is not None:
      recording.setdefault(_name(module, point), _abstract(value))
      module.param(key, lambda rng: jnp.zeros((), jnp.bool_))
    return value
  if not module.has_variable('params', key):
    return value
  node = module.get_variable('params', key)
  return node.adapter.apply(value, node.params, node.buffers)


def _abstract(value: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), value)


@contextlib.contextmanager
def _recording() -> Iterator[dict]:
  seen: dict = {}
  token = _RECORDING.set(seen)
  try:
    yield seen
  finally:
    _RECORDING.reset(token)


def hook_points(
  model: nn.Module, *args, method: Any = None, **kwargs
) -> dict[str, HookPoint]:
  """The hook points a Linen model reaches on these inputs, by name.

  Runs ``model.init`` abstractly (no FLOPs, no memory) on ``args``/``kwargs``
  (arrays or ``jax.ShapeDtypeStruct``s, e.g. one example batch).

  Args:
    model: the Linen module, e.g. ``BertForSequenceClassification(...)``.
    *args: its call arguments.
    method: the module method to run, as for ``model.init``.
    **kwargs: its keyword arguments.

  Returns:
    ``{name: HookPoint(value, stack)}`` in the order the model reaches them.
  """

  def init(rng, *args, **kwargs):  # A fresh function: no cached trace.
    return model.init(rng, *args, method=method, **kwargs)

  with _recording() as seen:
    variables = jax.eval_shape(init, jax.random.key(0), *args, **kwargs)
  probes = paths.flatten(variables.get('params', {}))
  points = {}
  for name, value in seen.items():
    *scope, point = name.split(paths.SEPARATOR)
    probe = probes[paths.SEPARATOR.join([*scope, PREFIX + point])]
    points[name] = HookPoint(value, tuple(probe.shape))
  return points


def install(weights: Params, hooks: Mapping[str, Entry]) -> Params:
  """``weights`` with each hook point's adapter and parameters put in place.

  ``hooks``: ``{hook name: Entry(adapter, params, buffers)}``; the entry goes
  to ``<module path>/@<point>``, where ``hook_point`` looks for it.
  """
  if not hooks:
    return weights
  if not isinstance(weights, Mapping):
    raise PeftError(
      'activation adapters need a Linen parameter dict (nested dicts); got '
      f'{type(weights).__name__}'
    )
  entries = {}
  for name, entry in hooks.items():
    if not isinstance(entry.adapter, ActivationAdapter):
      raise PeftError(f'{name}: {entry.adapter.name} is not an activation adapter')
    *scope, point = name.split(paths.SEPARATOR)
    key = paths.SEPARATOR.join([*scope, PREFIX + point])
    entries[key] = Hooked(entry.params, entry.buffers, entry.adapter)
  return paths.replace(weights, entries)
