"""PEFT's ``LN_TUNING`` type <-> ``ln_tuning`` on norm leaves.

PEFT trains a copy of each targeted module and saves its parameters as
``<module>.ln_tuning_layers.<param>``: for a norm, ``weight: (d,)`` (our
``scale``) and, for a LayerNorm, ``bias: (d,)``; the copy replaces the
module (``merge_and_unload`` swaps it in). Ours: ``ln_tuning()`` on each of
those leaves, ``θ = `` the saved vector. Only 1-D parameters (norms) are
read; a targeted linear module is refused.

One leaf per parameter (``per_param``): ``read`` and ``write`` get
``module`` as ``{param: row}``, the one parameter (``weight`` or ``bias``)
of the leaf.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from peft_jax._src.base import PeftError
from peft_jax.interop import hf_peft
from peft_jax.models.checkpoints import Module

COPY = 'ln_tuning_layers'
PARAMS = ('weight', 'bias')


def _param(name: str, module: Module) -> str:
  """The one parameter of ``module`` this leaf is."""
  if len(module) != 1:
    raise PeftError(
      f'{name}: LN tuning needs one leaf per norm parameter, got {sorted(module)}.'
    )
  return next(iter(module))


def read(
  config: Mapping[str, Any],
  name: str,
  tensors: hf_peft.Tensors,
  module: Module,
  shared: hf_peft.Tensors,
) -> tuple[str, hf_peft.Tensors, hf_peft.Tensors]:
  """``('ln_tuning()', {'': θ}, {})`` for parameter ``param`` of module
  ``name`` (``module = {param: row}``), ``θ = <name>.ln_tuning_layers.<param>``."""
  del config, shared
  param = _param(name, module)
  suffix = f'{COPY}.{param}'
  if set(tensors) != {suffix}:
    raise PeftError(
      f'{name}: LN tuning tensors {sorted(tensors)}; expected [{suffix!r}].'
    )
  value = tensors[suffix]
  if value.ndim != 1:
    raise PeftError(
      f'{name}.{suffix} has shape {value.shape}; LN tuning is read for norm '
      'modules only (a 1-D weight or bias), expected (d,).'
    )
  row = module[param]
  return (
    'ln_tuning()',
    {'': value if row.transform is None else row.transform(value)},
    {},
  )


def write(
  kind: str, kwargs: dict, params: Any, buffers: Any, module: Module
) -> tuple[hf_peft.Tensors, dict, hf_peft.Tensors]:
  """``{ln_tuning_layers.<param>: θ}`` for one ``ln_tuning`` leaf
  (``module = {param: row}``); no options."""
  del kind, kwargs, buffers
  param = _param('save_hf_adapter', module)
  return {f'{COPY}.{param}': np.asarray(params)}, {}, {}


def config(options: dict[str, dict]) -> dict[str, Any]:
  """``adapter_config.json`` fields: the norm modules, by full name."""
  return {'target_modules': sorted(options)}


LN_TUNING = hf_peft.register_hf(
  hf_peft.HfMethod(
    peft_type='LN_TUNING',
    methods=('ln_tuning',),
    suffixes=tuple(f'{COPY}.{param}' for param in PARAMS),
    read=read,
    write=write,
    config=config,
    per_param=True,
  )
)
