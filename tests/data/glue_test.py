"""The GLUE/SuperGLUE tasks: metrics, TFDS reading, batching, the task side
and one trainer run.

The data are tiny random datasets, written as array_record into the test's
tmp dir by builders that mirror the real TFDS datasets (names, versions,
feature names, label classes and split names of
``tensorflow_datasets/text/glue.py`` and ``super_glue.py``, tfds 4.9.10) and
read back without TensorFlow. Tests check those builders against tfds's own
(registered for them), and read two tasks through tfds's own builders under
``tfds.testing.mock_data``. The model is a tiny random RoBERTa-shaped
checkpoint (no pooler, like ``roberta-base``) with a word-level RoBERTa-style
tokenizer, written beside them.
"""

import json
import types
from typing import ClassVar

import jax
import numpy as np
import pytest
import scipy.stats
import tensorflow_datasets as tfds
import tokenizers
import transformers
from safetensors import numpy as safetensors_numpy
from tensorflow_datasets.core import registered

import peft_jax as pj
from experiments import train
from experiments.configs import common
from experiments.configs import glue as glue_config
from experiments.tasks import glue as glue_task
from peft_jax._src import paths
from peft_jax.data import batching, glue
from peft_jax.models import bert

WORDS = ('the', 'cat', 'dog', 'bird', 'sat', 'ran', 'on', 'mat', 'was', 'big')
WORDS += ('small', 'red', 'because', 'it', 'what', 'of', 'this', 'cause')
VOCAB = {
  token: i for i, token in enumerate(('<s>', '<pad>', '</s>', '<unk>', *WORDS, '*'))
}
PAD, MAX_LENGTH = 1, 24
SIZES = {'train': 20, 'validation': 8, 'test': 4}
# MNLI's splits (tensorflow_datasets/text/glue.py): two dev and two test sets.
MNLI_SIZES = {
  'train': 20,
  'validation_matched': 8,
  'validation_mismatched': 6,
  'test_matched': 4,
  'test_mismatched': 4,
}
# Our test splits -> the TFDS dev splits they are read from.
TEST_SPLITS = {'test': 'validation'}
MNLI_TEST_SPLITS = {
  'test': 'validation_matched',
  'test_mismatched': 'validation_mismatched',
}
CONFIG = 'experiments/configs/glue.py'


# ---------------------------------------------------------------------------
# Metrics against hand-computed values.


def test_accuracy_f1_and_macro_f1_by_hand():
  preds, labels = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 1, 0, 1])
  assert glue.accuracy(preds, labels) == 0.6
  assert glue.f1(preds, labels) == pytest.approx(4 / 6)  # tp 2, fp 1, fn 1
  assert glue.f1(preds, labels, positive=0) == pytest.approx(0.5)  # tp 1, fp 1, fn 1
  assert glue.f1(np.zeros(3), np.zeros(3)) == 0.0  # no positives at all
  # Class 0: tp 1, fp 1, fn 0 -> 2/3; class 1: tp 1, fp 1, fn 1 -> 1/2;
  # class 2: never predicted -> 0.
  three_preds, three_labels = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 2])
  assert glue.macro_f1(three_preds, three_labels, 3) == pytest.approx(7 / 18)
  report = glue.accuracy_macro_f1_report(three_preds, three_labels, 3)
  assert report['score'] == pytest.approx((0.5 + 7 / 18) / 2)
  report = glue.accuracy_f1_report(preds, labels, 2)
  assert report == pytest.approx({'accuracy': 0.6, 'f1': 4 / 6, 'score': 0.6333333})


def test_matthews_corr_by_hand_and_its_edge_cases():
  preds, labels = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 1, 0, 1])
  # tp 2, tn 1, fp 1, fn 1: (2·1 - 1·1) / sqrt(3·3·2·2) = 1/6.
  assert glue.matthews_corr(preds, labels) == pytest.approx(1 / 6)
  assert glue.matthews_corr(labels, labels) == pytest.approx(1.0)
  assert glue.matthews_corr(1 - labels, labels) == pytest.approx(-1.0)
  assert glue.matthews_corr(np.ones(5), labels) == 0.0  # one class predicted
  assert glue.matthews_corr(np.ones(4), np.ones(4)) == 0.0  # one class at all
  # Three classes: c = 2, s = 4, t = (1, 2, 1), p = (2, 2, 0):
  # (2·4 - 6) / sqrt((16 - 8)(16 - 6)) = 2 / sqrt(80).
  three = glue.matthews_corr(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 2]))
  assert three == pytest.approx(2 / np.sqrt(80))
  assert glue.matthews_report(preds, labels, 2)['score'] == pytest.approx(1 / 6)


def test_correlations_by_hand_and_against_scipy():
  x, y = np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])
  assert glue.pearson(x, y) == pytest.approx(0.5)  # centred: (-1,0,1)·(-1,1,0) / 2
  assert glue.spearman(x, y) == pytest.approx(0.5)
  assert glue.spearman(x, np.exp(x)) == pytest.approx(1.0)  # monotone, not linear
  assert glue.pearson(x, np.full(3, 2.0)) == 0.0  # constant predictions
  rng = np.random.default_rng(0)
  a = rng.integers(0, 5, 40).astype(float)  # with ties
  b = a + rng.normal(size=40)
  assert glue.pearson(a, b) == pytest.approx(scipy.stats.pearsonr(a, b)[0])
  assert glue.spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b)[0])
  report = glue.correlation_report(a, b, 1)
  assert report['score'] == pytest.approx((report['pearson'] + report['spearman']) / 2)


def test_metrics_turn_outputs_into_predictions():
  logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0]])
  labels = np.array([1, 0, 0])
  assert glue.metrics('rte', logits, labels) == pytest.approx(
    {'accuracy': 2 / 3, 'score': 2 / 3}
  )
  scores = np.array([[0.5], [2.5], [4.0]])
  stsb = glue.metrics('stsb', scores, np.array([1.0, 2.0, 5.0]))
  assert stsb['spearman'] == pytest.approx(1.0)
  with pytest.raises(pj.PeftError, match="unknown GLUE task 'squad'"):
    glue.metrics('squad', logits, labels)


def test_qqp_reports_f1_and_accuracy_and_their_mean():
  # Predictions (argmax) 1 1 0 0 1 0 0 against labels 1 0 0 1 1 0 0: 5 of 7
  # right; tp 2, fp 1, fn 1, so precision = recall = 2/3 and F1 = 2/3.
  logits = np.array([[0, 1], [0, 1], [1, 0], [1, 0], [0, 1], [1, 0], [1, 0]])
  labels = np.array([1, 0, 0, 1, 1, 0, 0])
  assert glue.metrics('qqp', logits, labels) == pytest.approx(
    {'accuracy': 5 / 7, 'f1': 2 / 3, 'score': (5 / 7 + 2 / 3) / 2}
  )


def test_mnli_and_boolq_score_accuracy():
  logits = np.array([[3.0, 1, 0], [0, 2, 1], [0, 1, 2], [5, 0, 0]])  # 0 1 2 0
  assert glue.metrics('mnli', logits, np.array([0, 1, 1, 2])) == pytest.approx(
    {'accuracy': 0.5, 'score': 0.5}
  )
  yes_no = np.array([[0.0, 1], [1, 0], [1, 0]])  # True False False
  assert glue.metrics('boolq', yes_no, np.array([1, 1, 0])) == pytest.approx(
    {'accuracy': 2 / 3, 'score': 2 / 3}
  )


# GLUE's official metrics (SuperGLUE's for CB; accuracy otherwise).
REPORTED = {
  'cola': {'matthews_corr', 'accuracy'},
  'stsb': {'pearson', 'spearman'},
  'mrpc': {'accuracy', 'f1'},
  'qqp': {'accuracy', 'f1'},
  'cb': {'accuracy', 'macro_f1'},
}


@pytest.mark.parametrize('task', list(glue.TASKS))
def test_every_task_reports_its_official_metrics(task):
  kind = glue.TASKS[task].kind
  if kind == glue.REGRESSION:
    outputs = np.array([[0.5], [2.0], [1.0]])
  else:  # one-hot logits of the predictions 0 1 1
    outputs = np.eye(glue.TASKS[task].num_labels)[[0, 1, 1]]
  report = glue.metrics(task, outputs, np.array([0, 1, 0]))
  assert set(report) == REPORTED.get(task, {'accuracy'}) | {'score'}


# ---------------------------------------------------------------------------
# Tiny TFDS datasets with the real datasets' names and features.


def words(rng, low=2, high=6) -> str:
  return ' '.join(rng.choice(WORDS[:12], size=rng.integers(low, high)))


def text_pair(first: str, second: str):
  return lambda rng: {first: words(rng), second: words(rng)}


def wsc_example(rng) -> dict:
  noun, adjective = rng.choice(['cat', 'dog', 'bird']), rng.choice(['big', 'red'])
  return {
    'text': f'the {noun} sat because it was {adjective}.',
    'span1_index': 1,
    'span1_text': str(noun),
    'span2_index': 4,
    'span2_text': 'it',
  }


def copa_example(rng) -> dict:
  return {
    'premise': words(rng),
    'choice1': words(rng),
    'choice2': words(rng),
    'question': str(rng.choice(['cause', 'effect'])),
  }


TEXT = tfds.features.Text
# config -> (features but label and idx, label classes (None: a float score),
# example maker); as in tensorflow_datasets/text/glue.py and super_glue.py.
GLUE = {
  'cola': ({'sentence': TEXT()}, ('unacceptable', 'acceptable'), None),
  'sst2': ({'sentence': TEXT()}, ('negative', 'positive'), None),
  'mrpc': (
    {'sentence1': TEXT(), 'sentence2': TEXT()},
    ('not_equivalent', 'equivalent'),
    None,
  ),
  'qqp': (
    {'question1': TEXT(), 'question2': TEXT()},
    ('not_duplicate', 'duplicate'),
    text_pair('question1', 'question2'),
  ),
  'stsb': ({'sentence1': TEXT(), 'sentence2': TEXT()}, None, None),
  'mnli': (
    {'premise': TEXT(), 'hypothesis': TEXT()},
    ('entailment', 'neutral', 'contradiction'),
    text_pair('premise', 'hypothesis'),
  ),
  'qnli': (
    {'question': TEXT(), 'sentence': TEXT()},
    ('entailment', 'not_entailment'),
    text_pair('question', 'sentence'),
  ),
  'rte': (
    {'sentence1': TEXT(), 'sentence2': TEXT()},
    ('entailment', 'not_entailment'),
    None,
  ),
}
SUPER_GLUE = {
  'boolq': (
    {'question': TEXT(), 'passage': TEXT()},
    ('False', 'True'),
    lambda rng: {'question': words(rng), 'passage': words(rng, 20, 40)},
  ),
  'cb': (
    {'premise': TEXT(), 'hypothesis': TEXT()},
    ('entailment', 'contradiction', 'neutral'),
    text_pair('premise', 'hypothesis'),
  ),
  'copa': (
    {k: TEXT() for k in ('premise', 'choice1', 'choice2', 'question')},
    ('choice1', 'choice2'),
    copa_example,
  ),
  'wsc.fixed': (
    {
      'text': TEXT(),
      'span1_index': np.int32,
      'span2_index': np.int32,
      'span1_text': TEXT(),
      'span2_text': TEXT(),
    },
    ('False', 'True'),
    wsc_example,
  ),
}
MAKERS = {
  **{name: lambda rng: {'sentence': words(rng)} for name in ('cola', 'sst2')},
  **{name: text_pair('sentence1', 'sentence2') for name in ('stsb', 'mrpc', 'rte')},
}


def split_sizes(config: str) -> dict[str, int]:
  """The TFDS splits of ``config`` and their sizes."""
  return MNLI_SIZES if config == 'mnli' else SIZES


def fake_examples(config: str, split: str) -> list[dict]:
  """The tiny dataset's examples of ``config``'s ``split``: a function of both,
  so a test can tell which split was read. Test splits are unlabelled."""
  _, classes, maker = {**GLUE, **SUPER_GLUE}[config]
  maker = maker or MAKERS[config]
  rng = np.random.default_rng([len(config), *split.encode()])
  examples = []
  for i in range(split_sizes(config)[split]):
    if split.startswith('test'):
      label = -1
    else:
      label = int(rng.integers(len(classes))) if classes else rng.uniform(0, 5)
    examples.append({**maker(rng), 'label': label, 'idx': i})
  return examples


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """``fake_examples`` with a table's features."""

  TABLE: ClassVar[dict] = {}
  # No code dir, so no checksums file to look up (tfds would otherwise need
  # the importlib_resources package, which it does not install).
  code_path = None

  def _info(self):
    features, classes, _ = self.TABLE[self.builder_config.name]
    label = tfds.features.ClassLabel(names=classes) if classes else np.float32
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {**features, 'label': label, 'idx': np.int32}
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config.name
    return {split: self._generate_examples(split) for split in split_sizes(config)}

  def _generate_examples(self, split):
    for example in fake_examples(self.builder_config.name, split):
      yield example['idx'], example


class FakeGlue(_Builder, skip_registration=True):
  name = 'glue'
  VERSION = tfds.core.Version('2.0.0')
  BUILDER_CONFIGS: ClassVar = [tfds.core.BuilderConfig(name=n) for n in GLUE]
  TABLE: ClassVar = GLUE


class FakeSuperGlue(_Builder, skip_registration=True):
  name = 'super_glue'
  VERSION = tfds.core.Version('1.0.2')
  BUILDER_CONFIGS: ClassVar = [tfds.core.BuilderConfig(name=n) for n in SUPER_GLUE]
  TABLE: ClassVar = SUPER_GLUE


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> str:
  """Every task's tiny dataset, prepared as array_record."""
  directory = str(tmp_path_factory.mktemp('tfds'))
  tfds.disable_progress_bar()
  for builder, table in ((FakeGlue, GLUE), (FakeSuperGlue, SUPER_GLUE)):
    for config in table:
      builder(
        config=config, data_dir=directory, file_format='array_record'
      ).download_and_prepare()
  return directory


# ---------------------------------------------------------------------------
# A tiny random RoBERTa checkpoint and tokenizer.


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
  """Word-level, with RoBERTa's ``<s> a </s></s> b </s>`` and pad id 1."""
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(VOCAB, '<unk>'))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tokenizer.post_processor = tokenizers.processors.RobertaProcessing(
    ('</s>', 2), ('<s>', 0)
  )
  specials = dict(bos_token='<s>', cls_token='<s>', eos_token='</s>')
  return transformers.PreTrainedTokenizerFast(
    tokenizer_object=tokenizer,
    **specials,
    sep_token='</s>',
    unk_token='<unk>',
    pad_token='<pad>',
  )


def write_checkpoint(directory) -> None:
  """config.json, model.safetensors (``roberta.*``, no pooler), tokenizer."""
  hf_config = transformers.RobertaConfig(
    vocab_size=len(VOCAB),
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=64 + PAD + 1,
    type_vocab_size=1,
    pad_token_id=PAD,
    layer_norm_eps=1e-5,
  )
  hf_config.save_pretrained(directory)
  layout = bert.hf_layout(bert.BertConfig.from_hf(hf_config))
  shapes = paths.flatten(layout.abstract)
  rng = np.random.default_rng(0)
  weights = {}
  for row in layout.tensors:
    if not row.optional:  # No pooler, as in roberta-base.
      shape = shapes[row.path].shape
      shape = shape[::-1] if row.transform else shape  # torch (out, in)
      weights[f'roberta.{row.name}'] = rng.normal(0, 0.1, shape).astype(np.float32)
  safetensors_numpy.save_file(weights, str(directory / 'model.safetensors'))
  tiny_tokenizer().save_pretrained(directory)


@pytest.fixture(scope='module')
def checkpoint_dir(tmp_path_factory) -> str:
  directory = tmp_path_factory.mktemp('roberta')
  write_checkpoint(directory)
  return str(directory)


# ---------------------------------------------------------------------------
# Reading, encoding, batching.


def expected_shape(task: str, n: int) -> tuple[int, ...]:
  if glue.TASKS[task].kind == glue.MULTIPLE_CHOICE:
    return (n, 2, MAX_LENGTH)
  return (n, MAX_LENGTH)


def config_of(task: str) -> str:
  return glue.TASKS[task].tfds_name.split('/')[1]


@pytest.mark.parametrize('task', list(glue.TASKS))
def test_every_task_reads_encodes_and_batches(task, data_dir):
  splits = glue.load(task, data_dir, heldout=0.1)
  sizes = split_sizes(config_of(task))
  test_splits = MNLI_TEST_SPLITS if task == 'mnli' else TEST_SPLITS
  assert {k: len(v) for k, v in splits.items()} == {
    'train': 18,
    'validation': 2,
    **{k: sizes[v] for k, v in test_splits.items()},  # TFDS dev: our test
  }
  held = sorted(e['idx'] for e in splits['train'] + splits['validation'])
  assert held == list(range(SIZES['train']))
  for name, tfds_split in test_splits.items():
    test_ids = sorted(e['idx'] for e in splits[name])  # files are key-shuffled
    assert test_ids == list(range(sizes[tfds_split]))

  arrays = glue.encode(task, tiny_tokenizer(), splits['train'], MAX_LENGTH)
  for key in ('input_ids', 'attention_mask', 'token_type_ids'):
    assert arrays[key].shape == expected_shape(task, 18), key
    assert arrays[key].dtype == np.int32
  ids = arrays['input_ids'].reshape(-1, MAX_LENGTH)
  assert np.all(ids[:, 0] == VOCAB['<s>']) and not np.any(arrays['token_type_ids'])
  assert np.all((ids == PAD) == (arrays['attention_mask'].reshape(ids.shape) == 0))
  labels = [e['label'] for e in splits['train']]
  np.testing.assert_allclose(arrays['label'], labels, rtol=1e-6)
  kind = glue.TASKS[task].kind
  assert arrays['label'].dtype == (np.float32 if kind == glue.REGRESSION else np.int32)
  is_pair = task not in ('cola', 'sst2')
  two_seps = np.any((ids[:, :-1] == 2) & (ids[:, 1:] == 2), axis=1)
  assert np.all(two_seps == is_pair)  # <s> a </s></s> b </s> for pairs

  batch = batching.train_batches(arrays, 4, seed=0)[3]
  assert batch['input_ids'].shape == expected_shape(task, 4)
  assert batch['label'].shape == (4,)


def as_str(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def rows(examples: list[dict]) -> list[tuple[str, ...]]:
  """The examples' values (in key order) as strings, sorted."""
  return sorted(tuple(as_str(e[k]) for k in sorted(e)) for e in examples)


def test_mnli_reads_matched_and_mismatched_dev_as_two_test_splits(data_dir):
  splits = glue.load('mnli', data_dir, heldout=0.1)
  assert list(splits) == ['train', 'validation', 'test', 'test_mismatched']
  for name, tfds_split in MNLI_TEST_SPLITS.items():  # matched, mismatched
    assert rows(splits[name]) == rows(fake_examples('mnli', tfds_split))
  train = splits['train'] + splits['validation']
  assert rows(train) == rows(fake_examples('mnli', 'train'))
  labels = glue.encode('mnli', tiny_tokenizer(), train, MAX_LENGTH)['label']
  assert set(labels.tolist()) == {0, 1, 2}


def test_boolq_encodes_question_then_truncated_passage(data_dir):
  examples = glue.load('boolq', data_dir, heldout=0.0)['test']
  arrays = glue.encode('boolq', tiny_tokenizer(), examples, MAX_LENGTH)
  for example, row in zip(examples, arrays['input_ids'], strict=True):
    question = [VOCAB[w] for w in as_str(example['question']).split()]
    passage = [VOCAB[w] for w in as_str(example['passage']).split()]
    assert len(question) + len(passage) + 4 > MAX_LENGTH  # 20+ passage words
    # <s> question </s></s> passage </s>, the passage cut to fit.
    kept = passage[: MAX_LENGTH - 4 - len(question)]
    assert row.tolist() == [0, *question, 2, 2, *kept, 2]
  assert arrays['label'].tolist() == [e['label'] for e in examples]


def test_copa_and_wsc_framing():
  copa = {
    'premise': b'My body cast a shadow over the grass.',
    'question': b'cause',
    'choice1': b'The sun was rising.',
    'choice2': b'The grass was cut.',
  }
  prompt, choices = glue.copa_inputs(copa)
  assert prompt == 'My body cast a shadow over the grass. What was the cause of this?'
  assert choices == ['The sun was rising.', 'The grass was cut.']
  text = 'Mark told Pete many lies about himself. He should have been truthful.'
  assert glue.mark_pronoun(text, 7, 'He') == text.replace('He ', '*He* ')
  assert glue.mark_pronoun(text, 6, 'He') == text  # index off: left unmarked
  assert glue.mark_pronoun(text, 40, 'He') == text
  wsc = {
    'text': text.encode(),
    'span1_index': 0,
    'span1_text': b'Mark',
    'span2_index': 7,
    'span2_text': b'He',
  }
  marked, claim = glue.wsc_inputs(wsc)
  assert '*He*' in marked and claim == 'He refers to Mark.'


def test_copa_rows_pair_the_prompt_with_each_choice(data_dir):
  tokenizer = tiny_tokenizer()
  examples = glue.load('copa', data_dir, heldout=0.0)['train'][:3]
  assert glue.load('copa', data_dir, heldout=0.0).keys() == {'train', 'test'}
  arrays = glue.encode('copa', tokenizer, examples, MAX_LENGTH)
  for i, example in enumerate(examples):
    prompt, choices = glue.copa_inputs(example)
    for c, choice in enumerate(choices):
      expected = tokenizer(prompt, choice)['input_ids']
      row = arrays['input_ids'][i, c]
      assert row[: len(expected)].tolist() == expected
      assert np.all(row[len(expected) :] == PAD)


def test_missing_data_hidden_labels_and_bad_arguments_are_errors(data_dir, tmp_path):
  with pytest.raises(pj.PeftError, match=r'no glue/rte in .*tfds build glue/rte'):
    glue.read_split('rte', 'train', str(tmp_path))
  build = f'`tfds build glue/mnli --file_format=array_record --data_dir={tmp_path}`'
  with pytest.raises(pj.PeftError) as error:
    glue.load('mnli', str(tmp_path))
  assert str(error.value) == f'no glue/mnli in {tmp_path}; prepare it where ' + (
    f'TensorFlow is installed: {build}'
  )
  with pytest.raises(pj.PeftError, match=r'cannot read glue/rte\[dev\]'):
    glue.read_split('rte', 'dev', data_dir)
  test = glue.read_split('rte', 'test', data_dir)
  with pytest.raises(pj.PeftError, match='label -1 is not in'):
    glue.encode('rte', tiny_tokenizer(), test, MAX_LENGTH)
  with pytest.raises(pj.PeftError, match=r'heldout=1\.0 must be in'):
    glue.load('rte', data_dir, heldout=1.0)


# ---------------------------------------------------------------------------
# tfds's own GLUE and SuperGLUE builders.


@pytest.fixture
def real_builders(monkeypatch):
  """tfds's ``glue`` and ``super_glue`` builders, registered for one test.

  Without TensorFlow tfds registers none of its text datasets: it imports its
  dataset modules in turn and stops at the first that fails
  (``nearest_neighbors`` needs h5py). ``SuperGlue._info`` names
  ``tf.int32``, which needs TensorFlow: numpy's stands in.
  """
  with registered.skip_registration():
    from tensorflow_datasets.text import glue as tfds_glue
    from tensorflow_datasets.text import super_glue as tfds_super_glue
  monkeypatch.setitem(registered._DATASET_REGISTRY, 'glue', tfds_glue.Glue)
  monkeypatch.setitem(
    registered._DATASET_REGISTRY, 'super_glue', tfds_super_glue.SuperGlue
  )
  monkeypatch.setattr(tfds_super_glue, 'tf', types.SimpleNamespace(int32=np.int32))


class NoDownloads:
  """A download manager that downloads nothing: enough for a builder's
  ``_split_generators`` to name its splits."""

  def download(self, url):
    return url

  download_and_extract = download


@pytest.mark.parametrize('task', list(glue.TASKS))
def test_the_fake_builders_mirror_the_real_ones(task, real_builders, tmp_path):
  config = config_of(task)
  real = tfds.builder(glue.TASKS[task].tfds_name, data_dir=str(tmp_path))
  fake_builder = FakeGlue if config in GLUE else FakeSuperGlue
  fake = fake_builder(config=config, data_dir=str(tmp_path))
  real_features, fake_features = real.info.features, fake.info.features
  assert real_features.get_tensor_info() == fake_features.get_tensor_info()
  real_label, fake_label = real_features['label'], fake_features['label']
  assert getattr(real_label, 'names', None) == getattr(fake_label, 'names', None)
  splits = {s.name for s in real._split_generators(NoDownloads())}
  assert splits == set(split_sizes(config))


@pytest.mark.parametrize('task', ['mnli', 'boolq'])
def test_the_real_builders_load_and_encode_under_mock_data(task, real_builders):
  mock = tfds.testing.mock_data(
    num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE
  )
  with mock:  # mock_data ignores the data dir: nothing is read from it
    splits = glue.load(task, '/nonexistent', heldout=0.2)
  test_splits = MNLI_TEST_SPLITS if task == 'mnli' else TEST_SPLITS
  assert {k: len(v) for k, v in splits.items()} == {
    'train': 8,
    'validation': 2,
    **dict.fromkeys(test_splits, 10),
  }
  features, classes, _ = {**GLUE, **SUPER_GLUE}[config_of(task)]
  for examples in splits.values():
    assert all(set(e) == {*features, 'label', 'idx'} for e in examples)
  arrays = glue.encode(task, tiny_tokenizer(), splits['train'], MAX_LENGTH)
  assert arrays['input_ids'].shape == (8, MAX_LENGTH)
  two_seps = (arrays['input_ids'][:, :-1] == 2) & (arrays['input_ids'][:, 1:] == 2)
  assert np.all(np.any(two_seps, axis=1))  # <s> a </s></s> b </s>
  assert set(arrays['label'].tolist()) <= set(range(len(classes)))


@pytest.mark.parametrize('task', ['mnli', 'boolq'])
def test_errors_stay_one_line_where_tfds_has_the_builders(
  task, real_builders, data_dir, tmp_path
):
  # The prepared data read through the builders' code, not just their files.
  assert len(glue.read_split(task, 'train', data_dir)) == SIZES['train']
  tfds_name = glue.TASKS[task].tfds_name
  build = f'`tfds build {tfds_name} --file_format=array_record --data_dir={tmp_path}`'
  with pytest.raises(pj.PeftError) as error:
    glue.load(task, str(tmp_path))
  assert str(error.value) == (
    f'no {tfds_name} in {tmp_path}; prepare it where TensorFlow is installed: {build}'
  )
  (tmp_path / tfds_name).mkdir(parents=True)  # there, but not prepared
  with pytest.raises(pj.PeftError) as error:
    glue.load(task, str(tmp_path))
  message = str(error.value)
  assert message.startswith(f'cannot read {tfds_name}[train] in {tmp_path} (')
  assert message.endswith(build) and '\n' not in message


# ---------------------------------------------------------------------------
# The config, the task side and the trainer.


def config_for(task, checkpoint_dir, data_dir, extra='runlocal'):
  arg = f'task={task},checkpoint={checkpoint_dir},data_dir={data_dir},{extra}'
  config = common.load_config(f'{CONFIG}:{arg}')
  config.model.max_length = MAX_LENGTH
  return config


def test_config_needs_local_dirs_and_builds_every_task(
  checkpoint_dir, data_dir, tmp_path, monkeypatch
):
  for task in glue.TASKS:
    config = config_for(task, checkpoint_dir, data_dir, extra='method=bitfit')
    assert config.task == 'glue' and config.data.task == task
    assert config.adapters[0] == (glue_config.HEAD, 'full()')
    assert config.model.max_length == MAX_LENGTH
  for task, max_length in (('cb', 256), ('boolq', 256), ('mnli', 128)):
    arg = f'task={task},checkpoint={checkpoint_dir},data_dir={data_dir}'
    assert common.load_config(f'{CONFIG}:{arg}').model.max_length == max_length
  with pytest.raises(pj.PeftError, match='checkpoint= is required'):
    common.load_config(f'{CONFIG}:data_dir={data_dir}')
  with pytest.raises(pj.PeftError, match='is not a directory'):
    common.load_config(f'{CONFIG}:checkpoint={tmp_path}/nope,data_dir={data_dir}')
  monkeypatch.delenv('TFDS_DATA_DIR', raising=False)
  with pytest.raises(pj.PeftError, match=r'data_dir= is required.*TFDS_DATA_DIR'):
    common.load_config(f'{CONFIG}:checkpoint={checkpoint_dir}')
  monkeypatch.setenv('TFDS_DATA_DIR', data_dir)
  config = common.load_config(f'{CONFIG}:checkpoint={checkpoint_dir}')
  assert config.data.data_dir == data_dir
  with pytest.raises(
    pj.PeftError, match=r"task='squad' is unknown; expected one of cola"
  ):
    common.load_config(f'{CONFIG}:task=squad,checkpoint={checkpoint_dir}')
  assert 'method=lora' in glue_config.sweep()


@pytest.mark.parametrize('task', ['stsb', 'copa', 'cb', 'mnli'])
def test_task_loss_and_evaluation_on_a_tiny_roberta(task, checkpoint_dir, data_dir):
  config = config_for(task, checkpoint_dir, data_dir)
  built = glue_task.build(config)
  # RoBERTa-base has no pooler: a new one was initialised for the head.
  assert 'pooler' in built.frozen['bert'] and 'classifier' in built.frozen
  batch = built.train_batch(0)
  loss, metrics = jax.jit(built.loss_fn)(built.frozen, batch, None)  # no dropout
  assert np.isfinite(loss) and set(metrics) == (
    {'mse'} if task == 'stsb' else {'accuracy'}
  )
  tree = pj.by_rules(config.adapters)
  params, buffers = tree.init(jax.random.key(1), built.frozen, built.hooks)
  results = built.evaluate(tree, built.frozen, params, buffers)
  names = {
    'stsb': ('pearson', 'spearman'),
    'copa': ('accuracy',),
    'cb': ('accuracy', 'macro_f1'),
    'mnli': ('accuracy',),
  }[task]
  # Every split but train is evaluated: MNLI's mismatched dev set too.
  test_splits = MNLI_TEST_SPLITS if task == 'mnli' else TEST_SPLITS
  for split in ('validation', *test_splits):
    assert f'{split}_score' in results
    for name in names:
      assert np.isfinite(results[f'{split}_{name}'])
  sizes = split_sizes(config_of(task))
  for split, tfds_split in test_splits.items():
    assert results[f'{split}_examples'] == sizes[tfds_split]


@pytest.mark.slow
def test_trainer_runs_a_glue_task_end_to_end(checkpoint_dir, data_dir, tmp_path):
  config = config_for('rte', checkpoint_dir, data_dir, extra='runlocal,method=lora')
  row = train.train_and_evaluate(config, str(tmp_path))
  d = 16
  head = (d * 2 + 2) + (d * d + d)  # classifier, and the new pooler
  assert row['trainable_params'] == head + 2 * (d * 8 + 8 * d)  # LoRA q, v
  for split in ('validation', 'test'):
    assert 0 <= row[f'after_{split}_accuracy'] <= 1
    assert row[f'after_{split}_score'] == row[f'after_{split}_accuracy']
  assert row['metric'] == 'score'  # what the comparison tables read
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  losses = [json.loads(line)['loss'] for line in lines if 'loss' in line]
  assert len(losses) == 3 and np.all(np.isfinite(losses))
