"""PEFT's ADALORA and LN_TUNING adapter folders: import, export, parity.

The fixtures (``tests/fixtures/make_hf_peft_adalora_ln.py``) were written by
real PEFT on the tiny Llama and BERT of ``hf_peft/``: AdaLoRA before and
after budget pruning (``rank_pattern`` masks, resized tensors) and LN
tuning of Llama's RMSNorms and of BERT's LayerNorms (weight and bias). Our
logits and merged weights must equal PEFT's to float32 round-off; export
must write PEFT's tensors and re-import to the same adapter.

BERT's LayerNorms are read and written per parameter (``scale`` and
``bias``: ``HfMethod.per_param``).
"""

import re

import jax
import numpy as np
import pytest

import peft_jax as pj
from peft_jax import interop
from peft_jax._src import paths
from peft_jax.interop import adalora as hf_adalora
from peft_jax.interop import ln_tuning as hf_ln_tuning
from tests import references
from tests.interop.hf_peft_test import (
  FIXTURES,
  _written,
  assert_close,
  base,
  edited,
  exported_fixture,
  round_trip_logits,
)

CASES = ['llama_adalora', 'llama_adalora_pruned', 'llama_ln_tuning', 'bert_ln_tuning']


def load(case: str):
  model, frozen, forward = base(case)
  modules = interop.hf_modules(model)
  loaded = interop.load_hf_adapter(FIXTURES / case / 'adapter', modules, frozen)
  return model, frozen, forward, modules, loaded


def test_pruned_ranks_are_zeros_of_e():
  """PEFT's rank_pattern masks become zeros of ``e`` (and of ``a``, ``b``)
  at the pruned slots of the initial rank; the scale keeps ``init_r``."""
  *_, modules, loaded = load('llama_adalora_pruned')
  config = loaded.config
  for name in ['model.layers.0.self_attn.q_proj', 'model.layers.1.mlp.down_proj']:
    kept = np.array(config['rank_pattern'][f'{name}.lora_E'])
    leaf = modules[name]['weight'].path
    params = paths.flatten(loaded.params)
    e = np.asarray(params[f'{leaf}/e'])
    assert e.shape == (4,) and (e[~kept] == 0).all() and (e[kept] != 0).all()
    assert (np.asarray(params[f'{leaf}/a'])[:, ~kept] == 0).all()
  assert all('adalora(rank=4, alpha=6.0' in pj.get(s).name for _, s in loaded.rules)


def _resolved(config, modules):
  """What PEFT makes of a config, per module: AdaLoRA's kept-rank mask, LN
  tuning's targeting; plus the config-wide values that act."""
  if config['peft_type'] == 'ADALORA':
    init_r = config['init_r']
    per_module = {m: tuple(hf_adalora.kept_ranks(config, m, init_r)) for m in modules}
    return per_module, (init_r, config['lora_alpha'], config['orth_reg_weight'])
  return {m: interop.is_target(config['target_modules'], m) for m in modules}, ()


@pytest.mark.parametrize('case', CASES)
def test_export_writes_peft_tensors_and_reimports_identically(case, tmp_path):
  _, frozen, _, modules, loaded = load(case)
  folder, config, want_config, _ = exported_fixture(
    case, tmp_path, frozen, modules, loaded
  )
  assert _resolved(config, modules) == _resolved(want_config, modules)
  again = interop.load_hf_adapter(folder, modules, frozen)
  jax.tree.map(np.testing.assert_array_equal, again.params, loaded.params)
  assert again.rules == loaded.rules


def test_our_pruned_adalora_exports_a_rank_pattern(tmp_path):
  """Zeros of ``e`` (as ``adalora_schedule`` masks) are written as PEFT's
  pruned form; re-import gives the same function and kept values."""
  model, frozen, forward = base('llama')
  modules = interop.hf_modules(model)
  tree = pj.by_rules(
    [(r'layers_\d/self_attn/(q|v)_proj/kernel', 'adalora(rank=3, alpha=5.0)')]
  )
  params, buffers = tree.init(jax.random.key(0), frozen)
  params = references.perturb(params, 1)
  q0, v1 = 'layers_0/self_attn/q_proj/kernel', 'layers_1/self_attn/v_proj/kernel'
  q0_params, v1_params = paths.subtree(params, q0), paths.subtree(params, v1)
  params = paths.replace(
    params,
    {
      q0: q0_params._replace(e=q0_params.e.at[1].set(0)),
      v1: v1_params._replace(e=0 * v1_params.e),
    },
  )
  folder = interop.save_hf_adapter(tmp_path, tree, frozen, params, buffers, modules)
  config, tensors = _written(folder)
  assert config['rank_pattern'] == {
    'model.layers.0.self_attn.q_proj.lora_E': [True, False, True],
    'model.layers.1.self_attn.v_proj.lora_E': [False, False, False],
  }
  ranks = {
    name: tensors[f'base_model.model.model.layers.{name}.lora_A'].shape[0]
    for name in ['0.self_attn.q_proj', '1.self_attn.q_proj', '1.self_attn.v_proj']
  }
  assert ranks == {
    '0.self_attn.q_proj': 2,
    '1.self_attn.q_proj': 3,
    '1.self_attn.v_proj': 0,
  }
  again = interop.load_hf_adapter(folder, modules, frozen)
  assert_close(*round_trip_logits(forward, frozen, again, tree, params, buffers))


# ---------------------------------------------------------------------------
# Bad input: one-line errors naming the value.


@pytest.mark.parametrize(
  ('case', 'changes', 'message'),
  [
    ('llama_adalora', {'fan_in_fan_out': True}, 'fan_in_fan_out=True is not supported'),
    ('llama_adalora', {'bias': 'all'}, "bias='all' is not supported"),
    ('llama_adalora', {'init_r': 5}, 'expected rank 5 (init_r/rank_pattern)'),
    (
      'llama_adalora',
      {'rank_pattern': {'model.layers.0.self_attn.q_proj.lora_E': 2}},
      'expected a list of 4 booleans',
    ),
    ('llama_adalora_pruned', {'lora_alpha': 0}, 'expected lora_alpha > 0'),
  ],
)
def test_unsupported_configs_are_named(case, changes, message, tmp_path):
  model, frozen, _ = base(case)
  folder = edited(case, tmp_path, **changes)
  with pytest.raises(pj.PeftError, match=re.escape(message)):
    interop.load_hf_adapter(folder, interop.hf_modules(model), frozen)


def test_ln_tuning_of_a_linear_module_is_refused():
  model, _, _ = base('llama')
  row = interop.hf_modules(model)['model.layers.0.self_attn.q_proj']['weight']
  with pytest.raises(pj.PeftError, match=re.escape('norm modules only')):
    hf_ln_tuning.read(
      {},
      'model.layers.0.self_attn.q_proj',
      {'ln_tuning_layers.weight': np.zeros((16, 16))},
      {'weight': row},
      {},
    )


@pytest.mark.parametrize(
  ('spec', 'message'),
  [
    ("adalora(rank=2, reg_form='squared')", "reg_form='squared'"),
    ('adalora(rank=2, alpha=0.0)', 'expected lora_alpha > 0'),
  ],
)
def test_adalora_options_peft_lacks_are_refused(spec, message, tmp_path):
  model, frozen, _ = base('llama')
  leaf = 'layers_0/self_attn/q_proj/kernel'
  tree = pj.by_rules([(leaf, spec)])
  params, buffers = tree.init(jax.random.key(0), frozen)
  one_kept = paths.subtree(params, leaf)._replace(e=jax.numpy.array([1.0, 0.0]))
  params = paths.replace(params, {leaf: one_kept})
  with pytest.raises(pj.PeftError, match=re.escape(message)):
    interop.save_hf_adapter(
      tmp_path, tree, frozen, params, buffers, interop.hf_modules(model)
    )
