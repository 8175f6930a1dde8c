"""PEFT's OFT and BOFT adapter folders: import, export, parity with PEFT.

The fixtures (``tests/fixtures/make_hf_peft_oft_boft.py``, real PEFT on the
tiny Llama of ``hf_peft/llama``): OFT with PEFT's default Cayley–Neumann
series, with the exact Cayley transform (``r`` instead of a block size,
COFT), with one shared block (7 terms); BOFT with two butterfly factors, and
with ``boft_block_num``. Logits and merged weights must equal PEFT's to
float32 round-off; export -> re-import is the identity and writes PEFT's
own tensors.
"""

import re

import jax
import numpy as np
import pytest
import safetensors.numpy

import peft_jax as pj
from peft_jax import interop
from peft_jax._src import paths
from peft_jax.interop import boft as boft_interop
from peft_jax.interop import oft as oft_interop
from tests import references
from tests.interop.hf_peft_test import (
  IDS,
  _written,
  assert_close,
  base,
  edited,
  expected,
  exported_fixture,
  load,
  real_peft_llama_logits,
  real_positions,
)

assert oft_interop.OFT and boft_interop.BOFT  # Registered.
CASES = [
  'llama_oft',
  'llama_oft_cayley_coft',
  'llama_oft_share',
  'llama_boft',
  'llama_boft_blocknum',
]
# Config-wide fields PEFT reads to build each module's rotation.
FLAGS = {
  'OFT': (
    'block_share',
    'use_cayley_neumann',
    'num_cayley_neumann_terms',
    'coft',
    'eps',
    'bias',
  ),
  'BOFT': ('boft_n_butterfly_factor', 'bias'),
}
# (block size field, block count field) per type.
BLOCK_FIELDS = {
  'OFT': ('oft_block_size', 'r'),
  'BOFT': ('boft_block_size', 'boft_block_num'),
}


def resolved(config, d_ins):
  """What PEFT makes of a config: each module's block size (from the size,
  or ``d_in`` / the count), and the config-wide flags."""
  peft_type = config['peft_type']
  size, count = BLOCK_FIELDS[peft_type]
  sizes = {m: config[size] or d_in // config[count] for m, d_in in d_ins.items()}
  return sizes, {f: config[f] for f in FLAGS[peft_type]}


def test_specs_follow_the_config():
  specs = {
    case: sorted({pj.get(s).name for _, s in load(case)[-1].rules}) for case in CASES
  }
  oft_spec = 'oft(block_size={}, block_share={}, neumann_terms={}, coft_eps={}, '
  assert specs['llama_oft'] == [
    oft_spec.format(4, False, 5, 0.0) + "param_dtype='float32')"
  ]
  assert specs['llama_oft_cayley_coft'] == [
    oft_spec.format(b, False, 0, 0.5) + "param_dtype='float32')" for b in (4, 8)
  ]
  assert specs['llama_oft_share'] == [
    oft_spec.format(8, True, 7, 0.0) + "param_dtype='float32')"
  ]
  boft_spec = (
    "boft(block_size={}, n_butterfly_factor={}, scale=True, param_dtype='float32')"
  )
  assert specs['llama_boft'] == [boft_spec.format(4, 2)]
  assert specs['llama_boft_blocknum'] == [boft_spec.format(8, 1)]


@pytest.mark.parametrize('case', CASES)
def test_export_writes_peft_tensors_and_reimports_identically(case, tmp_path):
  _, frozen, _, modules, loaded = load(case)
  folder, config, want_config, tensors = exported_fixture(
    case, tmp_path, frozen, modules, loaded
  )
  names = [n.removeprefix('base_model.model.') for n in tensors]
  adapted = [m for m in modules if any(n.startswith(m + '.') for n in names)]
  kernels = paths.flatten(frozen)
  d_ins = {m: kernels[modules[m]['weight'].path].shape[0] for m in adapted}
  assert resolved(config, d_ins) == resolved(want_config, d_ins)
  assert config['target_modules'] == sorted(want_config['target_modules'])
  again = interop.load_hf_adapter(folder, modules, frozen)
  jax.tree.map(np.testing.assert_array_equal, again.params, loaded.params)
  assert again.rules == loaded.rules


def test_non_skew_boft_blocks_use_their_skew_part(tmp_path):
  """PEFT reads ``½(A − Aᵀ)``; a non-skew ``boft_R`` (e.g. PEFT's
  ``init_weights=False``) gives the same model and is written back skew."""
  _, frozen, forward, modules, loaded = load('llama_boft')
  folder = edited('llama_boft', tmp_path)
  weights = folder / 'adapter_model.safetensors'
  tensors = _written(folder)[1]
  rng = np.random.default_rng(0)
  for name, value in tensors.items():
    if name.endswith('boft_R'):
      symmetric = rng.normal(size=value.shape).astype(np.float32)
      tensors[name] = value + symmetric + np.swapaxes(symmetric, -1, -2)
  safetensors.numpy.save_file(tensors, str(weights))
  noisy = interop.load_hf_adapter(folder, modules, frozen)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
    noisy.params,
    loaded.params,
  )
  want = expected('llama_boft')
  ids, mask = want['input_ids'], want['attention_mask']
  got = forward(noisy.adapter.apply(frozen, noisy.params, noisy.buffers), ids, mask)
  assert_close(real_positions(got, mask), real_positions(want['logits'], mask))


def ours(specs, seed=5):
  """An OFT/BOFT adapter trained here on the fixture's Llama."""
  model, frozen, forward = base('llama')
  tree = pj.by_rules(specs)
  params, buffers = tree.init(jax.random.key(seed), frozen)
  params = references.perturb(params, seed)
  return model, frozen, forward, tree, params, buffers


OURS = {
  'OFT': [
    (r'layers_0/self_attn/(q|v)_proj/kernel', 'oft(block_size=4)'),
    (r'layers_1/mlp/down_proj/kernel', 'oft(block_size=8)'),
  ],
  'BOFT': [
    (r'layers_\d/self_attn/o_proj/kernel', 'boft(block_size=4, n_butterfly_factor=1)'),
    (r'layers_1/mlp/up_proj/kernel', 'boft(block_size=4, n_butterfly_factor=1)'),
  ],
}


@pytest.mark.parametrize('peft_type', ['OFT', 'BOFT'])
def test_exported_folder_loads_in_real_peft(peft_type, tmp_path):
  """Our exact-Cayley OFT (per-module block counts: r=4) and BOFT, run by
  PEFT from the folder we write."""
  model, frozen, forward, tree, params, buffers = ours(OURS[peft_type])
  interop.save_hf_adapter(
    tmp_path, tree, frozen, params, buffers, interop.hf_modules(model)
  )
  theirs = real_peft_llama_logits(tmp_path)
  mine = forward(tree.apply(frozen, params, buffers), IDS, np.ones_like(IDS))
  assert_close(np.asarray(mine), theirs)


def test_mixed_block_sizes_export_as_block_counts(tmp_path):
  model, frozen, *_, tree, params, buffers = ours(OURS['OFT'])
  config, _ = _written(
    interop.save_hf_adapter(
      tmp_path, tree, frozen, params, buffers, interop.hf_modules(model)
    )
  )
  assert (config['r'], config['oft_block_size']) == (4, 0)
  assert config['use_cayley_neumann'] is False and config['coft'] is False


# ---------------------------------------------------------------------------
# What PEFT can express and we cannot (or the reverse): one-line errors.


@pytest.mark.parametrize(
  ('case', 'changes', 'message'),
  [
    (
      'llama_oft',
      {'bias': 'all'},
      "OFT option bias='all' is not supported; expected 'none'.",
    ),
    (
      'llama_oft',
      {'fan_in_fan_out': True},
      'OFT option fan_in_fan_out=True is not supported',
    ),
    ('llama_oft', {'coft': True, 'eps': 0.0}, 'eps=0.0 with coft=True; expected > 0'),
    ('llama_oft', {'block_share': True}, 'with block_share'),
    (
      'llama_boft',
      {'bias': 'boft_only'},
      "BOFT option bias='boft_only' is not supported",
    ),
    (
      'llama_boft',
      {'boft_n_butterfly_factor': 3},
      'expected boft_n_butterfly_factor=3',
    ),
  ],
)
def test_unsupported_configs_are_named(case, changes, message, tmp_path):
  model, frozen, _ = base('llama')
  folder = edited(case, tmp_path, **changes)
  with pytest.raises(pj.PeftError, match=re.escape(message)):
    interop.load_hf_adapter(folder, interop.hf_modules(model), frozen)


@pytest.mark.parametrize(
  ('specs', 'message'),
  [
    (
      [(r'layers_0/self_attn/o_proj/kernel', 'boft(block_size=4, scale=False)')],
      'PEFT always learns boft_s, expected scale=True',
    ),
    (
      [
        (r'layers_0/self_attn/q_proj/kernel', 'oft(block_size=4)'),
        (r'layers_0/self_attn/v_proj/kernel', 'oft(block_size=4, neumann_terms=5)'),
      ],
      'one neumann_terms',
    ),
    (
      [
        (r'layers_0/self_attn/q_proj/kernel', 'oft(block_size=4)'),
        (r'layers_0/mlp/down_proj/kernel', 'oft(block_size=16)'),
      ],
      'one oft_block_size or one r for all modules',
    ),
  ],
)
def test_unwritable_adapters_are_named(specs, message, tmp_path):
  model, frozen, *_, tree, params, buffers = ours(specs)
  with pytest.raises(pj.PeftError, match=re.escape(message)):
    interop.save_hf_adapter(
      tmp_path, tree, frozen, params, buffers, interop.hf_modules(model)
    )
