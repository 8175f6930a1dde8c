"""Sentence classification with a pretrained BERT encoder and a new head."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers

import peft_jax as pj
from experiments import tasks
from experiments.configs import common
from peft_jax.data import batching, rotten_tomatoes
from peft_jax.models import bert

CHECKPOINTS = {'minilm': bert.minilm_dir}
DATASETS = {'rotten_tomatoes': rotten_tomatoes}
Arrays = dict[str, np.ndarray]


def tokenize(tokenizer, split, max_length: int) -> Arrays:
  """Fixed-length token arrays (so every batch has one shape) and labels."""
  encoded = tokenizer(
    split.texts,
    max_length=max_length,
    truncation=True,
    padding='max_length',
    return_tensors='np',
  )
  return {
    'input_ids': encoded['input_ids'].astype(np.int32),
    'attention_mask': encoded['attention_mask'].astype(np.int32),
    'label': split.labels.astype(np.int32),
  }


def load_arrays(config, tokenizer) -> dict[str, Arrays]:
  """The tokenized splits."""
  dataset = common.lookup(DATASETS, 'dataset', config.data.name)
  splits = dataset.splits(config.data.n_validation, config.data.n_test)
  return {k: tokenize(tokenizer, s, config.model.max_length) for k, s in splits.items()}


@functools.partial(jax.jit, static_argnums=(0, 1))
def correct_count(forward: tasks.Forward, tree, frozen, params, buffers, batch):
  """The batch's correctly classified rows, weighted by ``batch['weight']``
  (0 on padding), counted on device: a replicated scalar, which every
  process of a multi-host mesh can read. One program for every seed of a
  group (``forward`` is static and equal by value)."""
  logits = tasks.adapted_outputs(forward, tree, frozen, params, buffers, batch)
  return jnp.sum((jnp.argmax(logits, -1) == batch['label']) * batch['weight'])


def make_evaluate(forward: tasks.Forward, arrays: dict[str, Arrays], config):
  """``evaluate(tree, frozen, params, buffers)``: validation and test accuracy
  on the first ``config.data.eval_limit`` examples of each
  (``correct_count`` per batch)."""

  def evaluate(tree, frozen, params, buffers):
    return tasks.accuracies(
      lambda batch: correct_count(forward, tree, frozen, params, buffers, batch),
      {name: arrays[name] for name in ('validation', 'test')},
      config.eval_batch_size,
      config.data.eval_limit,
    )

  return evaluate


def make_task(
  config, encoder_config: bert.BertConfig, encoder, arrays: dict[str, Arrays], describe
) -> tasks.Task:
  """The task on a loaded encoder and tokenized splits: a new head on top,
  the model's hook points, the loss and the evaluation."""
  num_labels = int(arrays['train']['label'].max()) + 1
  model = bert.BertForSequenceClassification(
    encoder_config, num_labels=num_labels, pooling=config.model.pooling
  )
  sample = (arrays['train']['input_ids'][:1], arrays['train']['attention_mask'][:1])
  # The head's init depends only on the seed, so from_pretrained rebuilds it.
  # Compiled, XLA computes only the head, not a random copy of the encoder.
  init_head = jax.jit(lambda rng: model.init(rng, *sample)['params']['classifier'])
  head = init_head(jax.random.key(config.seed))
  frozen = {'bert': encoder, 'classifier': head}

  logits = tasks.Forward(model, ('input_ids', 'attention_mask'))

  def loss_fn(weights, batch, rng):
    out = logits(weights, batch, rng)
    loss = optax.softmax_cross_entropy_with_integer_labels(out, batch['label']).mean()
    return loss, {'accuracy': jnp.mean(jnp.argmax(out, -1) == batch['label'])}

  return tasks.Task(
    frozen=frozen,
    hooks=pj.hook_points(model, *sample),
    loss_fn=loss_fn,
    train_batch=batching.train_batches(
      arrays['train'], config.batch_size, config.seed
    ).__getitem__,
    evaluate=make_evaluate(logits, arrays, config),
    describe=describe,
    adapter_metadata=adapter_metadata(config, num_labels),
    param_axes=bert.PARAM_AXES,
  )


def adapter_metadata(config, num_labels: int) -> dict:
  """What the adapter file records: the shipped encoder, the new head (its
  init seed) and the labels."""
  dataset = common.lookup(DATASETS, 'dataset', config.data.name)
  return {
    'task': 'text_classification',
    'base_model': config.model.checkpoint,
    'tokenizer': config.model.checkpoint,
    'head': {
      'kind': 'sequence_classification',
      'num_labels': num_labels,
      'pooling': config.model.pooling,
      'seed': config.seed,
    },
    'labels': list(dataset.LABELS),
    'max_length': config.model.max_length,
  }


def build(config) -> tasks.Task:
  """Loads the pretrained encoder and tokenizer, tokenizes the splits."""
  model_dir = common.lookup(CHECKPOINTS, 'checkpoint', config.model.checkpoint)()
  encoder_config, encoder = bert.load_hf(model_dir)
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  arrays = load_arrays(config, tokenizer)
  sizes = {k: len(v['label']) for k, v in arrays.items()}
  describe = f'{config.model.checkpoint} ({model_dir}) on {config.data.name} {sizes}'
  return make_task(config, encoder_config, encoder, arrays, describe)
