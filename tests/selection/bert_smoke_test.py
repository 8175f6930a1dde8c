"""``selection.sam`` on a tiny random BERT classifier: the whole pipeline runs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from peft_jax import selection
from peft_jax.models import bert

CONFIG = bert.BertConfig(
  vocab_size=50,
  hidden_size=16,
  num_layers=2,
  num_heads=4,
  intermediate_size=24,
  max_position_embeddings=12,
  hidden_dropout=0.0,  # Dropout's random bits take seconds to compile on CPU.
  attention_dropout=0.0,
)
MODEL = bert.BertForSequenceClassification(CONFIG, num_labels=2)  # mean pooling


def loss_fn(weights, batch, rng):
  logits = MODEL.apply(
    {'params': weights},
    batch['ids'],
    batch['mask'],
    deterministic=False,
    rngs={'dropout': rng},
  )
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['y']).mean()
  return loss, {}


def batches(n):
  out = []
  for t in range(n):
    key = jax.random.key(100 + t)
    out.append(
      {
        'ids': jax.random.randint(key, (4, 7), 1, 50),
        'mask': jnp.array([[1] * 7, [1] * 5 + [0] * 2, [1] * 7, [1] * 3 + [0] * 4]),
        'y': jax.random.randint(jax.random.fold_in(key, 1), (4,), 0, 2),
      }
    )
  return out


def test_sam_on_bert_kernels_gives_an_exact_global_mask():
  data = batches(3)
  # Random weights of the model's shapes, without compiling its init.
  shapes = jax.eval_shape(MODEL.init, jax.random.key(0), data[0]['ids'])['params']
  rng = np.random.default_rng(0)
  frozen = jax.tree.map(
    lambda s: jnp.asarray(rng.normal(scale=0.5, size=s.shape), jnp.float32), shapes
  )
  kernels = {
    '/'.join(k): v
    for k, v in traverse_util.flatten_dict(frozen).items()
    if k[-1] == 'kernel'
  }
  scores = selection.sam(
    loss_fn,
    frozen,
    data,
    where='.*/kernel',
    rng=jax.random.key(1),
    clip_norm=1.0,
    progress=False,
  )
  flat = {'/'.join(k): v for k, v in traverse_util.flatten_dict(scores).items()}
  assert set(flat) == set(kernels)
  for name, s in flat.items():
    assert s.shape == kernels[name].shape and s.dtype == jnp.float32
  # Mean pooling never uses the pooler: its gradient, hence its score, is 0.
  np.testing.assert_array_equal(flat['bert/pooler/dense/kernel'], 0.0)
  assert all(np.asarray(s).any() for n, s in flat.items() if 'pooler' not in n)

  m = sum(math.prod(k.shape) for k in kernels.values())
  mask = selection.top_p(scores, 0.05)
  assert selection.count(mask) == math.floor(0.05 * m)
  assert not np.asarray(mask['bert']['pooler']['dense']['kernel']).any()
  per_leaf = selection.top_p(scores, 0.05, scope='per_leaf')
  want = sum(math.floor(0.05 * math.prod(k.shape)) for k in kernels.values())
  assert selection.count(per_leaf) == want
