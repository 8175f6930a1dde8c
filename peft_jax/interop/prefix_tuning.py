"""PEFT's ``PREFIX_TUNING`` type <-> ``prefix_tuning``.

PEFT stores the prefix of all ``L`` layers as one bare tensor
``prompt_embeddings: (l, L·2·h·d_h)`` (``h`` the key/value heads,
``token_dim = h·d_h``): row ``j`` is, layer by layer, the keys then the
values of virtual position ``j``, each ``(h, d_h)``; with
``prefix_projection=True`` the file holds the MLP's output, the same flat
prefix. PEFT hands it to transformers as ``past_key_values``; our Llama reads
an ``attention_kv`` prefix the same way (cached keys at positions
``0..l-1``, the tokens after them; see ``LlamaAttention``), so layer ``i``
is ``prefix_tuning(length=l, bottleneck=None)`` at
``layers_{i}/self_attn/attention_kv`` with ``keys``, ``values: (l, h,
d_h)``. Our reparametrised prefix (``bottleneck=b``) is written as the flat
prefix its MLP makes, as PEFT writes its own.

Causal LMs (Llama) only: on BERT, PEFT's tokens are numbered from ``l``
(docs/methods.md), which our encoder does not reproduce.
"""

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from peft_jax._src.base import PeftError
from peft_jax.interop import hf_peft
from peft_jax.methods.prefix_tuning import PrefixParams

PROMPT = 'prompt_embeddings'
POINT = re.compile(r'layers_(\d+)/self_attn/attention_kv')
LAYER_PREFIX = 'model.layers.{}.self_attn.prefix'  # one layer's (l, 2·h·d_h)


def read_points(
  config: dict[str, Any], tensors: hf_peft.Tensors, hooks: Mapping[str, Any]
) -> dict[str, hf_peft.Read]:
  """``{layers_{i}/self_attn/attention_kv: (prefix_tuning(length=l,
  bottleneck=None), {keys, values: (l, h, d_h)}, {})}`` for every layer,
  ``(h, d_h)`` those of the model's keys at the point."""
  if set(tensors) != {PROMPT}:
    raise PeftError(f'PREFIX_TUNING: tensors {sorted(tensors)}; expected [{PROMPT!r}].')
  prompt = tensors[PROMPT]
  length, layers = config.get('num_virtual_tokens'), config.get('num_layers')
  points = sorted(p for p in hooks if POINT.fullmatch(p))
  if not points:
    raise PeftError(
      'PREFIX_TUNING: the model has no layers_<i>/self_attn/attention_kv hook '
      'points; PEFT prefix tuning is read onto our Llama.'
    )
  heads, head_dim = hooks[points[0]].value.keys.shape[2:]
  want = (length, len(points) * 2 * heads * head_dim)
  if prompt.shape != want or layers != len(points):
    raise PeftError(
      f'PREFIX_TUNING: {PROMPT} has shape {prompt.shape} and num_layers='
      f'{layers}; this model ({len(points)} layers, {heads} key/value heads of '
      f'{head_dim}) with num_virtual_tokens={length} needs {want}.'
    )
  per_layer = prompt.reshape(length, layers, 2, heads, head_dim)
  spec = f'prefix_tuning(length={length}, bottleneck=None)'
  return {
    f'layers_{i}/self_attn/attention_kv': (
      spec,
      {'keys': per_layer[:, i, 0], 'values': per_layer[:, i, 1]},
      {},
    )
    for i in range(layers)
  }


def write_point(
  kind: str, kwargs: dict, params: Any, buffers: Any, point: str, modules: Any
) -> tuple[hf_peft.Tensors, dict]:
  """Layer ``i``'s ``(l, 2·h·d_h)`` slice of ``prompt_embeddings`` (under
  ``LAYER_PREFIX``; ``combine`` joins them), and its options."""
  del kind, buffers
  match = POINT.fullmatch(point)
  if match is None:
    raise PeftError(
      f'save_hf_adapter: prefix_tuning at {point!r}; PEFT puts a prefix at '
      "every unrolled Llama layer's layers_<i>/self_attn/attention_kv."
    )
  if kwargs.get('gated') or not isinstance(params, PrefixParams):
    raise PeftError(
      f'save_hf_adapter: gated prefix tuning at {point!r} (gated=True); PEFT '
      'has no gate.'
    )
  keys, values = np.asarray(params.keys), np.asarray(params.values)
  length, layer = keys.shape[0], int(match[1])
  flat = [x.reshape(length, -1) for x in (keys, values)]
  options = {
    'num_virtual_tokens': length,
    'token_dim': flat[0].shape[1],
    # (l, h, d_h) flat prefixes name h; the MLP's (l, h·d_h) leave it to
    # PEFT, which sets it (and token_dim) from the model's config.
    'num_attention_heads': keys.shape[1] if keys.ndim == 3 else None,
    'layer': layer,
    'num_layers': hf_peft.num_layers(modules),
  }
  return {LAYER_PREFIX.format(layer): np.concatenate(flat, axis=1)}, options


def config(options: dict[str, dict]) -> dict[str, Any]:
  """``PrefixTuningConfig`` fields; every layer must have its prefix."""
  layers, total = hf_peft.point_layers(options)
  if layers != list(range(total)):
    raise PeftError(
      f'save_hf_adapter: prefix tuning in layers {layers} of {total}; PEFT '
      'puts a prefix in every layer.'
    )
  width = hf_peft.common(options, 'token_dim')
  return {
    'num_virtual_tokens': hf_peft.common(options, 'num_virtual_tokens'),
    'token_dim': width,
    'num_attention_heads': hf_peft.common(options, 'num_attention_heads'),
    'num_layers': total,
    'num_transformer_submodules': 1,
    'encoder_hidden_size': width,
    'prefix_projection': False,
    'task_type': 'CAUSAL_LM',
  }


def combine(tensors: hf_peft.Tensors) -> hf_peft.Tensors:
  """The layers' ``(l, 2·h·d_h)`` slices, in layer order, as PEFT's one
  ``prompt_embeddings: (l, L·2·h·d_h)``."""
  slices = [tensors[LAYER_PREFIX.format(i)] for i in range(len(tensors))]
  return {PROMPT: np.concatenate(slices, axis=1)}


PREFIX_TUNING = hf_peft.register_hf(
  hf_peft.HfMethod(
    peft_type='PREFIX_TUNING',
    methods=('prefix_tuning',),
    config=config,
    read_points=read_points,
    write_point=write_point,
    combine=combine,
    top_level=(PROMPT,),
    task_types=('CAUSAL_LM',),
  )
)
