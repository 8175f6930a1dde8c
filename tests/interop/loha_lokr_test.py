"""PEFT's LOHA and LOKR adapter folders: import, export, and parity with PEFT.

The fixtures (``tests/fixtures/hf_peft/llama_lo*``) were written by real
PEFT (``tests/fixtures/make_hf_peft_loha_lokr.py``) on the tiny Llama, every
adapter tensor random: LoHa with rank/alpha patterns; LoKr with a full and a
factored ``lokr_w2``, with ``decompose_both``, with ``decompose_factor=8``,
and with both (a factored ``lokr_w1`` beside a full ``lokr_w2``). The logits
and merged weights of our model must equal PEFT's to float32 round-off;
export must write PEFT's tensors bit for bit and a config PEFT resolves to
the same per-module adapters; re-import must be the identity.
"""

import json
import pathlib
import re

import jax
import numpy as np
import pytest
import safetensors.numpy

import peft_jax as pj
from peft_jax import interop
from peft_jax.interop import loha, lokr  # noqa: F401 (registers LOHA)
from tests import references
from tests.interop.hf_peft_test import (
  FIXTURES,
  IDS,
  assert_close,
  base,
  exported_fixture,
  real_peft_llama_logits,
  round_trip_logits,
)

CASES = [
  'llama_loha',
  'llama_lokr',
  'llama_lokr_both',
  'llama_lokr_factor',
  'llama_lokr_both_factor',
]


def load(case: str):
  model, frozen, forward = base('llama')
  modules = interop.hf_modules(model)
  loaded = interop.load_hf_adapter(FIXTURES / case / 'adapter', modules, frozen)
  return frozen, forward, modules, loaded


def spec_names(loaded) -> dict[str, str]:
  """``{leaf path: canonical spec}`` of the loaded rules."""
  return {
    leaf.replace('\\', ''): pj.get(spec).name
    for selector, spec in loaded.rules
    for leaf in selector.strip('()').split('|')
  }


def test_rules_follow_peft_per_module_choices():
  """rank/alpha patterns per module; LoKr's full lokr_w2 reads as
  ``full_d=True``, a factored lokr_w1 as ``decompose_both=True``."""
  loha_specs = spec_names(load('llama_loha')[-1])
  assert 'rank=1, alpha=4.0' in loha_specs['layers_0/self_attn/o_proj/kernel']
  assert 'rank=2, alpha=3.0' in loha_specs['layers_1/self_attn/v_proj/kernel']
  assert 'rank=2, alpha=5.0' in loha_specs['layers_0/mlp/up_proj/kernel']
  assert 'rank=3, alpha=4.0' in loha_specs['layers_1/mlp/down_proj/kernel']
  assert 'rank=2, alpha=4.0' in loha_specs['layers_1/mlp/up_proj/kernel']
  lokr_specs = spec_names(load('llama_lokr')[-1])
  q0 = lokr_specs['layers_0/self_attn/q_proj/kernel']
  assert 'rank=2, alpha=3.0, decompose_both=False, full_d=True' in q0
  assert 'rank=3, alpha=2.0,' in lokr_specs['layers_1/mlp/down_proj/kernel']
  assert 'rank=1, alpha=2.0,' in lokr_specs['layers_0/mlp/gate_proj/kernel']
  both = spec_names(load('llama_lokr_both')[-1])
  assert (
    'rank=1, alpha=3.0, decompose_both=True' in both['layers_0/self_attn/k_proj/kernel']
  )
  assert (
    'rank=2, alpha=3.0, decompose_both=False' in both['layers_1/mlp/up_proj/kernel']
  )
  factor = spec_names(load('llama_lokr_factor')[-1])
  o0, gate0 = (
    factor[f'layers_0/{m}/kernel'] for m in ('self_attn/o_proj', 'mlp/gate_proj')
  )
  assert 'factor=8, rank=1, alpha=0.5, decompose_both=False, full_d=True' in o0
  assert 'factor=8, rank=1, alpha=0.5, decompose_both=False, full_d=False' in gate0
  both_factor = spec_names(load('llama_lokr_both_factor')[-1])
  q0 = both_factor['layers_0/self_attn/q_proj/kernel']
  assert 'factor=8, rank=1, alpha=2.0, decompose_both=True, full_d=True' in q0


def _written(folder) -> tuple[dict, dict]:
  config = json.loads((folder / 'adapter_config.json').read_text())
  return config, safetensors.numpy.load_file(folder / 'adapter_model.safetensors')


def _by_module(tensors) -> dict[str, dict[str, np.ndarray]]:
  modules = {}
  for name, value in tensors.items():
    module, _, suffix = name.removeprefix('base_model.model.').rpartition('.')
    modules.setdefault(module, {})[suffix] = value
  return modules


def _kron_shape(tensors, full, a, b) -> tuple[int, int]:
  """A LoKr factor's shape in our layout, ``w.T`` or ``(b.T @ a.T)``."""
  if full in tensors:
    return tensors[full].T.shape
  return tensors[b].shape[1], tensors[a].shape[0]


def _resolved(config, tensors):
  """What PEFT builds from a config, per module: LoHa ``(r, alpha)``; LoKr
  ``(r of the factored factors or None, scale, which factors are factored,
  decompose_factor)``."""
  resolved = {}
  for name, module in _by_module(tensors).items():
    rank = interop.pattern_value(config['rank_pattern'], name, config['r'])
    alpha = interop.pattern_value(config['alpha_pattern'], name, config['alpha'])
    if config['peft_type'] == 'LOHA':
      resolved[name] = (rank, alpha)
      continue
    c_shape = _kron_shape(module, lokr.W1, lokr.W1_A, lokr.W1_B)
    d_shape = _kron_shape(module, lokr.W2, lokr.W2_A, lokr.W2_B)
    factored = lokr.peft_factors(rank, config['decompose_both'], c_shape, d_shape)
    resolved[name] = (
      rank if any(factored) else None,
      alpha / rank,
      factored,
      config['decompose_factor'],
    )
  return resolved


@pytest.mark.parametrize('case', CASES)
def test_export_writes_peft_tensors_and_reimports_identically(case, tmp_path):
  frozen, _, modules, loaded = load(case)
  folder, config, want_config, tensors = exported_fixture(
    case, tmp_path, frozen, modules, loaded
  )
  assert config['peft_type'] == want_config['peft_type']
  assert _resolved(config, tensors) == _resolved(want_config, tensors)  # Bit-equal.
  again = interop.load_hf_adapter(folder, modules, frozen)
  jax.tree.map(np.testing.assert_array_equal, again.params, loaded.params)
  assert spec_names(again) == spec_names(loaded)


LOKR_RULES = [
  (r'layers_0/self_attn/q_proj/kernel', 'lokr(alpha=0.3)'),
  (
    r'layers_1/self_attn/(q|o)_proj/kernel',
    'lokr(rank=1, alpha=2.5, decompose_both=True)',
  ),
  (r'layers_0/mlp/up_proj/kernel', 'lokr(rank=1, decompose_both=True)'),
  (r'layers_1/mlp/down_proj/kernel', 'lokr(rank=3, alpha=5.0)'),
]


def ours(rules, seed: int = 3):
  """An adapter trained here (random values) on the tiny Llama."""
  model, frozen, forward = base('llama')
  tree = pj.by_rules(rules)
  params, buffers = tree.init(jax.random.key(seed), frozen)
  params = references.perturb(params, seed)
  return model, frozen, forward, tree, params, buffers


@pytest.mark.parametrize(
  'rules',
  [
    LOKR_RULES,
    [
      (r'layers_\d/self_attn/(k|v)_proj/kernel', 'loha(rank=2, alpha=3.0)'),
      (r'layers_1/mlp/gate_proj/kernel', 'loha(rank=4, alpha=0.7)'),
    ],
  ],
)
def test_our_adapter_exports_and_reimports(rules, tmp_path):
  model, frozen, forward, tree, params, buffers = ours(rules)
  modules = interop.hf_modules(model)
  folder = interop.save_hf_adapter(tmp_path, tree, frozen, params, buffers, modules)
  again = interop.load_hf_adapter(folder, modules, frozen)
  np.testing.assert_array_equal(
    *round_trip_logits(forward, frozen, again, tree, params, buffers)
  )


def test_full_lokr_factors_get_a_power_of_two_rank(tmp_path):
  """A ``rank=None`` leaf is written with r >= max(factor shapes)/2, so PEFT
  keeps both factors full, and alpha = α·r, so alpha/r is α exactly."""
  model, frozen, _, tree, params, buffers = ours(LOKR_RULES)
  folder = interop.save_hf_adapter(
    tmp_path, tree, frozen, params, buffers, interop.hf_modules(model)
  )
  config, tensors = _written(folder)
  q0 = 'model.layers.0.self_attn.q_proj'  # c, d: (4, 4).
  assert interop.pattern_value(config['rank_pattern'], q0, config['r']) == 2
  assert interop.pattern_value(config['alpha_pattern'], q0, config['alpha']) == 0.6
  assert config['decompose_both'] is True
  resolved = _resolved(config, tensors)
  assert resolved[q0] == (None, 0.3, (False, False), -1)
  assert resolved['model.layers.0.mlp.up_proj'] == (1, 1.0, (True, True), -1)
  assert resolved['model.layers.1.mlp.down_proj'] == (3, 5.0 / 3, (False, True), -1)


def test_exported_folder_loads_in_real_peft(tmp_path):
  model, frozen, forward, tree, params, buffers = ours(LOKR_RULES)
  interop.save_hf_adapter(
    tmp_path, tree, frozen, params, buffers, interop.hf_modules(model)
  )
  theirs = real_peft_llama_logits(tmp_path)
  mine = forward(tree.apply(frozen, params, buffers), IDS, np.ones_like(IDS))
  assert_close(np.asarray(mine), theirs)


# ---------------------------------------------------------------------------
# Unsupported options: one-line errors naming the option.


def written_folder(tmp_path, config: dict, tensors: dict) -> pathlib.Path:
  """An adapter folder as PEFT would write it for ``q_proj`` of layer 0."""
  prefix = 'base_model.model.model.layers.0.self_attn.q_proj.'
  (tmp_path / 'adapter_config.json').write_text(json.dumps(config))
  safetensors.numpy.save_file(
    {prefix + s: np.ones(shape, np.float32) for s, shape in tensors.items()},
    str(tmp_path / 'adapter_model.safetensors'),
  )
  return tmp_path


LOKR_CONFIG = {'peft_type': 'LOKR', 'r': 1, 'alpha': 1, 'decompose_factor': -1}


@pytest.mark.parametrize(
  ('config', 'tensors', 'message'),
  [
    (
      {**LOKR_CONFIG, 'use_effective_conv2d': True},
      {'lokr_w1': (4, 4), 'lokr_w2': (4, 4), 'lokr_t2': (1, 1, 3, 3)},
      'LoKr option use_effective_conv2d=True (lokr_t2 of a convolution) is not '
      'supported; expected False.',
    ),
    (
      {'peft_type': 'LOHA', 'r': 1, 'alpha': 1, 'use_effective_conv2d': True},
      {f'hada_{t}': (1, 1, 3, 3) for t in ('t1', 't2', 'w1_a', 'w1_b')},
      'LoHa option use_effective_conv2d=True (hada_t1/hada_t2 of a convolution) '
      'is not supported; expected False.',
    ),
    (
      {'peft_type': 'LOHA', 'r': 3, 'alpha': 1},
      {'hada_w1_a': (16, 2), 'hada_w1_b': (2, 16)}
      | {'hada_w2_a': (16, 2), 'hada_w2_b': (2, 16)},
      'hada_w1/hada_w2 have ranks [2], but r/rank_pattern give 3.',
    ),
    (  # PEFT would have made lokr_w2 (4, 4) full at r=2.
      {**LOKR_CONFIG, 'r': 2},
      {'lokr_w1': (4, 4), 'lokr_w2_a': (4, 2), 'lokr_w2_b': (2, 4)},
      'do not fit r/rank_pattern=2, decompose_both=False',
    ),
  ],
)
def test_unsupported_folders_are_named(config, tensors, message, tmp_path):
  model, frozen, _ = base('llama')
  folder = written_folder(tmp_path, config, tensors)
  with pytest.raises(pj.PeftError, match=re.escape(message)):
    interop.load_hf_adapter(folder, interop.hf_modules(model), frozen)


@pytest.mark.parametrize(
  ('spec', 'message'),
  [
    (
      'lokr(rank=2)',
      'has full_d=False for d: (4, 4) at rank=2, but PEFT keeps d full iff '
      'rank >= 2.0; expected full_d=True.',
    ),
    (
      'lokr(rank=1, full_d=True)',
      'has full_d=True for d: (4, 4) at rank=1, but PEFT keeps d full iff '
      'rank >= 2.0; expected full_d=False.',
    ),
    (
      'lokr(rank=2, decompose_both=True, factor=2, full_d=False)',
      'factors c: (2, 2) at rank=2, but PEFT keeps it full unless rank < 1.0; '
      'expected decompose_both=False.',
    ),
    (  # q_proj's c (4, 4) at r=1 is factored under decompose_both=True.
      'lokr(rank=1)',
      "one decompose_both; 'model.layers.0.self_attn.q_proj' has False",
    ),
  ],
)
def test_lokr_leaves_peft_would_build_otherwise_are_refused(spec, message, tmp_path):
  model, frozen, _, tree, params, buffers = ours(
    [
      (r'layers_0/self_attn/q_proj/kernel', spec),
      (r'layers_1/self_attn/v_proj/kernel', 'lokr(rank=1, decompose_both=True)'),
    ]
  )
  with pytest.raises(pj.PeftError, match=re.escape(message)):
    interop.save_hf_adapter(
      tmp_path, tree, frozen, params, buffers, interop.hf_modules(model)
    )
