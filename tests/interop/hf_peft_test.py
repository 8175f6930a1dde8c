"""Hugging Face PEFT adapter folders: import, export, and parity with PEFT.

The fixtures (``tests/fixtures/hf_peft/``) were written by real PEFT
(``tests/fixtures/make_hf_peft_adapters.py``: tiny random Llama and BERT
models, one adapter folder per case with every adapter tensor random, the
adapted model's logits and the weights after ``merge_and_unload``). Our
loader reads each folder onto our model loaded from the same base folder;
the logits and merged weights must equal PEFT's to float32 round-off.
Export -> re-import must be the identity, and the exported tensors must be
PEFT's own (same names, same values). Where torch and peft import, the
exported folder is also loaded by ``peft.PeftModel.from_pretrained``.
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
from peft_jax._src import paths
from peft_jax.models import bert, deberta, llama
from tests import references

FIXTURES = pathlib.Path(__file__).parents[1] / 'fixtures' / 'hf_peft'
# Every fixture case on a tiny model (the fixture scripts' folders with an
# expected.npz; smollm2_lora is the slow test's), named <base model>_<case>.
CASES = sorted(
  path.parent.name
  for path in FIXTURES.glob('*/expected.npz')
  if path.parent.name != 'smollm2_lora'
)
# The fast suite (`make test-fast`) checks these cases, one per module
# family and kind of type (additive, rescaled, activation-side, task heads);
# `make test` checks every case. The per-type test files check their own.
FAST_CASES = {
  'llama_lora',
  'llama_dora',
  'llama_ia3',
  'bert_lora_cls',
  'roberta_lora_cls',
  'deberta_lora_cls',
  'llama_cls_lora',
  'llama_prefix_tuning',
}
TOLERANCE = 1e-5


def fast_cases(names):
  """``names`` as parameters, those outside ``FAST_CASES`` marked slow."""
  return references.slow_unless(names, FAST_CASES)


# Types whose adapters act at hook points (load_hf_adapter needs hooks).
ACTIVATION_TYPES = ('PROMPT_TUNING', 'P_TUNING', 'PREFIX_TUNING', 'ADAPTION_PROMPT')


def base(case: str):
  """``(model, frozen, forward)`` of the case's base model, loaded from the
  fixture's transformers folder by our loaders."""
  if case.startswith('llama_cls'):
    config, frozen = llama.load_hf_classifier(FIXTURES / 'llama_cls')
    labels = frozen['score']['kernel'].shape[1]
    model = llama.LlamaForSequenceClassification(config, labels)
    forward = lambda p, ids, mask: model.apply({'params': p}, ids, attention_mask=mask)
  elif case.startswith(('llama', 'qwen2')):
    config, frozen = llama.load_hf(FIXTURES / case.split('_')[0])
    model = llama.LlamaForCausalLM(config)
    forward = lambda p, ids, mask: model.apply({'params': p}, ids, attention_mask=mask)
  elif case.startswith(('bert', 'roberta')):
    config, frozen = bert.load_hf_classifier(FIXTURES / case.split('_')[0])
    labels = frozen['classifier']['bias'].shape[0]
    model = bert.BertForSequenceClassification(config, labels, pooling='cls')
    forward = lambda p, ids, mask: model.apply({'params': p}, ids, mask)
  else:
    config, frozen = deberta.load_hf_classifier(FIXTURES / 'deberta')
    labels = frozen['classifier']['bias'].shape[0]
    model = deberta.DebertaV2ForSequenceClassification(config, labels)
    forward = lambda p, ids, mask: model.apply({'params': p}, ids, mask)
  return model, frozen, jax.jit(forward)


def expected(case: str) -> dict[str, np.ndarray]:
  with np.load(FIXTURES / case / 'expected.npz') as data:
    return {k: data[k] for k in data.files}


def real_positions(logits, mask):
  """Llama's logits at real tokens only (PEFT's padded positions differ, and
  under prompt learning its logits start with the virtual positions)."""
  logits = np.asarray(logits)
  if logits.ndim != 3:
    return logits
  return logits[:, logits.shape[1] - mask.shape[1] :][mask.astype(bool)]


def assert_close(actual, desired):
  scale = max(1.0, float(np.abs(desired).max()))
  np.testing.assert_allclose(actual, desired, rtol=0, atol=TOLERANCE * scale)


def load(case: str):
  model, frozen, forward = base(case)
  modules = interop.hf_modules(model)
  hooks = (
    pj.hook_points(model, expected(case)['input_ids'])
    if peft_type(case) in ACTIVATION_TYPES
    else None
  )
  folder = FIXTURES / case / 'adapter'
  loaded = interop.load_hf_adapter(folder, modules, frozen, hooks)
  return model, frozen, forward, modules, loaded


@pytest.mark.parametrize('case', fast_cases(CASES))
def test_logits_equal_peft(case):
  _, frozen, forward, _, loaded = load(case)
  want = expected(case)
  ids, mask = want['input_ids'], want['attention_mask']
  adapted = pj.adapted(loaded.adapter, forward)
  got = adapted(frozen, loaded.params, loaded.buffers, ids, mask)
  assert_close(real_positions(got, mask), real_positions(want['logits'], mask))
  # The adapter matters: without it the logits are far from PEFT's.
  plain = forward(frozen, ids, mask)
  assert (
    np.abs(real_positions(plain, mask) - real_positions(want['logits'], mask)).max()
    > 0.05
  )


@pytest.mark.parametrize(
  'case',
  fast_cases([c for c in CASES if any(k.startswith('merged/') for k in expected(c))]),
)
def test_merged_weights_equal_peft_merge_and_unload(case):
  """Every ``merged/<module>.<param>`` PEFT stored (linear weights, and norms
  where a case trains them) against ``pj.merge``, in PEFT's layout."""
  _, frozen, _, modules, loaded = load(case)
  merged = pj.merge(loaded.adapter, frozen, loaded.params, loaded.buffers)
  merged = paths.flatten(merged)
  compared = 0
  for key, weight in expected(case).items():
    name, _, param = key.removeprefix('merged/').rpartition('.')
    row = modules.get(name, {}).get(param)
    if key.startswith('merged/') and row is not None:
      ours = np.asarray(merged[row.path])
      assert_close(ours if row.transform is None else row.transform(ours), weight)
      compared += 1
  assert compared >= 10


def test_rules_follow_the_config():
  """rank_pattern / alpha_pattern resolve per module as PEFT resolves them;
  layers_to_transform and exclude_modules leave the other modules frozen."""
  *_, loaded = load('llama_lora')
  specs = {}
  for selector, spec in loaded.rules:
    for leaf in selector.strip('()').split('|'):
      specs[leaf.replace('\\', '')] = pj.get(spec).name
  q0 = specs['layers_0/self_attn/q_proj/kernel']
  assert 'rank=2' in q0 and 'alpha=8.0' in q0
  assert 'rank=3' in specs['layers_1/mlp/down_proj/kernel']
  assert 'rank=4' in specs['layers_0/mlp/down_proj/kernel']
  assert 'alpha=3.0' in specs['layers_1/self_attn/v_proj/kernel']
  assert 'alpha=5.0' in specs['layers_0/self_attn/o_proj/kernel']
  assert len(specs) == 14
  *_, layered = load('llama_rslora_layers')
  leaves = sorted(re.sub(r'\\', '', s).strip('()') for s, _ in layered.rules)
  assert leaves == [
    'layers_1/mlp/up_proj/kernel|layers_1/self_attn/q_proj/kernel|'
    'layers_1/self_attn/v_proj/kernel'
  ]
  assert 'rslora=True' in pj.get(layered.rules[0][1]).name


def _written(folder) -> tuple[dict, dict]:
  config = json.loads((folder / 'adapter_config.json').read_text())
  return config, safetensors.numpy.load_file(folder / 'adapter_model.safetensors')


IDS = np.array([[3, 9, 27, 4, 1, 60]])  # One unpadded row for round trips.


def exported_fixture(case, tmp_path, frozen, modules, loaded):
  """``loaded`` written back by ``save_hf_adapter``, checked to hold PEFT's
  tensors of the fixture bit for bit (same names, same values); returns
  ``(folder, config, fixture config, tensors)``."""
  folder = interop.save_hf_adapter(
    tmp_path / case, loaded.adapter, frozen, loaded.params, loaded.buffers, modules
  )
  config, tensors = _written(folder)
  want_config, want_tensors = _written(FIXTURES / case / 'adapter')
  assert sorted(tensors) == sorted(want_tensors)
  for name, value in want_tensors.items():
    np.testing.assert_array_equal(tensors[name], value, err_msg=name)
  return folder, config, want_config, tensors


def round_trip_logits(forward, frozen, again, tree, params, buffers):
  """``(re-imported, original)`` logits on ``IDS``: ``again`` is what
  ``load_hf_adapter`` made of the folder written from the other three."""
  mask = np.ones_like(IDS)
  return (
    np.asarray(
      forward(again.adapter.apply(frozen, again.params, again.buffers), IDS, mask)
    ),
    np.asarray(forward(tree.apply(frozen, params, buffers), IDS, mask)),
  )


def real_peft_llama_logits(folder):
  """Real PEFT's logits on ``IDS`` for ``folder`` on the tiny Llama
  (``PeftModel.from_pretrained``); skips the test without torch and peft."""
  torch = pytest.importorskip('torch')
  peft = pytest.importorskip('peft')
  transformers = pytest.importorskip('transformers')
  base_model = transformers.LlamaForCausalLM.from_pretrained(str(FIXTURES / 'llama'))
  adapted = peft.PeftModel.from_pretrained(base_model, str(folder)).eval()
  with torch.no_grad():
    return adapted(input_ids=torch.tensor(IDS)).logits.numpy()


def _resolved(config, modules):
  """What PEFT makes of a config, per module: ``(r, alpha)`` for LoRA,
  ``feedforward`` for (IA)³, plus the config-wide flags."""
  per_module = {}
  for name in modules:
    if config['peft_type'] == 'LORA':
      per_module[name] = (
        interop.pattern_value(config['rank_pattern'], name, config['r']),
        interop.pattern_value(config['alpha_pattern'], name, config['lora_alpha']),
      )
    else:
      per_module[name] = interop.is_target(config['feedforward_modules'], name)
  flags = {k: config.get(k) for k in ('peft_type', 'use_rslora', 'use_dora')}
  return per_module, flags


def peft_type(case: str) -> str:
  config = json.loads((FIXTURES / case / 'adapter' / 'adapter_config.json').read_text())
  return config['peft_type']


# The other types' export tests (with their own config checks) are in their
# files: loha_lokr_test, adalora_ln_test, vera_fourierft_test, oft_boft_test.
@pytest.mark.parametrize(
  'case', fast_cases([c for c in CASES if peft_type(c) in ('LORA', 'IA3')])
)
def test_export_writes_peft_tensors_and_reimports_identically(case, tmp_path):
  _, frozen, _, modules, loaded = load(case)
  folder, config, want_config, tensors = exported_fixture(
    case, tmp_path, frozen, modules, loaded
  )
  names = [n.removeprefix('base_model.model.') for n in tensors]
  adapted = [m for m in modules if any(n.startswith(m + '.') for n in names)]
  assert _resolved(config, adapted) == _resolved(want_config, adapted)
  short = {
    'llama_lora': [
      'down_proj',
      'gate_proj',
      'k_proj',
      'o_proj',
      'q_proj',
      'up_proj',
      'v_proj',
    ],
    'llama_ia3': ['down_proj', 'k_proj', 'v_proj'],
  }
  if case in short:  # Short names where they select exactly these modules.
    assert config['target_modules'] == short[case]
  # RoBERTa's classifier container, saved as its two linear submodules.
  if case == 'roberta_lora_cls':
    assert config['modules_to_save'] == ['classifier']
  again = interop.load_hf_adapter(folder, modules, frozen)
  jax.tree.map(np.testing.assert_array_equal, again.params, loaded.params)
  assert [pj.get(s).name for _, s in again.rules] == [
    pj.get(s).name for _, s in loaded.rules
  ]


def ours(seed: int = 3):
  """A LoRA adapter trained here: per-module ranks and alphas, rsLoRA."""
  model, frozen, forward = base('llama')
  rules = [
    (r'layers_0/self_attn/(q|v)_proj/kernel', 'lora(rank=2, alpha=4.0, rslora=True)'),
    (r'layers_1/mlp/down_proj/kernel', 'lora(rank=3, alpha=5.0, rslora=True)'),
    (r'layers_\d/self_attn/o_proj/kernel', 'lora(rank=2, alpha=7.0, rslora=True)'),
  ]
  tree = pj.by_rules(rules)
  params, buffers = tree.init(jax.random.key(seed), frozen)
  params = references.perturb(params, seed)
  return model, frozen, forward, tree, params, buffers


def test_our_adapter_exports_with_patterns_and_reimports(tmp_path):
  model, frozen, forward, tree, params, buffers = ours()
  modules = interop.hf_modules(model)
  folder = interop.save_hf_adapter(
    tmp_path, tree, frozen, params, buffers, modules, task_type='CAUSAL_LM'
  )
  config, tensors = _written(folder)
  assert config['peft_type'] == 'LORA' and config['use_rslora'] is True
  assert config['task_type'] == 'CAUSAL_LM'
  a = tensors['base_model.model.model.layers.1.mlp.down_proj.lora_A.weight']
  np.testing.assert_array_equal(
    a, np.asarray(params['layers_1']['mlp']['down_proj']['kernel'].a).T
  )
  resolved, _ = _resolved(
    config,
    [
      'model.layers.0.self_attn.q_proj',
      'model.layers.1.mlp.down_proj',
      'model.layers.1.self_attn.o_proj',
    ],
  )
  assert list(resolved.values()) == [(2, 4.0), (3, 5.0), (2, 7.0)]
  again = interop.load_hf_adapter(folder, modules, frozen)
  np.testing.assert_array_equal(
    *round_trip_logits(forward, frozen, again, tree, params, buffers)
  )


def test_exported_folder_loads_in_real_peft(tmp_path):
  model, frozen, forward, tree, params, buffers = ours()
  interop.save_hf_adapter(
    tmp_path, tree, frozen, params, buffers, interop.hf_modules(model)
  )
  theirs = real_peft_llama_logits(tmp_path)
  mine = forward(tree.apply(frozen, params, buffers), IDS, np.ones_like(IDS))
  assert_close(np.asarray(mine), theirs)


# ---------------------------------------------------------------------------
# Bad input: one-line errors naming the value.


def edited(case: str, tmp_path, **changes) -> pathlib.Path:
  """A copy of a fixture adapter with ``adapter_config.json`` fields changed."""
  folder = tmp_path / case
  folder.mkdir()
  config, _ = _written(FIXTURES / case / 'adapter')
  (folder / 'adapter_config.json').write_text(json.dumps({**config, **changes}))
  weights = FIXTURES / case / 'adapter' / 'adapter_model.safetensors'
  (folder / 'adapter_model.safetensors').write_bytes(weights.read_bytes())
  return folder


@pytest.mark.parametrize(
  ('changes', 'message'),
  [
    ({'peft_type': 'POLY'}, "peft_type 'POLY' is not supported"),
    ({'rank_pattern': {'q_proj': 3}}, 'rank 2, but r/rank_pattern give 3'),
    ({'init_lora_weights': 'pissa'}, 'residual base model'),
    ({'bias': 'all'}, "bias='all' is not supported"),
    ({'fan_in_fan_out': True}, 'fan_in_fan_out=True is not supported'),
  ],
)
def test_unsupported_configs_are_named(changes, message, tmp_path):
  model, frozen, _ = base('llama')
  folder = edited('llama_lora', tmp_path, **changes)
  with pytest.raises(pj.PeftError, match=re.escape(message)):
    interop.load_hf_adapter(folder, interop.hf_modules(model), frozen)


def test_adapter_for_another_model_is_refused():
  model, frozen, _ = base('bert_lora_cls')
  message = "module 'model.layers.0.mlp.down_proj' has no counterpart"
  with pytest.raises(pj.PeftError, match=re.escape(message)):
    interop.load_hf_adapter(
      FIXTURES / 'llama_lora' / 'adapter', interop.hf_modules(model), frozen
    )


def test_missing_folder_is_named(tmp_path):
  model, frozen, _ = base('llama')
  with pytest.raises(pj.PeftError, match=r'adapter_config\.json does not exist'):
    interop.load_hf_adapter(tmp_path, interop.hf_modules(model), frozen)


def test_ia3_output_scaling_of_a_biased_module_is_refused(tmp_path):
  model, frozen, _ = base('bert_lora_cls')
  tree = pj.by_rules([(r'bert/encoder/layer_0/attention/key/kernel', 'ia3()')])
  params, buffers = tree.init(jax.random.key(0), frozen)
  with pytest.raises(
    pj.PeftError, match=re.escape("scales this module's output and its bias")
  ):
    interop.save_hf_adapter(
      tmp_path, tree, frozen, params, buffers, interop.hf_modules(model)
    )


def test_methods_peft_cannot_hold_together_are_refused(tmp_path):
  model, frozen, _ = base('llama')
  modules = interop.hf_modules(model)
  for rules, message in [
    ([('layers_0/self_attn/q_proj/kernel', 'moslora(rank=2)')], 'uses "moslora(rank=2'),
    (
      [
        ('layers_0/self_attn/q_proj/kernel', 'lora(rank=2)'),
        ('layers_0/mlp/down_proj/kernel', 'ia3(feedforward=True)'),
      ],
      "needs peft_type 'LORA' but earlier leaves need 'IA3'",
    ),
    (
      [
        ('layers_0/self_attn/q_proj/kernel', 'lora(rank=2)'),
        ('layers_0/self_attn/v_proj/kernel', 'lora(rank=2, rslora=True)'),
      ],
      'one use_rslora',
    ),
  ]:
    tree = pj.by_rules(rules)
    params, buffers = tree.init(jax.random.key(0), frozen)
    with pytest.raises(pj.PeftError, match=re.escape(message)):
      interop.save_hf_adapter(tmp_path, tree, frozen, params, buffers, modules)


def test_pissa_and_milora_export_as_peft_converted_lora(tmp_path):
  """``s·(a@b − a0@b0)`` is written as PEFT's converted PiSSA: a plain LoRA
  of rank 2r (``[a, a0]``, ``[b; −b0]``) with ``α' = 2α``, for the original
  base weights; re-imported it is that LoRA, the same model."""
  model, frozen, forward = base('llama')
  modules = interop.hf_modules(model)
  tree = pj.by_rules(
    [
      ('layers_0/self_attn/q_proj/kernel', 'pissa(rank=2, alpha=4.0)'),
      ('layers_1/mlp/up_proj/kernel', 'milora(rank=3, alpha=3.0)'),
    ]
  )
  params, buffers = tree.init(jax.random.key(0), frozen)
  params = references.perturb(params, 4)
  interop.save_hf_adapter(tmp_path, tree, frozen, params, buffers, modules)
  config, tensors = _written(tmp_path)
  resolved, flags = _resolved(
    config, ['model.layers.0.self_attn.q_proj', 'model.layers.1.mlp.up_proj']
  )
  assert list(resolved.values()) == [(4, 8.0), (6, 6.0)]
  assert flags['use_rslora'] is False and flags['use_dora'] is False
  q = tensors['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight']
  a0 = buffers['layers_0']['self_attn']['q_proj']['kernel'].a0
  np.testing.assert_array_equal(q[2:], np.asarray(a0).T)
  again = interop.load_hf_adapter(tmp_path, modules, frozen)
  assert [pj.get(s).name.split(',')[0] for _, s in again.rules] == [
    'lora(rank=4',
    'lora(rank=6',
  ]
  assert_close(*round_trip_logits(forward, frozen, again, tree, params, buffers))


@pytest.mark.parametrize(
  'case', fast_cases(['llama_dora', 'llama_ia3', 'llama_lokr', 'llama_prefix_tuning'])
)
def test_scan_layout_gives_peft_logits_on_the_scanned_model(case):
  """Rules at ``layers/...`` (weight methods under ``stacked``), parameters
  stacked: the scanned model with them gives PEFT's logits."""
  model, frozen, _, _, loaded = load(case)
  scanned = llama.LlamaForCausalLM(model.config.replace(scan_layers=True))
  frozen = llama.stack_layers(frozen)
  want = expected(case)
  ids, mask = want['input_ids'], want['attention_mask']
  hooks = pj.hook_points(scanned, ids)
  stacked = interop.scan_layout(loaded, frozen, hooks)
  assert all(selector.startswith('layers/') for selector, _ in stacked.rules)
  forward = lambda p, ids, mask: scanned.apply({'params': p}, ids, attention_mask=mask)
  got = pj.adapted(stacked.adapter, forward)(
    frozen, stacked.params, stacked.buffers, ids, mask
  )
  assert_close(real_positions(got, mask), real_positions(want['logits'], mask))


@pytest.mark.parametrize(
  ('case', 'layers'),
  [('llama_lora', '[0, 1] of 2 with 2 specs'), ('llama_rslora_layers', '[1] of 2')],
)
def test_scan_layout_refuses_layers_adapted_differently(case, layers):
  _, frozen, _, _, loaded = load(case)
  with pytest.raises(pj.PeftError, match=re.escape(layers)):
    interop.scan_layout(loaded, llama.stack_layers(frozen))
