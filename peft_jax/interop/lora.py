"""PEFT's ``LORA`` type <-> ``lora`` (plain, rsLoRA) and ``dora``; our
``pissa``/``milora`` are written in PEFT's converted (plain LoRA) form.

Per module PEFT stores ``lora_A.weight: (r, d_in)`` and ``lora_B.weight:
(d_out, r)`` (``W' = W + s·B A``, ``s = lora_alpha / r`` or ``/ √r`` with
``use_rslora``) and, with ``use_dora``, ``lora_magnitude_vector: (d_out,)``.
Ours: ``a = Aᵀ: (d_in, r)``, ``b = Bᵀ: (r, d_out)``, DoRA's ``m`` = the
magnitude vector. ``r`` comes from the tensors and must agree with
``r``/``rank_pattern``; ``lora_alpha``/``alpha_pattern`` give α.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from peft_jax._src.base import PeftError
from peft_jax.interop import hf_peft
from peft_jax.models.checkpoints import Module

A, B, MAGNITUDE = 'lora_A.weight', 'lora_B.weight', 'lora_magnitude_vector'

# Options whose non-default values change the model in ways ``lora``/``dora``
# do not express: (field, its no-op values).
_UNSUPPORTED = (
  ('fan_in_fan_out', (False, None)),
  ('bias', ('none', None)),
  ('lora_bias', (False, None)),
  ('layer_replication', (None, [])),
  ('target_parameters', (None, [])),
  ('trainable_token_indices', (None, {}, [])),
  ('alora_invocation_tokens', (None, [])),
  ('use_qalora', (False, None)),
)
# init_lora_weights values after which the saved factors apply to a modified
# base weight (PEFT converts them to plain LoRA only on request).
_RESIDUAL_INITS = ('pissa', 'olora', 'corda', 'eva', 'loftq', 'orthogonal')


def _check_options(config: Mapping[str, Any], where: str) -> None:
  hf_peft.refuse_options(config, where, 'LoRA', _UNSUPPORTED)
  init = str(config.get('init_lora_weights', True)).lower()
  if init.startswith(_RESIDUAL_INITS):
    raise PeftError(
      f'{where}: init_lora_weights={config["init_lora_weights"]!r} adapters '
      'apply to the residual base model PEFT wrote, not the original one; '
      'save them with path_initial_model_for_weight_conversion to get plain LoRA.'
    )


def read(
  config: Mapping[str, Any],
  name: str,
  tensors: hf_peft.Tensors,
  module: Module,
  shared: hf_peft.Tensors,
) -> tuple[str, hf_peft.Tensors, hf_peft.Tensors]:
  """``(lora(...) or dora(...) spec, {a, b[, m]}, {})`` for module ``name``."""
  del module, shared
  _check_options(config, name)
  use_dora = bool(config.get('use_dora'))
  expected = {A, B, MAGNITUDE} if use_dora else {A, B}
  if set(tensors) != expected:
    raise PeftError(
      f'{name}: LoRA tensors {sorted(tensors)}; expected {sorted(expected)}.'
    )
  a, b = tensors[A].T, tensors[B].T
  rank = a.shape[1]
  wanted = hf_peft.pattern_value(config.get('rank_pattern') or {}, name, config['r'])
  if b.shape[0] != rank:
    raise PeftError(f'{name}: lora_A has rank {rank} but lora_B {b.shape[0]}.')
  if rank != wanted:
    raise PeftError(
      f'{name}: lora_A/lora_B have rank {rank}, but r/rank_pattern give {wanted}.'
    )
  alpha = float(
    hf_peft.pattern_value(config.get('alpha_pattern') or {}, name, config['lora_alpha'])
  )
  rslora = bool(config.get('use_rslora'))
  kind = 'dora' if use_dora else 'lora'
  spec = f'{kind}(rank={rank}, alpha={alpha}, rslora={rslora})'
  fields = {'a': a, 'b': b}
  if use_dora:
    fields['m'] = tensors[MAGNITUDE]
  return spec, fields, {}


def write(
  kind: str, kwargs: dict, params: Any, buffers: Any, module: Module
) -> tuple[hf_peft.Tensors, dict, hf_peft.Tensors]:
  """PEFT's tensors and options for one ``lora``/``dora`` leaf, or for a
  ``pissa``/``milora`` leaf in PEFT's converted form (see ``_residual``)."""
  del module
  if kind in ('pissa', 'milora'):
    return _residual(kwargs, params, buffers)
  tensors = {A: np.asarray(params.a).T, B: np.asarray(params.b).T}
  if kind == 'dora':
    tensors[MAGNITUDE] = np.asarray(params.m)
  options = {
    'r': kwargs['rank'],
    'lora_alpha': kwargs['alpha'],
    'use_rslora': kwargs['rslora'],
    'use_dora': kind == 'dora',
  }
  return tensors, options, {}


def _residual(
  kwargs: dict, params: Any, buffers: Any
) -> tuple[hf_peft.Tensors, dict, hf_peft.Tensors]:
  """PiSSA/MiLoRA as the plain LoRA PEFT converts them to
  (``path_initial_model_for_weight_conversion``): ``s·(a@b − a0@b0) =
  s·[a, a0] @ [b; −b0]``, so ``lora_A = [a, a0]ᵀ: (2r, d_in)``,
  ``lora_B = [b; −b0]ᵀ: (d_out, 2r)``, ``r' = 2r`` and ``α' = 2α`` (the same
  ``s = α/r``); it applies to the original base weights."""
  a = np.concatenate([np.asarray(params.a), np.asarray(buffers.a0)], axis=1)
  b = np.concatenate([np.asarray(params.b), -np.asarray(buffers.b0)], axis=0)
  options = {
    'r': 2 * kwargs['rank'],
    'lora_alpha': 2 * kwargs['alpha'],
    'use_rslora': False,
    'use_dora': False,
  }
  return {A: a.T, B: b.T}, options, {}


def config(options: dict[str, dict]) -> dict[str, Any]:
  """``adapter_config.json`` fields for the per-module options."""
  return {
    **hf_peft.common_or_patterns(hf_peft.option(options, 'r'), 'r', 'rank_pattern'),
    **hf_peft.common_or_patterns(
      hf_peft.option(options, 'lora_alpha'), 'lora_alpha', 'alpha_pattern'
    ),
    'use_rslora': hf_peft.common(options, 'use_rslora'),
    'use_dora': hf_peft.common(options, 'use_dora'),
    'target_modules': sorted(options),
    'lora_dropout': 0.0,
    'bias': 'none',
    'fan_in_fan_out': False,
    'init_lora_weights': True,
  }


LORA = hf_peft.register_hf(
  hf_peft.HfMethod(
    peft_type='LORA',
    methods=('lora', 'dora', 'pissa', 'milora'),
    suffixes=(A, B, MAGNITUDE),
    read=read,
    write=write,
    config=config,
  )
)
