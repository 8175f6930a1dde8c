"""The See Further paper's GLUE protocol (experiments/configs/see_further.py)
on a tiny random DeBERTa-v3 checkpoint and tiny TFDS data.

The checkpoint (2 layers, d = 16, and a ``DebertaV2Tokenizer``: DeBERTa-v3's
own tokenizer class and pipeline over a one-piece-per-word Unigram vocabulary)
is written by the test; the data are the fake TFDS builders of
``tests/data/glue_test.py``.
"""

import json
import pathlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
import transformers
from safetensors import numpy as safetensors_numpy

import peft_jax as pj
from experiments import tasks, train
from experiments.configs import common
from experiments.configs import see_further as sf
from experiments.tasks import glue as glue_task
from peft_jax._src import paths
from peft_jax.data import glue
from peft_jax.models import deberta
from tests._src.multihost_test import two_processes
from tests.data import glue_test

# DeBERTa-v3's special-token ids ([PAD] 0, [CLS] 1, [SEP] 2, [UNK] 3), the
# words as SentencePiece pieces ('▁cat'), and [MASK] last as in DeBERTa-v3.
SPECIALS = ('[PAD]', '[CLS]', '[SEP]', '[UNK]')
PIECES = (*SPECIALS, *(f'▁{w}' for w in (*glue_test.WORDS, '*')), '[MASK]')
VOCAB = {piece: i for i, piece in enumerate(PIECES)}
D, MAX_LENGTH = 16, 24
MULTIHOST_WORKER = pathlib.Path(__file__).with_name(
  'experiments_multihost_glue_worker.py'
)
# tests/fixtures/tiny_hf.py's DEBERTA with this vocabulary (that module imports torch).
HF_CONFIG = dict(
  vocab_size=len(VOCAB),
  hidden_size=D,
  num_hidden_layers=2,
  num_attention_heads=2,
  intermediate_size=2 * D,
  max_position_embeddings=32,
  layer_norm_eps=1e-7,
  relative_attention=True,
  position_buckets=4,
  max_relative_positions=8,
  pos_att_type=['p2c', 'c2p'],
  norm_rel_ebd='layer_norm',
  share_att_key=True,
  position_biased_input=False,
  type_vocab_size=0,
  pad_token_id=0,
)

# Table VI (lr, epochs), and the steps of an epoch at batch 32 with a tenth
# held out, by hand: ceil((n − round(n / 10)) / 32) for the TFDS train sizes
# n = 392,702 / 67,349 / 8,551 / 363,846 / 104,743 / 2,490 / 3,668 / 5,749.
TABLE_VI = {
  'mnli': (5e-4, 7, 11045),
  'sst2': (8e-4, 24, 1895),
  'cola': (5e-4, 25, 241),
  'qqp': (5e-4, 5, 10234),
  'qnli': (1.2e-3, 5, 2946),
  'rte': (1.2e-3, 50, 71),
  'mrpc': (1e-3, 30, 104),
  'stsb': (2.2e-3, 25, 162),
}

LAYERS = ('deberta/encoder/layer_0', 'deberta/encoder/layer_1')
SELF = 'attention/self'
KV_FFN1 = {
  f'{layer}/{m}/kernel'
  for layer in LAYERS
  for m in (f'{SELF}/key_proj', f'{SELF}/value_proj', 'intermediate/dense')
}
SIX = KV_FFN1 | {
  f'{layer}/{m}/kernel'
  for layer in LAYERS
  for m in (f'{SELF}/query_proj', 'attention/output/dense', 'output/dense')
}
HEAD = {f'{m}/{p}' for m in ('classifier', 'pooler/dense') for p in ('kernel', 'bias')}


def tiny_tokenizer() -> transformers.DebertaV2Tokenizer:
  """DeBERTa-v3's tokenizer class (a Unigram model behind the Metaspace
  pre-tokenizer, ``[CLS] a [SEP] b [SEP]``) with ``PIECES`` as its vocabulary:
  ``save_pretrained`` writes the ``tokenizer.json`` that a real DeBERTa-v3
  directory holds, which loads without sentencepiece."""
  pieces = [(piece, 0.0 if piece in SPECIALS else -1.0) for piece in PIECES]
  return transformers.DebertaV2Tokenizer(vocab=pieces, unk_id=VOCAB['[UNK]'])


@pytest.fixture(scope='module')
def checkpoint_dir(tmp_path_factory) -> str:
  """config.json, model.safetensors (``deberta.*``, random) and tokenizer."""
  directory = tmp_path_factory.mktemp('deberta')
  hf_config = transformers.DebertaV2Config(**HF_CONFIG)
  hf_config.save_pretrained(directory)
  layout = deberta.hf_layout(deberta.DebertaV2Config.from_hf(hf_config))
  shapes = paths.flatten(layout.abstract)
  rng = np.random.default_rng(0)
  weights = {}
  for row in layout.tensors:
    shape = shapes[row.path].shape
    shape = shape[::-1] if row.transform else shape  # torch (out, in)
    weights[f'deberta.{row.name}'] = rng.normal(0, 0.1, shape).astype(np.float32)
  safetensors_numpy.save_file(weights, str(directory / 'model.safetensors'))
  tiny_tokenizer().save_pretrained(directory)
  return str(directory)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> str:
  """RTE and STS-B, tiny (``glue_test.FakeGlue``), prepared as array_record."""
  directory = str(tmp_path_factory.mktemp('tfds'))
  tfds.disable_progress_bar()
  for task in ('rte', 'stsb'):
    builder = glue_test.FakeGlue(
      config=task, data_dir=directory, file_format='array_record'
    )
    builder.download_and_prepare()
  return directory


@pytest.fixture(scope='module')
def dirs(checkpoint_dir, data_dir) -> str:
  return f'checkpoint={checkpoint_dir},data_dir={data_dir}'


def test_the_checkpoint_tokenizer_encodes_pairs_as_deberta_v3_does(checkpoint_dir):
  """What the task's ``build`` loads (``AutoTokenizer`` on the checkpoint
  dir, no sentencepiece installed) encodes a pair as ``[CLS] a [SEP] b
  [SEP]``, segment ids 0 then 1, padded with id 0, the longer text truncated
  first; ids by hand from ``VOCAB``."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint_dir)
  assert isinstance(tokenizer, transformers.DebertaV2Tokenizer)
  examples = [
    {'sentence1': 'the cat', 'sentence2': 'on zebra', 'label': 1},
    {'sentence1': 'the big red dog ran', 'sentence2': 'it', 'label': 0},
  ]
  arrays = glue.encode('rte', tokenizer, examples, max_length=8)
  ids = lambda *pieces: [VOCAB[p] for p in pieces]
  cls, sep, pad = ids('[CLS]', '[SEP]', '[PAD]')
  first = [cls, *ids('▁the', '▁cat'), sep, *ids('▁on', '[UNK]'), sep]
  second = [cls, *ids('▁the', '▁big', '▁red', '▁dog'), sep, *ids('▁it'), sep]
  np.testing.assert_array_equal(arrays['input_ids'], [[*first, pad], second])
  np.testing.assert_array_equal(
    arrays['token_type_ids'], [[0] * 4 + [1] * 3 + [0], [0] * 6 + [1] * 2]
  )
  np.testing.assert_array_equal(arrays['attention_mask'], [[1] * 7 + [0], [1] * 8])
  np.testing.assert_array_equal(arrays['label'], [1, 0])


def test_every_task_has_table_vi_lr_epochs_and_steps(dirs):
  for task, (lr, epochs, per_epoch) in TABLE_VI.items():
    config = sf.get_config(f'task={task},method=lora,{dirs}')
    common.check_config(config)
    assert config.lr == lr and config.batch_size == 32, task
    assert config.steps == epochs * per_epoch, task
    assert config.seeds == 5 and config.model.family == 'deberta'
  rte = lambda extra: sf.get_config(f'task=rte,method=lora,{dirs},{extra}')
  paper = rte('heldout=0.0')  # the paper's run: 50 epochs of ceil(2490 / 32)
  assert paper.steps == 50 * 78 and paper.warmup_steps == 200  # the script's
  assert paper.schedule is None and paper.weight_decay == 0.01
  # The Trainer's decay groups: not biases or LayerNorms (tests/_src/decay_test).
  assert train.decay_mask(paper) is pj.hf_decay_mask
  assert rte('epochs=10').steps == 10 * 71 and rte('steps=123').steps == 123
  assert rte('batch_size=16').steps == 50 * 141  # ceil(2241 / 16)
  assert rte('method=full').lr == sf.FULL_LR and rte('lr=0.01').lr == 0.01
  assert rte('rank=2').adapters[1][1] == "lora(rank=2, alpha=32, a_init='normal')"
  assert rte('alpha=4').adapters[1][1] == "lora(rank=8, alpha=4.0, a_init='normal')"
  adalora = rte('heldout=0.0,method=adalora,rank=4').schedule
  assert adalora == (  # the RTE script's phases at its own length
    'adalora_schedule',
    dict(
      total_steps=3900,
      init_warmup=600,
      final_warmup=1800,
      mask_interval=1,
      target_rank=2,
    ),
  )
  local = rte('runlocal')
  assert (local.steps, local.seeds, local.model.max_length) == (3, 1, 64)


def expected_targets(method: str, frozen) -> set[str]:
  """The leaves and hook points a method of the table adapts, by hand."""
  encoder = set(paths.flatten(frozen)) - HEAD
  layer_norms = {n for n in encoder if '/LayerNorm/' in n}
  ffn_outputs = {f'{layer}/ffn_output' for layer in LAYERS}
  return {
    'full': encoder,
    'bitfit': {n for n in encoder if n.endswith('/bias')},
    'ia3': KV_FFN1,
    'ssl': KV_FFN1,
    'ssb': KV_FFN1,
    'houlsby': {f'{layer}/attention/attention_output' for layer in LAYERS}
    | ffn_outputs
    | layer_norms,
    'pfeiffer': ffn_outputs,
  }.get(method, SIX)


def test_every_method_of_the_sweep_places_its_rules_on_deberta(dirs):
  base = f'task=rte,{dirs},runlocal,max_length={MAX_LENGTH}'
  entries = sf.sweep(base)
  assert len(entries) == len(sf.RANK_FREE) + len(sf.RANK_BASED) * 4 == 6 + 12 * 4
  assert {entry.split(',')[0] for entry in entries} == {
    f'method={m}' for m in sf.METHODS
  }
  task = glue_task.build(sf.get_config(base))
  assert task.adapter_metadata['head']['family'] == 'deberta'
  frozen, hooks = task.frozen, task.hooks
  for entry in sf.sweep(f'{base},ranks=[2]'):
    config = sf.get_config(f'{base},{entry}')
    common.check_config(config)
    tree = pj.by_rules(config.adapters)  # strict: a rule matching nothing raises
    params, buffers = tree.init(jax.random.key(0), frozen, hooks)
    plan = tree.plan(frozen, params, buffers)
    adapted = set(plan.weights) | set(plan.hooks)
    assert adapted == HEAD | expected_targets(config.method, frozen), entry
    if config.method in ('houlsby', 'pfeiffer'):  # a bottleneck of r = 2
      assert plan.hooks[f'{LAYERS[0]}/ffn_output'].params.down.shape == (D, 2)
    if config.method.startswith('adalora'):
      assert train.make_schedule(config, tree) is not None


def test_bad_arguments_are_one_line_errors(dirs, data_dir, tmp_path):
  (tmp_path / 'empty').mkdir()
  cases = [
    (f'task=boolq,{dirs}', "task='boolq' is unknown; expected one of mnli, sst2"),
    (f'rank=3,{dirs}', r'rank=3 should be one of the paper ranks \(2, 4, 8, 16\)'),
    (f'method=lora_mpc_n,{dirs}', "method='lora_mpc_n' is unknown"),
    (f'checkpoint={tmp_path}/nope,data_dir={data_dir}', 'is not a directory'),
    (f'data_dir={data_dir}', 'checkpoint= is required'),
    (f'checkpoint={tmp_path}/empty,data_dir={data_dir}', 'No config.json'),
    (f'heldout=1.0,{dirs}', r'heldout=1\.0 should be a share in \[0, 1\)'),
  ]
  for arg, message in cases:
    with pytest.raises(pj.PeftError, match=message) as error:
      sf.get_config(arg)
    assert '\n' not in str(error.value), arg
  with pytest.raises(pj.PeftError, match='rank=3 should be one of'):
    sf.sweep(f'{dirs},ranks=[2,3]')
  copa = glue.get_task('copa')
  config = deberta.DebertaV2Config.from_hf(transformers.DebertaV2Config(**HF_CONFIG))
  with pytest.raises(pj.PeftError, match='multiple choice, which has no DeBERTa'):
    glue_task.make_model(config, copa)


def run(dirs, workdir, arg: str):
  """``train_and_evaluate`` of a runlocal config, and its results.json."""
  config = sf.get_config(f'{arg},{dirs},runlocal,max_length={MAX_LENGTH}')
  rows = train.train_and_evaluate(config, str(workdir))
  assert json.loads((workdir / 'results.json').read_text()) == rows
  return rows


@pytest.mark.slow
def test_runlocal_trains_rte_on_a_tiny_deberta(dirs, checkpoint_dir, tmp_path):
  row = run(dirs, tmp_path, 'task=rte,method=lora,rank=2')
  check_from_pretrained_rebuilds_the_task(dirs, checkpoint_dir, tmp_path)
  head = (D * D + D) + (D * 2 + 2)  # the context pooler and the classifier
  per_layer = 2 * (4 * (D + D) + 2 * (D + 2 * D))  # r (d_in + d_out), six kernels
  assert row['trainable_params'] == head + 2 * per_layer
  assert row['group'] == 'lora r=2' and row['metric'] == 'score'
  for split in ('validation', 'test'):
    assert 0 <= row[f'after_{split}_accuracy'] <= 1
    assert row[f'after_{split}_score'] == row[f'after_{split}_accuracy']


def check_from_pretrained_rebuilds_the_task(dirs, checkpoint_dir, workdir):
  """``pj.from_pretrained`` of the run's adapter file on the bare DeBERTa
  checkpoint has the trainer's frozen tree (encoder plus the head drawn from
  the run's seed) and gives the logits of the trained adapter on it."""
  config = sf.get_config(f'task=rte,method=lora,rank=2,{dirs},runlocal')
  task = glue_task.build(config)
  model = pj.from_pretrained(checkpoint_dir, adapter=workdir / 'adapter.safetensors')
  got, want = paths.flatten(model.frozen), paths.flatten(task.frozen)
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  like = jax.eval_shape(model.adapter.init, jax.random.key(0), task.frozen)
  params, buffers, _ = pj.load_adapter(str(workdir / 'adapter.safetensors'), like)
  ids = np.random.default_rng(0).integers(1, 40, (3, 10)).astype(np.int32)
  mask = np.ones_like(ids)
  forward = tasks.Forward(model.model, ('input_ids', 'attention_mask'))
  batch = {'input_ids': ids, 'attention_mask': mask}
  want_logits = pj.adapted(model.adapter, forward, factored=True)(
    task.frozen, params, buffers, batch
  )
  np.testing.assert_allclose(model.apply(ids, mask), want_logits, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_group_of_two_stsb_seeds_writes_two_rows(dirs, tmp_path):
  rows = run(dirs, tmp_path, 'task=stsb,method=ssb,seeds=2')
  assert [row['seed'] for row in rows] == [0, 1]
  for row in rows:
    assert row['group'] == 'ssb' and row['metric'] == 'score'
    for name in ('pearson', 'spearman', 'score'):
      assert np.isfinite(row[f'after_test_{name}'])
      assert np.isfinite(row[f'after_validation_{name}'])


@pytest.mark.slow  # two processes each compile the trainer's step
def test_stsb_on_two_processes_scores_as_on_one(dirs, tmp_path):
  """GLUE's metrics need every prediction: on a mesh that spans two
  processes, each gathers the outputs of every evaluation batch, and the
  correlations equal a one-process run's (up to float reduction order)."""
  arg = 'task=stsb,method=lora,rank=2'
  config = f'{arg},{dirs},runlocal,max_length={MAX_LENGTH}'
  two = tmp_path / 'two_processes'
  logs = two_processes(MULTIHOST_WORKER, str(two), 'data=4,fsdp=2', config, timeout=400)
  assert all('finished' in log for log in logs)
  row = json.loads((two / 'results.json').read_text())
  assert row['processes'] == '2'
  one = run(dirs, tmp_path / 'one_process', arg)
  for split in ('validation', 'test'):
    for name in ('pearson', 'spearman'):
      key = f'after_{split}_{name}'
      # Adam divides by sqrt(v): a gradient entry near zero whose sign the
      # reduction order flips moves by lr either way, so three steps leave
      # the runs ~1e-4 apart in a correlation of 8 examples, not 1e-7.
      np.testing.assert_allclose(row[key], one[key], rtol=1e-3, atol=1e-5)
