"""PEFT's ``ADAPTION_PROMPT`` type (LLaMA-Adapter) <-> ``adaption_prompt``.

Per adapted layer ``i`` PEFT stores ``model.layers.{i}.self_attn.
adaption_prompt: (1, l, d)`` and ``...adaption_gate: (1,)``, in the top
``adapter_layers`` of the ``N`` layers, ``l = adapter_len``. Ours:
``adaption_prompt(length=l)`` at the hook point
``layers_{i}/self_attn/adaption_prompt`` with ``prompt: (l, d)`` and
``gate: ()`` (the same ``y' = y + o_proj(g · softmax(q Kᵀ/√d_h) V)``).
Causal LMs (Llama) only.
"""

import re
from typing import Any

import numpy as np

from peft_jax._src.base import PeftError
from peft_jax.interop import hf_peft

PROMPT, GATE = 'adaption_prompt', 'adaption_gate'
TENSOR = re.compile(rf'model\.layers\.(\d+)\.self_attn\.({PROMPT}|{GATE})')
POINT = re.compile(r'layers_(\d+)/self_attn/adaption_prompt')


def _by_layer(tensors: hf_peft.Tensors) -> dict[int, hf_peft.Tensors]:
  """``{layer: {adaption_prompt: ..., adaption_gate: ...}}``."""
  layers: dict[int, hf_peft.Tensors] = {}
  for name, value in tensors.items():
    match = TENSOR.fullmatch(name)
    if match is None:
      raise PeftError(
        f"ADAPTION_PROMPT: tensor {name!r} is not a Llama layer's "
        f'self_attn.{PROMPT} or self_attn.{GATE}.'
      )
    layers.setdefault(int(match[1]), {})[match[2]] = value
  return layers


def read_points(
  config: dict[str, Any], tensors: hf_peft.Tensors, hooks: Any
) -> dict[str, hf_peft.Read]:
  """``{layers_{i}/self_attn/adaption_prompt: (adaption_prompt(length=l),
  {prompt: (l, d), gate: ()}, {})}`` per adapted layer."""
  del hooks
  length, count = config.get('adapter_len'), config.get('adapter_layers')
  layers = _by_layer(tensors)
  if len(layers) != count:
    raise PeftError(
      f'ADAPTION_PROMPT: tensors for {len(layers)} layers; adapter_layers={count}.'
    )
  points = {}
  for i, layer in sorted(layers.items()):
    if set(layer) != {PROMPT, GATE} or layer[PROMPT].shape[:2] != (1, length):
      raise PeftError(
        f'ADAPTION_PROMPT: layer {i} has {shapes(layer)}; adapter_len={length} '
        f'needs {PROMPT} (1, {length}, d) and {GATE} (1,).'
      )
    fields = {'prompt': layer[PROMPT][0], 'gate': layer[GATE].reshape(())}
    points[f'layers_{i}/self_attn/adaption_prompt'] = (
      f'adaption_prompt(length={length})',
      fields,
      {},
    )
  return points


def shapes(tensors: hf_peft.Tensors) -> dict[str, tuple[int, ...]]:
  """``{name: shape}``, for error messages."""
  return {name: np.shape(value) for name, value in sorted(tensors.items())}


def write_point(
  kind: str, kwargs: dict, params: Any, buffers: Any, point: str, modules: Any
) -> tuple[hf_peft.Tensors, dict]:
  """One layer's ``adaption_prompt: (1, l, d)`` and ``adaption_gate: (1,)``;
  options ``adapter_len``, the layer and the model's number of layers."""
  del kind, buffers
  match = POINT.fullmatch(point)
  if match is None:
    raise PeftError(
      f'save_hf_adapter: adaption_prompt at {point!r}; PEFT names unrolled '
      "Llama layers' points layers_<i>/self_attn/adaption_prompt."
    )
  name = f'model.layers.{match[1]}.self_attn'
  tensors = {
    f'{name}.{PROMPT}': np.asarray(params.prompt)[None],
    f'{name}.{GATE}': np.asarray(params.gate).reshape(1),
  }
  options = {
    'adapter_len': kwargs['length'],
    'layer': int(match[1]),
    'num_layers': hf_peft.num_layers(modules),
  }
  return tensors, options


def config(options: dict[str, dict]) -> dict[str, Any]:
  """``AdaptionPromptConfig`` fields; the layers must be the top ones."""
  layers, total = hf_peft.point_layers(options)
  if layers != list(range(total - len(layers), total)):
    raise PeftError(
      f'save_hf_adapter: adaption prompts in layers {layers} of {total}; PEFT '
      f'puts them in the top adapter_layers={len(layers)} layers.'
    )
  return {
    'adapter_len': hf_peft.common(options, 'adapter_len'),
    'adapter_layers': len(layers),
    'target_modules': 'self_attn',
    'task_type': 'CAUSAL_LM',
  }


ADAPTION_PROMPT = hf_peft.register_hf(
  hf_peft.HfMethod(
    peft_type='ADAPTION_PROMPT',
    methods=('adaption_prompt',),
    config=config,
    read_points=read_points,
    write_point=write_point,
    task_types=('CAUSAL_LM',),
  )
)
