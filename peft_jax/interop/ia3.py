"""PEFT's ``IA3`` type <-> weight-space ``ia3`` (output and input scaling).

Per module PEFT stores ``ia3_l``: ``(d_out, 1)`` scaling the module's output
(``h = l ⊙ (W x + b)``), or ``(1, d_in)`` for the ``feedforward_modules``,
scaling its input (``h = W (l ⊙ x) + b``). Ours: ``ia3()`` with
``l_out = ia3_l[:, 0]`` and ``ia3(feedforward=True)`` with
``l_in = ia3_l[0]``. PEFT's output form scales the bias too and ours does
not, so output scaling of a module with a bias is refused both ways.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from peft_jax._src.base import PeftError
from peft_jax.interop import hf_peft
from peft_jax.models.checkpoints import Module

SCALES = 'ia3_l'


def _no_bias(name: str, module: Module) -> None:
  if 'bias' in module:
    raise PeftError(
      f"{name}: PEFT (IA)³ scales this module's output and its bias; "
      "peft_jax's ia3() scales the kernel only, so this adapter is not "
      'representable (input scaling, feedforward_modules, is).'
    )


def read(
  config: Mapping[str, Any],
  name: str,
  tensors: hf_peft.Tensors,
  module: Module,
  shared: hf_peft.Tensors,
) -> tuple[str, hf_peft.Tensors, hf_peft.Tensors]:
  """``(ia3(...) spec, {l_out} or {l_in}, {})`` for module ``name``."""
  del shared
  if config.get('fan_in_fan_out'):
    raise PeftError(f'{name}: (IA)³ option fan_in_fan_out=True is not supported.')
  scales = tensors[SCALES]
  feedforward = hf_peft.is_target(config.get('feedforward_modules'), name)
  if scales.ndim != 2 or scales.shape[0 if feedforward else 1] != 1:
    raise PeftError(
      f'{name}: ia3_l has shape {scales.shape}; expected '
      f'{"(1, d_in)" if feedforward else "(d_out, 1)"}.'
    )
  if feedforward:
    return 'ia3(feedforward=True)', {'l_in': scales[0]}, {}
  _no_bias(name, module)
  return 'ia3()', {'l_out': scales[:, 0]}, {}


def write(
  kind: str, kwargs: dict, params: Any, buffers: Any, module: Module
) -> tuple[hf_peft.Tensors, dict, hf_peft.Tensors]:
  """PEFT's ``ia3_l`` and options for one ``ia3`` leaf."""
  del kind, buffers
  feedforward = kwargs['feedforward']
  if feedforward:
    return {SCALES: np.asarray(params.l_in)[None, :]}, {'feedforward': True}, {}
  _no_bias(module['weight'].path, module)
  return {SCALES: np.asarray(params.l_out)[:, None]}, {'feedforward': False}, {}


def config(options: dict[str, dict]) -> dict[str, Any]:
  """``adapter_config.json`` fields for the per-module options."""
  return {
    'target_modules': sorted(options),
    'feedforward_modules': sorted(n for n, o in options.items() if o['feedforward']),
    'fan_in_fan_out': False,
    'init_ia3_weights': True,
  }


IA3 = hf_peft.register_hf(
  hf_peft.HfMethod(
    peft_type='IA3',
    methods=('ia3',),
    suffixes=(SCALES,),
    read=read,
    write=write,
    config=config,
  )
)
