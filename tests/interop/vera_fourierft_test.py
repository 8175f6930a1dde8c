"""PEFT's VERA and FOURIERFT adapter folders: import, export, parity with PEFT.

The fixtures (``tests/fixtures/make_hf_peft_vera_fourierft.py``: real PEFT
on the tiny Llama, every trainable tensor random) hold the adapted model's
logits and merged weights, and FourierFT's frequency indices, which the
adapter file does not store and ``fourierft`` recomputes.
"""

import re

import jax
import numpy as np
import pytest

import peft_jax as pj
from peft_jax import interop
from peft_jax.interop import fourierft as fourierft_interop  # registers
from peft_jax.interop import vera as vera_interop  # noqa: F401 (registers)
from peft_jax.methods.fourierft import frequencies
from tests.interop.hf_peft_test import (
  FIXTURES,
  _written,
  base,
  edited,
  expected,
  exported_fixture,
  round_trip_logits,
)

CASES = ['llama_vera', 'llama_fourierft']


def load(case: str, folder=None):
  model, frozen, forward = base('llama')
  modules = interop.hf_modules(model)
  folder = folder or FIXTURES / case / 'adapter'
  return frozen, forward, modules, interop.load_hf_adapter(folder, modules, frozen)


def test_fourierft_frequencies_are_peft_randperm():
  want = expected('llama_fourierft')
  config, _ = _written(FIXTURES / 'llama_fourierft' / 'adapter')
  checked = 0
  for key, indices in want.items():
    if key.startswith('indices/'):
      d_out, d_in = want[f'merged/{key.removeprefix("indices/")}.weight'].shape
      rows, cols = frequencies(config['random_loc_seed'], indices.shape[1], d_in, d_out)
      np.testing.assert_array_equal(np.stack([rows, cols]), indices)
      checked += 1
  assert checked == 6


def test_vera_projections_are_one_sliced_pair():
  _, _, _, loaded = load('llama_vera')
  _, tensors = _written(FIXTURES / 'llama_vera' / 'adapter')
  for buffers in jax.tree.leaves(loaded.buffers, is_leaf=lambda b: hasattr(b, 'a')):
    np.testing.assert_array_equal(buffers.a, tensors['base_model.vera_A'].T)
    np.testing.assert_array_equal(buffers.b, tensors['base_model.vera_B'].T)


@pytest.mark.parametrize('case', CASES)
def test_export_writes_peft_tensors_and_reimports_identically(case, tmp_path):
  frozen, _, modules, loaded = load(case)
  folder, config, want_config, tensors = exported_fixture(
    case, tmp_path, frozen, modules, loaded
  )
  fields = ['peft_type', 'r', 'd_initial', 'projection_prng_key', 'save_projection']
  fields += ['scaling', 'random_loc_seed', 'bias', 'fan_in_fan_out']
  assert {k: config.get(k) for k in fields} == {k: want_config.get(k) for k in fields}
  adapted = sorted(
    {n.removeprefix('base_model.model.').rpartition('.')[0] for n in tensors}
  )
  if case == 'llama_fourierft':  # PEFT's per-module n_frequency.
    for name in adapted:
      assert fourierft_interop.n_frequency(
        config, name
      ) == fourierft_interop.n_frequency(want_config, name)
  again = interop.load_hf_adapter(folder, modules, frozen)
  jax.tree.map(np.testing.assert_array_equal, again.params, loaded.params)
  jax.tree.map(np.testing.assert_array_equal, again.buffers, loaded.buffers)
  assert again.rules == loaded.rules


def ours(rules):
  model, frozen, forward = base('llama')
  tree = pj.by_rules(rules)
  params, buffers = tree.init(jax.random.key(2), frozen)
  params = jax.tree.map(lambda p: p + 0.3, params)
  return model, frozen, forward, tree, params, buffers


OUR_RULES = {
  'VERA': [
    (
      r'layers_\d/self_attn/(q|k)_proj/kernel',
      'vera(rank=3, seed=4, shared_shape=(32, 16))',
    ),
    (r'layers_1/mlp/down_proj/kernel', 'vera(rank=3, seed=4, shared_shape=(32, 16))'),
  ],
  'FOURIERFT': [
    (r'layers_\d/self_attn/(q|v)_proj/kernel', 'fourierft(n_frequency=7, scaling=9.0)'),
    (r'layers_0/mlp/up_proj/kernel', 'fourierft(n_frequency=11, scaling=9.0)'),
  ],
}


@pytest.mark.parametrize('peft_type', sorted(OUR_RULES))
def test_our_adapter_exports_and_reimports(peft_type, tmp_path):
  model, frozen, forward, tree, params, buffers = ours(OUR_RULES[peft_type])
  modules = interop.hf_modules(model)
  folder = interop.save_hf_adapter(tmp_path, tree, frozen, params, buffers, modules)
  config, tensors = _written(folder)
  assert config['peft_type'] == peft_type
  if peft_type == 'VERA':
    assert tensors['base_model.vera_A'].shape == (3, 32)
  else:
    assert config['n_frequency'] == 7 and config['n_frequency_pattern'] == {
      r'layers\.0\.mlp\.up_proj': 11
    }
  again = interop.load_hf_adapter(folder, modules, frozen)
  np.testing.assert_array_equal(
    *round_trip_logits(forward, frozen, again, tree, params, buffers)
  )


@pytest.mark.parametrize(
  ('case', 'changes', 'message'),
  [
    (
      'llama_vera',
      {'save_projection': False},
      'save_projection=False is not supported',
    ),
    ('llama_vera', {'fan_in_fan_out': True}, 'fan_in_fan_out=True is not supported'),
    ('llama_vera', {'r': 3}, 'do not have r=3'),
    ('llama_fourierft', {'bias': 'all'}, "bias='all' is not supported"),
    ('llama_fourierft', {'n_frequency_pattern': {}}, 'n_frequency_pattern give 20'),
  ],
)
def test_unsupported_configs_are_named(case, changes, message, tmp_path):
  model, frozen, _ = base('llama')
  folder = edited(case, tmp_path, **changes)
  with pytest.raises(pj.PeftError, match=re.escape(message)) as error:
    interop.load_hf_adapter(folder, interop.hf_modules(model), frozen)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize(
  ('rules', 'message'),
  [
    (
      [('layers_0/self_attn/q_proj/kernel', 'vera(rank=2)')],
      'uses vera without shared_shape',
    ),
    (
      [
        ('layers_0/self_attn/q_proj/kernel', 'vera(rank=2, shared_shape=(16, 16))'),
        ('layers_0/mlp/up_proj/kernel', 'vera(rank=2, shared_shape=(16, 32))'),
      ],
      "needs a different 'vera_B' than earlier leaves",
    ),
    (
      [
        ('layers_0/self_attn/q_proj/kernel', 'fourierft(n_frequency=4)'),
        ('layers_0/self_attn/v_proj/kernel', 'fourierft(n_frequency=4, seed=1)'),
      ],
      'one random_loc_seed',
    ),
  ],
)
def test_exports_peft_cannot_hold_are_refused(rules, message, tmp_path):
  model, frozen, _, tree, params, buffers = ours(rules)
  with pytest.raises(pj.PeftError, match=re.escape(message)) as error:
    interop.save_hf_adapter(
      tmp_path, tree, frozen, params, buffers, interop.hf_modules(model)
    )
  assert '\n' not in str(error.value)
