"""Independent computations and helpers the tests share."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import peft_jax as pj
from peft_jax.models import bert

# A 2-layer BERT small enough for exact checks (d = 16, 2 heads of 8, FFN 32).
TINY_BERT = bert.BertConfig(
  vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32
)


def tiny_bert_classifier(batch: int = 2, seq: int = 5):
  """``(model, frozen, ids, mask)``: a random ``TINY_BERT`` classifier (CLS
  pooling, 2 labels) and a batch whose example 1 ends in two padded tokens."""
  model = bert.BertForSequenceClassification(TINY_BERT, num_labels=2, pooling='cls')
  ids = jax.random.randint(jax.random.key(0), (batch, seq), 1, 50)
  mask = jnp.ones_like(ids).at[1, -2:].set(0)
  frozen = model.init(jax.random.key(1), ids, mask)['params']
  return model, frozen, ids, mask


def perturb(tree, seed: int, scale: float = 0.3):
  """Every array of ``tree`` moved by ``scale · N(0, 1)`` noise (so checks are
  not trivial at an identity init)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  moved = [
    x + scale * jax.random.normal(k, x.shape, x.dtype)
    for x, k in zip(leaves, keys, strict=True)
  ]
  return treedef.unflatten(moved)


def houlsby_reference(y, params) -> np.ndarray:
  """``y + silu(y @ down + b_d) @ up + b_u``, written out in float64 NumPy."""
  f64 = lambda t: np.asarray(t, np.float64)
  pre = f64(y) @ f64(params.down) + f64(params.down_bias)
  return f64(y) + (pre / (1 + np.exp(-pre))) @ f64(params.up) + f64(params.up_bias)


def intercepting_houlsby(adapters: dict[tuple, object]):
  """Adds ``houlsby_reference`` to the outputs of the Dense modules at the
  given module paths by Flax method interception: a mechanism independent of
  hook points. Eager only (NumPy inside)."""

  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    path = tuple(context.module.path)
    if context.method_name == '__call__' and path in adapters:
      return jnp.asarray(houlsby_reference(y, adapters[path]), y.dtype)
    return y

  return nn.intercept_methods(interceptor)


def train(loss_fn, tree, frozen, params, buffers, batch, *, steps, lr, factored=False):
  """``(state, losses)`` after ``steps`` jitted Adam steps of
  ``pj.make_train_step`` on one batch (``losses[i]`` before step ``i``'s update)."""
  optimizer = optax.adam(lr)
  state = pj.TrainState.create(params, buffers, optimizer, jax.random.key(1))
  step = jax.jit(pj.make_train_step(loss_fn, tree, optimizer, factored=factored))
  losses = []
  for _ in range(steps):
    state, metrics = step(state, frozen, batch)
    losses.append(float(metrics['loss']))
  return state, losses
