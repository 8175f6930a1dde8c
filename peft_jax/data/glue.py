"""GLUE and SuperGLUE tasks, read from prepared TFDS data.

Fu et al. (AAAI 2023, the SAM paper) fine-tune RoBERTa-base through jiant on
CoLA, STS-B, MRPC, RTE (GLUE) and CB, COPA, WSC (SuperGLUE), scored by
jiant's default metric per task; the rest of GLUE (SST-2, QQP, QNLI, MNLI)
completes a GLUE table such as the See Further paper's, and BoolQ is
SuperGLUE's yes/no reading comprehension. This module holds the task table
(``TASKS``), the metrics, and the path from a TFDS data dir to model inputs:

* ``load(task, data_dir)`` reads the splits with ``tfds.data_source`` (no
  TensorFlow: the dataset must already be prepared in ``data_dir`` in the
  ``array_record`` format) and follows the SAM code's protocol: GLUE and
  SuperGLUE test labels are hidden, so the TFDS dev split (``validation``;
  MNLI's ``validation_matched``, and ``validation_mismatched`` as the extra
  split ``test_mismatched``) is the *test* split and a seeded ``heldout``
  fraction of TFDS ``train`` is the *validation* split.
* ``encode(task, tokenizer, examples, max_length)`` turns examples into
  fixed-length token arrays (one shape, one compile).
* training batches come from ``batching.train_batches`` (a grain pipeline
  whose item ``t`` is the batch of step ``t``, shared with the offline
  tasks), evaluation batches from ``batching.eval_batches``.

Preparing the data needs TensorFlow once, on any machine (then copy the dir)::

  tfds build glue/cola --file_format=array_record --data_dir=DIR

and likewise ``glue/{sst2,mrpc,qqp,stsb,mnli,qnli,rte}`` and
``super_glue/{boolq,cb,copa,wsc.fixed}``.
"""

import os
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
import scipy.stats
import tensorflow_datasets as tfds

from peft_jax._src.base import PeftError

Arrays = dict[str, np.ndarray]
Example = dict[str, Any]

CLASSIFICATION = 'classification'
REGRESSION = 'regression'
MULTIPLE_CHOICE = 'multiple_choice'

# jiant's COPA prompt: the premise, then the question its label answers.
COPA_QUESTIONS = {
  'cause': 'What was the cause of this?',
  'effect': 'What happened as a result?',
}


# ---------------------------------------------------------------------------
# Metrics (pure NumPy; jiant's definitions).


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
  """Share of ``preds`` equal to ``labels``."""
  return float(np.mean(np.asarray(preds) == np.asarray(labels)))


def f1(preds: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
  """F1 of class ``positive``: ``2tp / (2tp + fp + fn)``, 0 when undefined
  (no positive label and no positive prediction), as sklearn returns."""
  pred, true = np.asarray(preds) == positive, np.asarray(labels) == positive
  tp = np.sum(pred & true)
  denominator = 2 * tp + np.sum(pred & ~true) + np.sum(~pred & true)
  return float(2 * tp / denominator) if denominator else 0.0


def macro_f1(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
  """Unweighted mean of the one-vs-rest F1 of classes ``0..num_classes-1``."""
  return float(np.mean([f1(preds, labels, c) for c in range(num_classes)]))


def matthews_corr(preds: np.ndarray, labels: np.ndarray) -> float:
  """Matthews correlation (multi-class form, as sklearn's).

  ``(c·s - t·p) / sqrt((s² - p·p)(s² - t·t))`` over the confusion matrix:
  ``c`` correct predictions, ``s`` examples, ``t``/``p`` the true/predicted
  counts per class. 0 when a denominator factor is 0 (e.g. one class
  predicted for every example).
  """
  preds, labels = np.asarray(preds), np.asarray(labels)
  classes = np.union1d(preds, labels)
  t = np.array([np.sum(labels == k) for k in classes], np.float64)
  p = np.array([np.sum(preds == k) for k in classes], np.float64)
  c, s = float(np.sum(preds == labels)), float(len(labels))
  denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
  return float((c * s - t @ p) / denominator) if denominator else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
  """Pearson correlation; 0 when either input is constant."""
  x = np.asarray(x, np.float64) - np.mean(x)
  y = np.asarray(y, np.float64) - np.mean(y)
  denominator = np.sqrt((x @ x) * (y @ y))
  return float(x @ y / denominator) if denominator else 0.0


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  """Spearman correlation: Pearson of the ranks (ties get their mean rank)."""
  return pearson(scipy.stats.rankdata(x), scipy.stats.rankdata(y))


def matthews_report(preds, labels, num_labels: int) -> dict[str, float]:
  """CoLA: Matthews correlation (jiant's major metric), plus accuracy."""
  del num_labels
  mcc = matthews_corr(preds, labels)
  return {'matthews_corr': mcc, 'accuracy': accuracy(preds, labels), 'score': mcc}


def correlation_report(preds, labels, num_labels: int) -> dict[str, float]:
  """STS-B: the mean of Pearson and Spearman correlation."""
  del num_labels
  r, rho = pearson(preds, labels), spearman(preds, labels)
  return {'pearson': r, 'spearman': rho, 'score': (r + rho) / 2}


def accuracy_f1_report(preds, labels, num_labels: int) -> dict[str, float]:
  """MRPC, QQP: the mean of accuracy and the F1 of class 1 (equivalent,
  duplicate), GLUE's official pair for both."""
  del num_labels
  acc, f = accuracy(preds, labels), f1(preds, labels)
  return {'accuracy': acc, 'f1': f, 'score': (acc + f) / 2}


def accuracy_macro_f1_report(preds, labels, num_labels: int) -> dict[str, float]:
  """CB: the mean of accuracy and the macro F1 over the three classes."""
  acc, f = accuracy(preds, labels), macro_f1(preds, labels, num_labels)
  return {'accuracy': acc, 'macro_f1': f, 'score': (acc + f) / 2}


def accuracy_report(preds, labels, num_labels: int) -> dict[str, float]:
  """SST-2, QNLI, MNLI, RTE, BoolQ, COPA, WSC: accuracy."""
  del num_labels
  acc = accuracy(preds, labels)
  return {'accuracy': acc, 'score': acc}


# ---------------------------------------------------------------------------
# How an example becomes model input.


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def single(field: str) -> Callable[[Example], tuple[str, None]]:
  """One text segment: the example's ``field``."""
  return lambda example: (_text(example[field]), None)


def pair(first: str, second: str) -> Callable[[Example], tuple[str, str]]:
  """A segment pair, encoded ``<s> first </s></s> second </s>`` (RoBERTa)."""
  return lambda example: (_text(example[first]), _text(example[second]))


def copa_inputs(example: Example) -> tuple[str, list[str]]:
  """COPA, as jiant frames it: the prompt ``premise + ' ' + question`` (the
  question asks for the cause or the effect), paired with each choice;
  every ``(prompt, choice_i)`` pair is scored and the best one is the
  prediction."""
  question = COPA_QUESTIONS[_text(example['question'])]
  prompt = f'{_text(example["premise"])} {question}'
  return prompt, [_text(example['choice1']), _text(example['choice2'])]


def mark_pronoun(text: str, index: int, span: str) -> str:
  """``text`` with the ``span`` at word ``index`` wrapped in ``*``.

  SuperGLUE WSC indexes spans by words of ``text.split(' ')``; when the
  words there do not start with ``span`` (a known defect of a few
  examples), ``text`` is returned unmarked.
  """
  words, span_words = text.split(' '), span.split(' ')
  end = index + len(span_words)
  found = ' '.join(words[max(index, 0) : end])
  if index < 0 or not found.lower().startswith(span_words[0].lower()):
    return text
  return ' '.join([*words[:index], f'*{found}*', *words[end:]])


def wsc_inputs(example: Example) -> tuple[str, str]:
  """WSC as a binary segment pair (jiant uses a span-comparison head
  instead): the text with the pronoun (``span2``) marked by ``*``, then the
  claim ``'<pronoun> refers to <candidate>.'``; the label says if it holds.
  """
  text, pronoun = _text(example['text']), _text(example['span2_text'])
  marked = mark_pronoun(text, int(example['span2_index']), pronoun)
  return marked, f'{pronoun} refers to {_text(example["span1_text"])}.'


class Task(NamedTuple):
  """One GLUE or SuperGLUE task.

  Attributes:
    tfds_name: the TFDS dataset and config, e.g. ``'glue/cola'``.
    kind: ``CLASSIFICATION``, ``REGRESSION`` or ``MULTIPLE_CHOICE``.
    num_labels: classes; 1 for regression; choices for multiple choice.
    inputs: example -> ``(text, text_pair or None)``, or for multiple
      choice ``(prompt, [choice, ...])``.
    report: ``(preds, labels, num_labels) -> {metric: float}``; ``'score'``
      is jiant's default (major) metric.
    test_splits: our test split names -> the TFDS splits read for them (the
      dev splits: the TFDS test labels are hidden).
  """

  tfds_name: str
  kind: str
  num_labels: int
  inputs: Callable[[Example], tuple]
  report: Callable[..., dict[str, float]]
  test_splits: Mapping[str, str] = MappingProxyType({'test': 'validation'})


# TFDS features (tensorflow_datasets/text/glue.py, super_glue.py, 4.9.10),
# label a ClassLabel unless said, idx int32 everywhere:
# glue/cola sentence (unacceptable, acceptable); glue/sst2 sentence
# (negative, positive); glue/{stsb,mrpc,rte} sentence1, sentence2 (stsb: a
# float32 score 0..5; mrpc: not_equivalent, equivalent; rte: entailment,
# not_entailment); glue/qqp question1, question2 (not_duplicate, duplicate);
# glue/qnli question, sentence (entailment, not_entailment); glue/mnli
# premise, hypothesis (entailment, neutral, contradiction), splits train,
# validation_{matched,mismatched}, test_{matched,mismatched};
# super_glue/boolq question, passage (False, True); super_glue/cb premise,
# hypothesis (entailment, contradiction, neutral); super_glue/copa premise,
# choice1, choice2, question ('cause'/'effect') (choice1, choice2);
# super_glue/wsc.fixed text, span1_index, span2_index, span1_text, span2_text
# (False, True).
TASKS = {
  'cola': Task('glue/cola', CLASSIFICATION, 2, single('sentence'), matthews_report),
  'sst2': Task('glue/sst2', CLASSIFICATION, 2, single('sentence'), accuracy_report),
  'stsb': Task(
    'glue/stsb', REGRESSION, 1, pair('sentence1', 'sentence2'), correlation_report
  ),
  'mrpc': Task(
    'glue/mrpc', CLASSIFICATION, 2, pair('sentence1', 'sentence2'), accuracy_f1_report
  ),
  'qqp': Task(
    'glue/qqp', CLASSIFICATION, 2, pair('question1', 'question2'), accuracy_f1_report
  ),
  'mnli': Task(
    'glue/mnli',
    CLASSIFICATION,
    3,
    pair('premise', 'hypothesis'),
    accuracy_report,
    {'test': 'validation_matched', 'test_mismatched': 'validation_mismatched'},
  ),
  'qnli': Task(
    'glue/qnli', CLASSIFICATION, 2, pair('question', 'sentence'), accuracy_report
  ),
  'rte': Task(
    'glue/rte', CLASSIFICATION, 2, pair('sentence1', 'sentence2'), accuracy_report
  ),
  'boolq': Task(
    'super_glue/boolq', CLASSIFICATION, 2, pair('question', 'passage'), accuracy_report
  ),
  'cb': Task(
    'super_glue/cb',
    CLASSIFICATION,
    3,
    pair('premise', 'hypothesis'),
    accuracy_macro_f1_report,
  ),
  'copa': Task('super_glue/copa', MULTIPLE_CHOICE, 2, copa_inputs, accuracy_report),
  'wsc': Task('super_glue/wsc.fixed', CLASSIFICATION, 2, wsc_inputs, accuracy_report),
}


def get_task(name: str) -> Task:
  """``TASKS[name]``, or a one-line error listing the tasks."""
  if name not in TASKS:
    raise PeftError(f'unknown GLUE task {name!r}; expected one of {", ".join(TASKS)}')
  return TASKS[name]


def metrics(name: str, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """The task's report on model ``outputs``: logits ``(n, num_labels)``
  (predictions by argmax), or ``(n,)``/``(n, 1)`` regression outputs."""
  task = get_task(name)
  outputs = np.asarray(outputs)
  if task.kind == REGRESSION:
    preds = outputs.reshape(len(outputs))
  else:
    preds = np.argmax(outputs, axis=-1)
  return task.report(preds, np.asarray(labels), task.num_labels)


# ---------------------------------------------------------------------------
# Reading prepared TFDS data.


def _decode(record: dict) -> Example:
  """``record`` with its numpy scalars (and 0-d arrays) as Python scalars."""
  return {
    k: v.item() if isinstance(v, np.generic | np.ndarray) and v.ndim == 0 else v
    for k, v in record.items()
  }


def read_split(name: str, split: str, data_dir: str) -> list[Example]:
  """Every example of a TFDS split, in file order (random access, no TF).

  Raises:
    PeftError: (one line) if ``data_dir`` holds no prepared ``array_record``
      copy of the task's dataset or split.
  """
  tfds_name = get_task(name).tfds_name
  hint = (
    f'prepare it where TensorFlow is installed: `tfds build {tfds_name} '
    f'--file_format=array_record --data_dir={data_dir}`'
  )
  missing = PeftError(f'no {tfds_name} in {data_dir}; {hint}')
  try:
    source = tfds.data_source(
      tfds_name, split=split, data_dir=data_dir, download=False, try_gcs=False
    )
  except tfds.core.DatasetNotFoundError:
    raise missing from None
  except (AssertionError, NotImplementedError, ValueError) as e:
    # Where tfds has the builder's code (e.g. TensorFlow installed), a missing
    # dataset is not DatasetNotFoundError but a file format error.
    if not os.path.isdir(os.path.join(data_dir, tfds_name)):
      raise missing from None
    reason = ' '.join(str(e).split())
    raise PeftError(
      f'cannot read {tfds_name}[{split}] in {data_dir} ({reason}); {hint}'
    ) from None
  return [_decode(source[i]) for i in range(len(source))]


def load(
  name: str, data_dir: str, heldout: float = 0.1, seed: int = 0
) -> dict[str, list[Example]]:
  """The splits of the SAM paper's protocol.

  Args:
    name: a key of ``TASKS``.
    data_dir: the TFDS data dir holding the prepared dataset.
    heldout: share of TFDS ``train`` held out as ``validation`` (0: none).
    seed: seed of the held-out draw.

  Returns:
    ``{'train', 'validation' (if heldout), 'test', ...}`` lists of examples;
    the test splits are the task's ``test_splits`` (``test`` is TFDS
    ``validation``, for MNLI ``validation_matched``, plus
    ``test_mismatched`` from ``validation_mismatched``: the test labels are
    hidden).
  """
  if not 0 <= heldout < 1:
    raise PeftError(f'heldout={heldout} must be in [0, 1)')
  train = read_split(name, 'train', data_dir)
  order = np.random.default_rng(seed).permutation(len(train))
  n_heldout = round(heldout * len(train))
  splits = {'train': [train[i] for i in np.sort(order[n_heldout:])]}
  if n_heldout:
    splits['validation'] = [train[i] for i in np.sort(order[:n_heldout])]
  for split, tfds_split in get_task(name).test_splits.items():
    splits[split] = read_split(name, tfds_split, data_dir)
  return splits


# ---------------------------------------------------------------------------
# Tokenising and batching.


def _tokenize(tokenizer, first, second, max_length: int) -> Arrays:
  """Fixed-length ``input_ids``, ``attention_mask``, ``token_type_ids``."""
  encoded = tokenizer(
    list(first),
    None if second is None else list(second),
    max_length=max_length,
    truncation=True,
    padding='max_length',
    return_token_type_ids=True,
    return_tensors='np',
  )
  keys = ('input_ids', 'attention_mask', 'token_type_ids')
  return {k: encoded[k].astype(np.int32) for k in keys}


def labels_of(name: str, examples: list[Example]) -> np.ndarray:
  """The examples' labels: float32 scores (regression) or int32 ids.

  Raises:
    PeftError: if a class label is out of range (e.g. the -1 of a split
      whose labels are hidden).
  """
  task = get_task(name)
  if task.kind == REGRESSION:
    return np.array([e['label'] for e in examples], np.float32)
  labels = np.array([e['label'] for e in examples], np.int32)
  bad = (labels < 0) | (labels >= task.num_labels)
  if bad.any():
    raise PeftError(
      f'{name}: label {labels[bad][0]} is not in [0, {task.num_labels}); a split '
      'with hidden labels (GLUE test) cannot be trained or scored'
    )
  return labels


def encode(name: str, tokenizer, examples: list[Example], max_length: int) -> Arrays:
  """Token arrays and labels of ``examples``.

  Args:
    name: a key of ``TASKS``.
    tokenizer: a Hugging Face tokenizer (``transformers.AutoTokenizer``).
    examples: from ``load``.
    max_length: tokens per sequence (pairs are truncated longest first).

  Returns:
    ``input_ids``, ``attention_mask``, ``token_type_ids`` int32 of shape
    ``(n, max_length)`` (multiple choice: ``(n, num_choices, max_length)``,
    one ``(prompt, choice)`` pair a row), and ``label`` ``(n,)``.
  """
  task = get_task(name)
  inputs = [task.inputs(e) for e in examples]
  if task.kind == MULTIPLE_CHOICE:
    k = task.num_labels
    first = [prompt for prompt, _ in inputs for _ in range(k)]
    second = [choice for _, choices in inputs for choice in choices]
    arrays = _tokenize(tokenizer, first, second, max_length)
    arrays = {key: v.reshape(len(inputs), k, max_length) for key, v in arrays.items()}
  else:
    first, second = zip(*inputs, strict=True) if inputs else ((), ())
    paired = any(s is not None for s in second)
    arrays = _tokenize(tokenizer, first, second if paired else None, max_length)
  return {**arrays, 'label': labels_of(name, examples)}
