"""GLUE/SuperGLUE tasks on a BERT/RoBERTa or DeBERTa-v2/v3 encoder and a new head.

``config.model.family`` (``FAMILIES``; default ``'bert'``) picks the encoder
of ``config.model.checkpoint_dir``, and ``config.data.task`` names one of
``peft_jax.data.glue.TASKS``, whose kind picks the model and the loss:

* classification (CoLA, MRPC, RTE, CB, WSC): one text or a segment pair,
  softmax cross-entropy;
* regression (STS-B): one output, mean squared error against the 0..5 score;
* multiple choice (COPA): each ``(prompt, choice)`` pair encoded on its own
  and scored by one logit, softmax cross-entropy over the choices.

The BERT head is jiant's (and Hugging Face RoBERTa's):
``Dense(tanh(Dense(h_<s>)))`` on the first token, i.e. the encoder's pooler
plus a classifier. RoBERTa masked-LM checkpoints (``roberta-base``) ship no
pooler, so a missing pooler is freshly initialised; the configs train it with
the classifier. The DeBERTa head is Hugging Face's
``DebertaV2ForSequenceClassification``'s: ``Dense(gelu(Dense(h_[CLS])))``
(the context pooler, then dropout at ``config.model.cls_dropout`` where set,
and the classifier), all new (DeBERTa-v3 checkpoints ship no head); DeBERTa
has no multiple-choice model here, so COPA runs on BERT/RoBERTa only.
Evaluation reports jiant's metrics per split (``<split>_<metric>``, with
``<split>_score`` the task's major metric).
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import optax
import transformers
from jax.experimental import multihost_utils

import peft_jax as pj
from experiments import tasks
from peft_jax import PeftError, pretrained
from peft_jax.data import batching, glue
from peft_jax.models import bert, deberta

Arrays = dict[str, np.ndarray]
INPUTS = ('input_ids', 'attention_mask', 'token_type_ids')


def load_arrays(config, tokenizer) -> dict[str, Arrays]:
  """The task's encoded splits."""
  data = config.data
  splits = glue.load(data.task, data.data_dir, data.heldout, seed=config.seed)
  return {
    name: glue.encode(data.task, tokenizer, examples, config.model.max_length)
    for name, examples in splits.items()
  }


class Family(NamedTuple):
  """An encoder family: how to load it and where it sits in the task model.

  Attributes:
    load: ``model_dir -> (encoder config, encoder params)`` of a Hugging
      Face checkpoint directory.
    key: the encoder's subtree in the task model's params.
    param_axes: the family's ``PARAM_AXES`` (for placing it on a mesh).
  """

  load: Callable[[str], tuple[Any, dict]]
  key: str
  param_axes: tuple


FAMILIES = {
  'bert': Family(bert.load_hf, 'bert', bert.PARAM_AXES),
  'deberta': Family(deberta.load_hf, 'deberta', deberta.PARAM_AXES),
}


def family_of(config) -> Family:
  """``FAMILIES[config.model.family]`` (``'bert'`` where unset)."""
  name = config.model.get('family', 'bert')
  if name not in FAMILIES:
    raise PeftError(
      f'model.family={name!r} is unknown; expected one of {", ".join(FAMILIES)}'
    )
  return FAMILIES[name]


def make_model(encoder_config, task: glue.Task):
  """The encoder with the task's head (see the module docstring).

  Raises:
    PeftError: for a multiple-choice task on a DeBERTa encoder.
  """
  if isinstance(encoder_config, deberta.DebertaV2Config):
    if task.kind == glue.MULTIPLE_CHOICE:
      raise PeftError(
        f'{task.tfds_name} is multiple choice, which has no DeBERTa model here; '
        'run it on a BERT/RoBERTa checkpoint'
      )
    return deberta.DebertaV2ForSequenceClassification(encoder_config, task.num_labels)
  if task.kind == glue.MULTIPLE_CHOICE:
    return bert.BertForMultipleChoice(encoder_config)
  return bert.BertForSequenceClassification(
    encoder_config, num_labels=task.num_labels, pooling='cls'
  )


def init_frozen(model, encoder, sample, seed: int, key: str):
  """The frozen tree: the pretrained encoder (subtree ``key``), plus a new
  head (and pooler, where the checkpoint has none) from ``model.init``
  (``pretrained.with_new_leaves``, as ``from_pretrained`` rebuilds them)."""
  return pretrained.with_new_leaves(model, encoder, key, seed, sample)


def make_loss_fn(logits, task: glue.Task):
  """``loss_fn(weights, batch, rng) -> (loss, metrics)`` for the task's kind."""

  def loss_fn(weights, batch, rng):
    out = logits(weights, batch, rng)
    if task.kind == glue.REGRESSION:
      mse = jnp.mean((out[:, 0] - batch['label']) ** 2)
      return mse, {'mse': mse}
    loss = optax.softmax_cross_entropy_with_integer_labels(out, batch['label']).mean()
    return loss, {'accuracy': jnp.mean(jnp.argmax(out, -1) == batch['label'])}

  return loss_fn


def make_evaluate(forward: tasks.Forward, arrays: dict[str, Arrays], config):
  """``evaluate(tree, frozen, params, buffers)``: the task's metrics on the
  first ``config.data.eval_limit`` examples of every split but train, and
  their count (``<split>_examples``), from ``tasks.adapted_outputs`` (one
  compiled program for every seed of a group)."""

  def split_metrics(tree, frozen, params, buffers, name: str) -> dict[str, float]:
    split = tasks.evaluation_split(arrays[name], config.data.eval_limit)
    outputs = lambda batch: tasks.adapted_outputs(
      forward, tree, frozen, params, buffers, batch
    )
    # Every process gathers the outputs (on a mesh spanning several, each
    # holds only its shards), so each computes the split's metrics.
    chunks = [
      multihost_utils.process_allgather(outputs(batch), tiled=True)[batch['weight'] > 0]
      for batch in tasks.evaluation_batches(split, config.eval_batch_size, name)
    ]
    metrics = glue.metrics(config.data.task, np.concatenate(chunks), split['label'])
    return {**metrics, 'examples': len(split['label'])}

  def evaluate(tree, frozen, params, buffers):
    return {
      f'{name}_{metric}': value
      for name in arrays
      if name != 'train'
      for metric, value in split_metrics(tree, frozen, params, buffers, name).items()
    }

  return evaluate


def make_task(
  config, encoder_config, encoder, arrays: dict[str, Arrays], describe
) -> tasks.Task:
  """The task on a loaded encoder (of ``config.model.family``) and encoded
  splits: the head, the hook points, the loss, grain training batches and
  the evaluation."""
  task = glue.get_task(config.data.task)
  family = family_of(config)
  model = make_model(encoder_config, task)
  sample = tuple(arrays['train'][k][:1] for k in INPUTS)
  frozen = init_frozen(model, encoder, sample, config.seed, family.key)

  logits = tasks.Forward(model, INPUTS)

  batches = batching.train_batches(arrays['train'], config.batch_size, config.seed)
  return tasks.Task(
    frozen=frozen,
    hooks=pj.hook_points(model, *sample),
    loss_fn=make_loss_fn(logits, task),
    train_batch=batches.__getitem__,
    evaluate=make_evaluate(logits, arrays, config),
    describe=describe,
    adapter_metadata=adapter_metadata(config, task),
    param_axes=family.param_axes,
  )


def adapter_metadata(config, task: glue.Task) -> dict:
  """What the adapter file records: the checkpoint, the head (``make_model``:
  the encoder family, its new parameters from ``config.seed``; BERT's
  pooling) and the input length."""
  multiple_choice = task.kind == glue.MULTIPLE_CHOICE
  family = config.model.get('family', 'bert')
  return {
    'task': f'glue/{config.data.task}',
    'base_model': config.model.checkpoint_dir,
    'tokenizer': config.model.checkpoint_dir,
    'head': {
      'kind': 'multiple_choice' if multiple_choice else 'sequence_classification',
      'family': family,
      'num_labels': task.num_labels,
      **({'pooling': 'cls'} if family == 'bert' else {}),
      'seed': config.seed,
    },
    'max_length': config.model.max_length,
  }


def load_encoder(config):
  """``(encoder config, encoder params)`` of ``config.model.family`` from
  ``model.checkpoint_dir``; a DeBERTa's ``cls_dropout`` set from
  ``model.cls_dropout`` where that is not None."""
  encoder_config, encoder = family_of(config).load(config.model.checkpoint_dir)
  cls_dropout = config.model.get('cls_dropout')
  if cls_dropout is not None and isinstance(encoder_config, deberta.DebertaV2Config):
    encoder_config = dataclasses.replace(encoder_config, cls_dropout=cls_dropout)
  return encoder_config, encoder


def build(config) -> tasks.Task:
  """Loads the encoder and tokenizer from ``model.checkpoint_dir`` and the
  task's data from ``data.data_dir``."""
  model_dir = config.model.checkpoint_dir
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  except OSError as e:
    raise PeftError(f'no tokenizer in checkpoint dir {model_dir!r} ({e})') from None
  encoder_config, encoder = load_encoder(config)
  arrays = load_arrays(config, tokenizer)
  sizes = {k: len(v['label']) for k, v in arrays.items()}
  describe = (
    f'{model_dir} on {config.data.task} '
    f'({glue.get_task(config.data.task).tfds_name}) {sizes}'
  )
  return make_task(config, encoder_config, encoder, arrays, describe)
