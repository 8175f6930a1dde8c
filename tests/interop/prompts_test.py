"""PEFT's prompt tuning, P-tuning, prefix tuning and adaption prompt folders
on our Llama.

The fixtures (``tests/fixtures/make_hf_peft_prompts.py``) were written by
real PEFT on the tiny Llama ``hf_peft/llama``; ``hf_peft_test`` checks their
logits against ours. Here: what each folder reads as, export writes PEFT's
tensors bit for bit and re-imports identically, our ``p_tuning`` exports as
its prompt, our reparametrised prefix exports as the prefix its MLP makes,
and what PEFT cannot hold (a gated or partial prefix, non-causal task types)
is refused with one line.
"""

import re

import jax
import numpy as np
import pytest

import peft_jax as pj
from peft_jax import interop
from peft_jax.methods import p_tuning
from tests import references
from tests.interop.hf_peft_test import (
  FIXTURES,
  _written,
  assert_close,
  base,
  edited,
  exported_fixture,
)

CASES = [
  'llama_prompt_tuning',
  'llama_p_tuning',
  'llama_adaption_prompt',
  'llama_prefix_tuning',
  'llama_prefix_projection',
]
IDS = np.array([[3, 9, 27, 4, 1, 60], [5, 7, 2, 8, 11, 13]], np.int32)
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], np.int32)


def setup(case: str = 'llama'):
  """``(model, frozen, forward, modules, hooks)`` of the tiny Llama."""
  model, frozen, forward = base(case)
  return model, frozen, forward, interop.hf_modules(model), pj.hook_points(model, IDS)


def read(folder):
  _, frozen, _, modules, hooks = setup()
  return interop.load_hf_adapter(folder, modules, frozen, hooks)


def specs(loaded) -> dict[str, str]:
  return {selector: pj.get(spec).name for selector, spec in loaded.rules}


def test_each_type_reads_as_our_method():
  """P-tuning's file holds the encoder's output: it is prompt tuning."""
  assert specs(read(FIXTURES / 'llama_prompt_tuning' / 'adapter')) == {
    'input_embeddings': pj.get('prompt_tuning(length=4)').name
  }
  assert specs(read(FIXTURES / 'llama_p_tuning' / 'adapter')) == {
    'input_embeddings': pj.get('prompt_tuning(length=3)').name
  }
  loaded = read(FIXTURES / 'llama_adaption_prompt' / 'adapter')
  assert specs(loaded) == {
    'layers_1/self_attn/adaption_prompt': pj.get('adaption_prompt(length=3)').name
  }
  assert loaded.params['layers_1']['self_attn']['adaption_prompt'].gate.shape == ()
  # A prefix per layer, flat (PEFT saves the projection's output).
  for case, length in [('llama_prefix_tuning', 3), ('llama_prefix_projection', 2)]:
    loaded = read(FIXTURES / case / 'adapter')
    spec = pj.get(f'prefix_tuning(length={length}, bottleneck=None)').name
    assert specs(loaded) == {
      '(layers_0/self_attn/attention_kv|layers_1/self_attn/attention_kv)': spec
    }
    prefix = loaded.params['layers_1']['self_attn']['attention_kv']
    assert prefix.keys.shape == prefix.values.shape == (length, 2, 4)


@pytest.mark.parametrize('case', CASES)
def test_export_writes_peft_tensors_and_reimports_identically(case, tmp_path):
  _, frozen, _, modules, _ = setup()
  loaded = read(FIXTURES / case / 'adapter')
  folder, config, want_config, _ = exported_fixture(
    case, tmp_path, frozen, modules, loaded
  )
  # P-tuning is written as what it is once read: a prompt-tuning prompt.
  assert config['peft_type'] == want_config['peft_type'].replace('P_', 'PROMPT_')
  fields = ['task_type', 'num_virtual_tokens', 'token_dim', 'adapter_len']
  fields.append('adapter_layers')
  if 'prefix' in case:
    fields += ['num_layers', 'num_attention_heads']
  for field in fields:
    assert config.get(field) == want_config.get(field), field
  again = read(folder)
  assert again.rules == loaded.rules
  jax.tree.map(np.testing.assert_array_equal, again.params, loaded.params)


def test_our_p_tuning_exports_as_its_prompt(tmp_path):
  """``encode(params)`` as ``prompt_embeddings``; the re-imported prompt
  tuning is the same model."""
  _, frozen, forward, modules, hooks = setup()
  tree = pj.by_rules([('input_embeddings', 'p_tuning(length=3, hidden=8)')])
  params, buffers = tree.init(jax.random.key(1), frozen, hooks)
  folder = interop.save_hf_adapter(tmp_path, tree, frozen, params, buffers, modules)
  config, tensors = _written(folder)
  assert config['peft_type'] == 'PROMPT_TUNING'
  assert config['task_type'] == 'CAUSAL_LM'
  np.testing.assert_array_equal(
    tensors['prompt_embeddings'], p_tuning.encode(params['input_embeddings'])
  )
  again = read(folder)
  mine = pj.adapted(tree, forward)(frozen, params, buffers, IDS, MASK)
  back = pj.adapted(again.adapter, forward)(
    frozen, again.params, again.buffers, IDS, MASK
  )
  assert_close(np.asarray(back), np.asarray(mine))


KV = r'layers_\d/self_attn/attention_kv'


def ours(frozen, hooks, seed: int = 2):
  """Prompt tuning (``l = 4``), adaption prompts in the top layer, a flat
  prefix and a reparametrised one (``l = 3``), with random values (gates
  away from 0)."""
  prompt = pj.by_rules([('input_embeddings', 'prompt_tuning(length=4)')])
  adaption = pj.by_rules(
    [('layers_1/self_attn/adaption_prompt', 'adaption_prompt(length=2)')]
  )
  flat = pj.by_rules([(KV, 'prefix_tuning(length=3, bottleneck=None)')])
  mlp = pj.by_rules([(KV, 'prefix_tuning(length=3, bottleneck=5)')])
  trees = []
  for tree in (prompt, adaption, flat, mlp):
    params, buffers = tree.init(jax.random.key(seed), frozen, hooks)
    trees.append((tree, references.perturb(params, seed), buffers))
  return trees


def test_exported_folders_load_in_real_peft(tmp_path):
  torch = pytest.importorskip('torch')
  peft = pytest.importorskip('peft')
  transformers = pytest.importorskip('transformers')
  _, frozen, forward, modules, hooks = setup()
  for i, (tree, params, buffers) in enumerate(ours(frozen, hooks)):
    folder = interop.save_hf_adapter(
      tmp_path / str(i), tree, frozen, params, buffers, modules
    )
    base_model = transformers.LlamaForCausalLM.from_pretrained(str(FIXTURES / 'llama'))
    adapted = peft.PeftModel.from_pretrained(base_model, str(folder)).eval()
    with torch.no_grad():
      theirs = adapted(
        input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)
      ).logits.numpy()
    mine = pj.adapted(tree, forward)(frozen, params, buffers, IDS, MASK)
    real = MASK.astype(bool)
    assert_close(np.asarray(mine)[real], theirs[:, -IDS.shape[1] :][real])


# ---------------------------------------------------------------------------
# Refusals: one-line errors.


def one_line(error) -> str:
  message = str(error.value)
  assert '\n' not in message
  return message


def test_our_prefixes_export_as_peft_prefixes(tmp_path):
  """Flat or made by the MLP, the prefix re-imports as the same model."""
  _, frozen, forward, modules, hooks = setup()
  for i, (tree, params, buffers) in enumerate(ours(frozen, hooks)[2:]):
    folder = interop.save_hf_adapter(
      tmp_path / str(i), tree, frozen, params, buffers, modules
    )
    config, tensors = _written(folder)
    assert config['peft_type'] == 'PREFIX_TUNING'
    assert (config['num_layers'], config['num_virtual_tokens']) == (2, 3)
    assert tensors['prompt_embeddings'].shape == (3, 2 * 2 * 8)
    again = read(folder)
    mine = pj.adapted(tree, forward)(frozen, params, buffers, IDS, MASK)
    back = pj.adapted(again.adapter, forward)(
      frozen, again.params, again.buffers, IDS, MASK
    )
    assert_close(np.asarray(back), np.asarray(mine))


def test_prefixes_peft_cannot_hold_are_refused(tmp_path):
  _, frozen, _, modules, hooks = setup()
  for spec, message in [
    ('prefix_tuning(length=2, gated=True)', 'gated prefix tuning at'),
    ('prefix_tuning(length=2)', 'prefix tuning in layers [0] of 2'),
  ]:
    selector = KV if 'gated' in spec else 'layers_0/self_attn/attention_kv'
    tree = pj.by_rules([(selector, spec)])
    params, buffers = tree.init(jax.random.key(0), frozen, hooks)
    with pytest.raises(pj.PeftError) as error:
      interop.save_hf_adapter(tmp_path, tree, frozen, params, buffers, modules)
    assert message in one_line(error)
  folder = edited('llama_prefix_tuning', tmp_path, num_layers=3)
  with pytest.raises(pj.PeftError) as error:
    read(folder)
  assert 'num_layers=3; this model (2 layers, 2 key/value heads of 4)' in one_line(
    error
  )


@pytest.mark.parametrize('case', CASES)
def test_other_task_types_are_refused(case, tmp_path):
  _, frozen, _, modules, hooks = setup()
  folder = edited(case, tmp_path, task_type='SEQ_CLS')
  with pytest.raises(pj.PeftError) as error:
    interop.load_hf_adapter(folder, modules, frozen, hooks)
  assert "with task_type 'SEQ_CLS' is not supported" in one_line(error)
  loaded = read(FIXTURES / case / 'adapter')
  with pytest.raises(pj.PeftError) as error:
    interop.save_hf_adapter(
      tmp_path / 'out',
      loaded.adapter,
      frozen,
      loaded.params,
      loaded.buffers,
      modules,
      task_type='SEQ_CLS',
    )
  assert "with task_type 'SEQ_CLS' is not supported" in one_line(error)


def test_missing_hooks_low_adaption_layers_and_saved_modules_are_named(tmp_path):
  _, frozen, _, modules, hooks = setup()
  with pytest.raises(pj.PeftError) as error:
    interop.load_hf_adapter(FIXTURES / 'llama_p_tuning' / 'adapter', modules, frozen)
  assert 'pass hooks=pj.hook_points(model, ids)' in one_line(error)
  tree = pj.by_rules(
    [('layers_0/self_attn/adaption_prompt', 'adaption_prompt(length=2)')]
  )
  params, buffers = tree.init(jax.random.key(0), frozen, hooks)
  with pytest.raises(pj.PeftError) as error:
    interop.save_hf_adapter(tmp_path, tree, frozen, params, buffers, modules)
  assert 'in the top adapter_layers=1 layers' in one_line(error)
  rules = [
    ('input_embeddings', 'prompt_tuning(length=2)'),
    ('lm_head/kernel', 'full()'),
  ]
  tree = pj.by_rules(rules)
  params, buffers = tree.init(jax.random.key(0), frozen, hooks)
  with pytest.raises(pj.PeftError) as error:
    interop.save_hf_adapter(tmp_path, tree, frozen, params, buffers, modules)
  assert "PROMPT_TUNING with modules_to_save ('lm_head') is not" in one_line(error)


def test_wrong_prompt_length_is_named(tmp_path):
  folder = edited('llama_prompt_tuning', tmp_path, num_virtual_tokens=5)
  with pytest.raises(pj.PeftError, match=re.escape('num_virtual_tokens=5 needs (5,')):
    read(folder)
