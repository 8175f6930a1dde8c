"""``pj.from_pretrained``: a base model with an adapter in one call.

On the tiny Llama and BERT folders of the PEFT fixtures (and a BERT encoder
without a head, with a word-level tokenizer, written from them): what
``PeftModel`` returns is checked against ``pj.adapted`` / ``pj.merge`` /
``llama.generate`` called by hand; saved adapters load back to the same
logits; bad input is a one-line error. The real SmolLM2 is slow.
"""

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import transformers
from safetensors import numpy as safetensors_numpy

import peft_jax as pj
from peft_jax._src import paths
from peft_jax.models import bert, gguf_loading, llama
from tests._src.checkpoint_test import perturbed
from tests.interop.hf_peft_test import FIXTURES, assert_close

LLAMA = FIXTURES / 'llama'
LLAMA_RULES = [
  ('.*/(q_proj|v_proj)/kernel', 'lora(rank=2, alpha=4)'),
  ('layers_1/mlp/down_proj/kernel', pj.dora(rank=2)),
]
IDS = np.array([[3, 9, 27, 4, 1, 60], [5, 8, 13, 21, 34, 55]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
WORDS = ['fun', 'dull', 'witty', 'long', 'film', 'plot', 'cast', 'great', 'bad']


def trained(model: pj.PeftModel, seed: int = 1) -> pj.PeftModel:
  """``model`` with every adapter parameter moved (as if trained)."""
  return dataclasses.replace(model, params=perturbed(model.params, seed))


@pytest.fixture(scope='module')
def fresh_llama():
  return pj.from_pretrained(LLAMA, LLAMA_RULES)


@pytest.fixture(scope='module')
def llama_model(fresh_llama):
  return trained(fresh_llama)


@pytest.fixture(scope='module')
def encoder_dir(tmp_path_factory):
  """The fixture BERT without its classifier (a ``BertModel`` checkpoint),
  with a word-level tokenizer over ``WORDS``."""
  folder = tmp_path_factory.mktemp('bert_encoder')
  tensors = safetensors_numpy.load_file(FIXTURES / 'bert' / 'model.safetensors')
  kept = {k: v for k, v in tensors.items() if not k.startswith('classifier.')}
  safetensors_numpy.save_file(kept, folder / 'model.safetensors')
  config = json.loads((FIXTURES / 'bert' / 'config.json').read_text())
  config['architectures'] = ['BertModel']
  (folder / 'config.json').write_text(json.dumps(config))
  special = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
  (folder / 'vocab.txt').write_text('\n'.join(special + WORDS) + '\n')
  tokenizer = transformers.BertTokenizerFast(vocab_file=str(folder / 'vocab.txt'))
  tokenizer.save_pretrained(folder)
  return folder


def forward(model):
  return lambda w, ids, mask: model.apply({'params': w}, ids, attention_mask=mask)


def test_import_leaves_the_entry_point_and_transformers_for_first_use():
  code = (
    'import sys, peft_jax as pj\n'
    "assert 'peft_jax.pretrained' not in sys.modules\n"
    "assert 'transformers' not in sys.modules\n"
    'assert pj.from_pretrained.__module__ == "peft_jax.pretrained"\n'
    'assert not hasattr(pj, "from_pretrain")\n'
  )
  subprocess.run([sys.executable, '-c', code], check=True, capture_output=True)


def test_apply_is_the_adapted_model(llama_model, fresh_llama):
  m = llama_model
  assert type(m.model) is llama.LlamaForCausalLM and m.tokenizer is None
  by_hand = jax.jit(pj.adapted(m.adapter, forward(m.model), factored=True))
  want = by_hand(m.frozen, m.params, m.buffers, IDS, MASK)
  np.testing.assert_allclose(m.apply(IDS, MASK), want, rtol=1e-6, atol=1e-6)
  base = jax.jit(forward(m.model))(m.frozen, IDS, MASK)
  assert np.abs(np.asarray(want) - np.asarray(base)).max() > 1e-2  # it adapts
  # A fresh adapter is drawn as the trainer draws it for its seed (0).
  init_key, _ = jax.random.split(jax.random.key(0))
  want_params, _ = pj.by_rules(LLAMA_RULES).init(init_key, fresh_llama.frozen)
  jax.tree.map(np.testing.assert_array_equal, fresh_llama.params, want_params)


def test_merge_gives_the_adapted_logits(llama_model):
  m = llama_model
  merged = m.merge()
  logits = jax.jit(forward(m.model))(merged, IDS, MASK)
  np.testing.assert_allclose(logits, m.apply(IDS, MASK), rtol=1e-5, atol=1e-5)
  want = pj.merge(m.adapter, m.frozen, m.params, m.buffers)
  jax.tree.map(np.testing.assert_array_equal, merged, want)


def test_generate_is_llama_generate_on_the_merged_weights(llama_model):
  m = llama_model
  want = llama.generate(m.model, m.merge(), IDS[:1], 5)
  np.testing.assert_array_equal(m.generate(IDS[:1], 5), want)


def test_saved_then_loaded_gives_the_same_logits(llama_model, tmp_path):
  m = llama_model
  path = tmp_path / 'adapter.safetensors'
  m.save(path)
  again = pj.from_pretrained(LLAMA, adapter=path)
  np.testing.assert_array_equal(again.apply(IDS, MASK), m.apply(IDS, MASK))
  assert again.metadata['adapters'] == m.metadata['adapters']
  assert again.metadata['base_model'] == str(LLAMA)
  assert again.metadata['format_version'] == 1
  merged = pj.from_pretrained(LLAMA, adapter=path, merge=True)
  np.testing.assert_allclose(
    merged.apply(IDS, MASK), m.apply(IDS, MASK), rtol=1e-5, atol=1e-5
  )
  assert merged.params == {} and merged.metadata['merged']
  with pytest.raises(pj.PeftError, match='adapter merged into its weights'):
    merged.save(tmp_path / 'merged.safetensors')


def test_a_peft_folder_loads_as_peft_ran_it_and_saves_as_our_file(tmp_path):
  case = FIXTURES / 'llama_lora'
  with np.load(case / 'expected.npz') as expected:
    ids, mask, logits = (expected[k] for k in ('input_ids', 'attention_mask', 'logits'))
  m = pj.from_pretrained(LLAMA, adapter=case / 'adapter')
  real = mask.astype(bool)
  assert_close(np.asarray(m.apply(ids, mask))[real], logits[real])
  assert m.metadata['hf_peft_config']['peft_type'] == 'LORA'
  m.save(tmp_path / 'adapter.safetensors')
  again = pj.from_pretrained(LLAMA, adapter=tmp_path / 'adapter.safetensors')
  np.testing.assert_array_equal(again.apply(ids, mask), m.apply(ids, mask))


def test_labels_add_a_head_to_an_encoder_that_predicts_and_reloads(
  encoder_dir, tmp_path
):
  rules = [('.*/query/kernel', 'lora(rank=2)'), ('classifier/.*', 'full()')]
  m = trained(pj.from_pretrained(encoder_dir, rules, labels=['neg', 'pos'], seed=4))
  assert type(m.model) is bert.BertForSequenceClassification
  assert m.model.pooling == 'mean' and m.model.num_labels == 2
  # The head is the trainer's (text_classification: model.init with its
  # seed, on its own sample shape), the encoder the checkpoint's.
  sample = np.ones((1, 12), np.int32)
  init = jax.jit(m.model.init)(jax.random.key(4), sample, sample)
  head = init['params']['classifier']
  jax.tree.map(np.testing.assert_array_equal, m.frozen['classifier'], head)
  _, encoder = bert.load_hf(encoder_dir)
  jax.tree.map(np.testing.assert_array_equal, m.frozen['bert'], encoder)

  texts = ['fun witty film', 'dull long plot', 'great cast', 'bad']
  batch = m.tokenizer(texts, padding=True, return_tensors='np')
  logits = np.asarray(m.apply(batch['input_ids'], batch['attention_mask']))
  labels = m.predict(texts)
  assert labels == [['neg', 'pos'][i] for i in logits.argmax(-1)]
  assert m.metadata['head'] == {
    'kind': 'sequence_classification',
    'num_labels': 2,
    'pooling': 'mean',
    'seed': 4,
  }

  m.save(tmp_path / 'adapter.safetensors')
  again = pj.from_pretrained(encoder_dir, adapter=tmp_path / 'adapter.safetensors')
  assert again.metadata['labels'] == ['neg', 'pos']
  np.testing.assert_array_equal(
    again.apply(batch['input_ids'], batch['attention_mask']), logits
  )
  assert again.predict(texts) == labels


def test_a_multiple_choice_file_rebuilds_its_head_on_the_encoder(encoder_dir, tmp_path):
  """An adapter file recording a multiple-choice head (as the GLUE trainer
  writes for COPA on BERT) loads on the bare encoder as
  ``BertForMultipleChoice``: the head drawn from the recorded seed, the
  checkpoint's encoder, and the logits of the adapted model built here."""
  config, encoder = bert.load_hf(encoder_dir)
  task_model = bert.BertForMultipleChoice(config)
  sample = np.ones((1, 3, 6), np.int32)
  init = jax.jit(task_model.init)(jax.random.key(5), sample, sample)['params']
  frozen = {**init, 'bert': encoder}
  rules = [('.*/query/kernel', 'lora(rank=2)'), ('classifier/.*', 'full()')]
  tree = pj.by_rules(rules)
  params, buffers = tree.init(jax.random.key(6), frozen)
  params = perturbed(params, 2)
  head = {'kind': 'multiple_choice', 'seed': 5}
  path = tmp_path / 'copa.safetensors'
  pj.save_adapter(str(path), params, buffers, {'head': head}, rules=rules)

  m = pj.from_pretrained(encoder_dir, adapter=path)
  assert type(m.model) is bert.BertForMultipleChoice
  got, want = paths.flatten(m.frozen), paths.flatten(frozen)
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  ids = np.random.default_rng(0).integers(5, 5 + len(WORDS), (2, 3, 6))
  mask = np.ones_like(ids)
  logits = m.apply(ids, mask)
  assert logits.shape == (2, 3)
  adapted = pj.adapted(tree, forward(task_model))
  np.testing.assert_allclose(
    logits, adapted(frozen, params, buffers, ids, mask), rtol=1e-6, atol=1e-6
  )


def test_quantized_base_is_recorded_and_quantized_again_on_load(tmp_path):
  rules = [('.*/(query|value)/kernel', 'lora(rank=2)'), ('classifier/.*', 'full()')]
  m = pj.from_pretrained('minilm', rules, labels=['a', 'b'], quantize='nf4')
  layer = m.frozen['bert']['encoder']['layer_0']
  assert isinstance(layer['attention']['query']['kernel'], pj.QuantizedArray)
  assert m.metadata['quantize'] == 'nf4'
  m = trained(m)
  ids = np.array([[101, 2023, 3185, 2003, 2307, 102]])
  m.save(tmp_path / 'adapter.safetensors')
  again = pj.from_pretrained('minilm', adapter=tmp_path / 'adapter.safetensors')
  assert isinstance(again.frozen['classifier']['kernel'], pj.QuantizedArray)
  np.testing.assert_array_equal(again.apply(ids), m.apply(ids))


def one_line_error(call, match):
  with pytest.raises(pj.PeftError, match=match) as info:
    call()
  assert '\n' not in str(info.value)


def test_bad_input_is_a_one_line_error(llama_model, encoder_dir, tmp_path):
  rules = [('.*/q_proj/kernel', 'lora(rank=2)')]
  one_line_error(
    lambda: pj.from_pretrained(tmp_path / 'nowhere', rules), 'No config.json in'
  )
  one_line_error(
    lambda: pj.from_pretrained(LLAMA, [('.*/q_prj/kernel', 'lora(rank=2)')]),
    r"rule 0 \('.\*/q_prj/kernel', .*\) matches no leaf; closest names",
  )
  one_line_error(lambda: pj.from_pretrained(LLAMA), 'takes rules .* or adapter')
  one_line_error(
    lambda: pj.from_pretrained(LLAMA, [(lambda name, leaf: True, 'lora()')]),
    'rule 0: selector <lambda> is a predicate that is not registered',
  )
  one_line_error(
    lambda: pj.from_pretrained(LLAMA, adapter=tmp_path / 'missing.safetensors'),
    'missing.safetensors does not exist; expected a peft_jax adapter file or a '
    'Hugging Face PEFT folder',
  )
  one_line_error(
    lambda: pj.from_pretrained(FIXTURES / 'bert', rules, labels=['a', 'b', 'c']),
    r"3 labels \['a', 'b', 'c'\] for a head with 2 outputs",
  )
  one_line_error(
    lambda: pj.from_pretrained(LLAMA, rules, labels=['a', 'b']),
    'labels name the outputs of a sequence classifier; .* loads LlamaForCausalLM',
  )
  one_line_error(lambda: llama_model.predict(['fun']), 'predict needs a sequence')
  one_line_error(lambda: llama_model.generate('fun'), 'this model has no tokenizer')
  encoder = pj.from_pretrained(encoder_dir, [('.*/query/kernel', 'lora(rank=2)')])
  one_line_error(lambda: encoder.generate(IDS, 2), 'generate needs a causal LM')
  for head, match in (
    ({'kind': 'span', 'seed': 0}, "head kind 'span' is not supported here; expected"),
    (
      {'kind': 'multiple_choice', 'seed': 0},
      'a new multiple_choice head needs a BERT/RoBERTa encoder .* loads '
      'LlamaForCausalLM',
    ),
  ):
    path = tmp_path / f'{head["kind"]}.safetensors'
    pj.save_adapter(str(path), llama_model.params, llama_model.buffers, {'head': head})
    one_line_error(lambda path=path: pj.from_pretrained(LLAMA, adapter=path), match)


@pytest.mark.slow
def test_smollm2_generates_text_and_reloads_it(tmp_path):
  rules = [('.*/(q_proj|v_proj)/kernel', 'lora(rank=4, alpha=8)')]
  m = trained(pj.from_pretrained('smollm2', rules), seed=5)
  assert m.metadata['base_model'] == 'smollm2'
  prompt = 'The capital of France is'
  text = m.generate(prompt, 6)
  ids = np.array([m.tokenizer.encode(prompt).ids])
  want = llama.generate(m.model, m.merge(), ids, 6)
  assert text == m.tokenizer.decode(np.asarray(want[0]).tolist())
  m.save(tmp_path / 'adapter.safetensors')
  again = pj.from_pretrained(
    gguf_loading.smollm2_path(), adapter=tmp_path / 'adapter.safetensors'
  )
  assert again.generate(prompt, 6) == text
