"""Sentence classification with a pretrained BERT encoder and a new head."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import peft_jax as pj
from experiments.configs import common
from experiments.tasks import Task
from peft_jax.data import batching, rotten_tomatoes
from peft_jax.models import bert

CHECKPOINTS = {'minilm': bert.minilm_dir}
DATASETS = {'rotten_tomatoes': rotten_tomatoes}


def tokenize(tokenizer, split, max_length: int) -> dict[str, np.ndarray]:
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


def build(config) -> Task:
  """Loads the pretrained encoder, adds a head, tokenizes the splits."""
  model_dir = common.lookup(CHECKPOINTS, 'checkpoint', config.model.checkpoint)()
  dataset = common.lookup(DATASETS, 'dataset', config.data.name)
  bert_config, encoder, tokenizer = bert.load_pretrained(model_dir)
  splits = dataset.splits(config.data.n_validation, config.data.n_test)
  arrays = {
    k: tokenize(tokenizer, s, config.model.max_length) for k, s in splits.items()
  }
  if config.data.eval_limit:
    for name in ('validation', 'test'):
      arrays[name] = {k: v[: config.data.eval_limit] for k, v in arrays[name].items()}

  num_labels = int(arrays['train']['label'].max()) + 1
  model = bert.BertForSequenceClassification(
    bert_config, num_labels=num_labels, pooling=config.model.pooling
  )
  sample = arrays['train']['input_ids'][:1]
  head = model.init(jax.random.key(config.seed), sample)['params']['classifier']
  frozen = {'bert': encoder, 'classifier': head}

  def logits(params, batch, rng=None):
    return model.apply(
      {'params': params},
      batch['input_ids'],
      batch['attention_mask'],
      deterministic=rng is None,
      rngs=None if rng is None else {'dropout': rng},
    )

  def loss_fn(params, batch, rng):
    out = logits(params, batch, rng)
    loss = optax.softmax_cross_entropy_with_integer_labels(out, batch['label']).mean()
    return loss, {'accuracy': jnp.mean(jnp.argmax(out, -1) == batch['label'])}

  @functools.partial(jax.jit, static_argnums=0)
  def correct(adapter, frozen, theta, batch):
    # The factored path also serves methods with no weight-space form.
    out = pj.factored(adapter, logits)(frozen, theta, batch)
    return jnp.sum((jnp.argmax(out, -1) == batch['label']) * batch['weight'])

  def evaluate(adapter, theta):
    metrics = {}
    for name in ('validation', 'test'):
      split = arrays[name]
      hits = sum(
        float(correct(adapter, frozen, theta, b))
        for b in batching.eval_batches(split, config.eval_batch_size)
      )
      metrics[f'{name}_accuracy'] = hits / len(split['label'])
    return metrics

  train_batch = functools.partial(
    batching.train_batch, arrays['train'], config.batch_size, seed=config.seed
  )
  sizes = {k: len(v['label']) for k, v in arrays.items()}
  return Task(
    frozen=frozen,
    loss_fn=loss_fn,
    train_batch=train_batch,
    evaluate=evaluate,
    describe=f'{config.model.checkpoint} ({model_dir}) on {config.data.name} {sizes}',
  )
