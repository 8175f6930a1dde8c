"""PEFT's ``LOHA`` type <-> ``loha``.

Per linear module PEFT stores ``hada_w1_a, hada_w2_a: (d_out, r)`` and
``hada_w1_b, hada_w2_b: (r, d_in)`` (``W' = W + s·(w1_a w1_b) ⊙ (w2_a
w2_b)``, ``s = alpha / r``). Ours (Flax layout): ``a1 = w1_bᵀ: (d_in, r)``,
``b1 = w1_aᵀ: (r, d_out)``, likewise ``a2 = w2_bᵀ``, ``b2 = w2_aᵀ``. ``r``
comes from the tensors and must agree with ``r``/``rank_pattern``;
``alpha``/``alpha_pattern`` give α. ``rank_dropout`` and ``module_dropout``
act in training only (no-ops for the saved model); ``use_effective_conv2d``
changes convolutions only, whose ``hada_t1``/``hada_t2`` are refused.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from peft_jax._src.base import PeftError
from peft_jax.interop import hf_peft
from peft_jax.models.checkpoints import Module

W1_A, W1_B, W2_A, W2_B = 'hada_w1_a', 'hada_w1_b', 'hada_w2_a', 'hada_w2_b'
# The CP-decomposed cores PEFT adds for convolutions (use_effective_conv2d).
CONV_CORES = ('hada_t1', 'hada_t2')


def read(
  config: Mapping[str, Any],
  name: str,
  tensors: hf_peft.Tensors,
  module: Module,
  shared: hf_peft.Tensors,
) -> tuple[str, hf_peft.Tensors, hf_peft.Tensors]:
  """``(loha(...) spec, {a1, b1, a2, b2}, {})`` for module ``name``."""
  del module, shared
  if any(core in tensors for core in CONV_CORES):
    raise PeftError(
      f'{name}: LoHa option use_effective_conv2d=True (hada_t1/hada_t2 of a '
      'convolution) is not supported; expected False.'
    )
  expected = {W1_A, W1_B, W2_A, W2_B}
  if set(tensors) != expected:
    raise PeftError(
      f'{name}: LoHa tensors {sorted(tensors)}; expected {sorted(expected)}.'
    )
  fields = {
    'a1': tensors[W1_B].T,
    'b1': tensors[W1_A].T,
    'a2': tensors[W2_B].T,
    'b2': tensors[W2_A].T,
  }
  ranks = {f: v.shape[1 if f.startswith('a') else 0] for f, v in fields.items()}
  wanted = hf_peft.pattern_value(config.get('rank_pattern') or {}, name, config['r'])
  if set(ranks.values()) != {wanted}:
    raise PeftError(
      f'{name}: hada_w1/hada_w2 have ranks {sorted(set(ranks.values()))}, '
      f'but r/rank_pattern give {wanted}.'
    )
  alpha = float(
    hf_peft.pattern_value(config.get('alpha_pattern') or {}, name, config['alpha'])
  )
  return f'loha(rank={wanted}, alpha={alpha})', fields, {}


def write(
  kind: str, kwargs: dict, params: Any, buffers: Any, module: Module
) -> tuple[hf_peft.Tensors, dict, hf_peft.Tensors]:
  """PEFT's tensors and options (``r``, ``alpha``) for one ``loha`` leaf."""
  del kind, buffers, module
  tensors = {
    W1_A: np.asarray(params.b1).T,
    W1_B: np.asarray(params.a1).T,
    W2_A: np.asarray(params.b2).T,
    W2_B: np.asarray(params.a2).T,
  }
  return tensors, {'r': kwargs['rank'], 'alpha': kwargs['alpha']}, {}


def config(options: dict[str, dict]) -> dict[str, Any]:
  """``adapter_config.json`` fields for the per-module options."""
  return {
    **hf_peft.common_or_patterns(hf_peft.option(options, 'r'), 'r', 'rank_pattern'),
    **hf_peft.common_or_patterns(
      hf_peft.option(options, 'alpha'), 'alpha', 'alpha_pattern'
    ),
    'target_modules': sorted(options),
    'rank_dropout': 0.0,
    'module_dropout': 0.0,
    'use_effective_conv2d': False,
    'init_weights': True,
  }


LOHA = hf_peft.register_hf(
  hf_peft.HfMethod(
    peft_type='LOHA',
    methods=('loha',),
    suffixes=(W1_A, W1_B, W2_A, W2_B, *CONV_CORES),
    read=read,
    write=write,
    config=config,
  )
)
