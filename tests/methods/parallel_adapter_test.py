"""The parallel adapter (= MPC_n) against the spec's forward pass, PyTorch layout."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_jax as pj
from peft_jax.methods.parallel_adapter import parallel_adapter

D_IN, D_OUT = 9, 6
ACTIVATIONS = {
  'relu': lambda z: np.maximum(z, 0),
  'tanh': np.tanh,
  'silu': lambda z: z / (1 + np.exp(-z)),
}


@pytest.mark.parametrize('activation', sorted(ACTIVATIONS))
def test_factored_is_wx_plus_b_sigma_ax(activation):
  rng = np.random.default_rng(0)
  w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
  theta = {
    'a': rng.normal(size=(D_IN, 4)).astype(np.float32),
    'b': rng.normal(size=(4, D_OUT)).astype(np.float32),
  }
  x = rng.normal(size=(2, 5, D_IN))
  # Spec: h = W x + B·σ(A x), no scale; columns of x here are its rows.
  W, A, B = (np.float64(m).T for m in (w, theta['a'], theta['b']))
  expected = x @ W.T + ACTIVATIONS[activation](x @ A.T) @ B.T
  y = parallel_adapter(4, activation).factored(np.float32(x), w, theta)
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_no_weight_space_form_apply_and_merge_refuse():
  adapter = parallel_adapter(2)
  w = jnp.ones((D_IN, D_OUT))
  theta = adapter.init(jax.random.key(0), w)
  assert not adapter.mergeable
  with pytest.raises(pj.PeftError, match='parallel_adapter has no weight-space form'):
    adapter.apply(w, theta)
  with pytest.raises(pj.PeftError, match='not mergeable'):
    pj.merge(adapter, w, theta)
  tree = pj.by_rules([('dense', 'parallel_adapter(rank=2)')])
  with pytest.raises(
    pj.PeftError, match=r'dense: .*make_train_step\(\.\.\., factored=True\)'
  ):
    tree.apply({'dense': w}, {'dense': theta})


def frozen_and_batch():
  rng = np.random.default_rng(1)
  frozen = {'dense': {'kernel': jnp.float32(rng.normal(size=(D_IN, D_OUT)))}}
  batch = {'x': jnp.float32(rng.normal(size=(16, D_IN)))}
  batch['y'] = jnp.tanh(batch['x'] @ frozen['dense']['kernel']) + 1.0
  return frozen, batch


def loss_fn(params, batch, rng):
  del rng
  pred = jnp.tanh(batch['x'] @ params['dense']['kernel'])
  return jnp.mean((pred - batch['y']) ** 2), {}


def test_trains_on_the_factored_path():
  frozen, batch = frozen_and_batch()
  adapter = pj.by_rules([('dense/kernel', 'parallel_adapter(rank=3)')])
  theta = adapter.init(jax.random.key(0), frozen)
  # The factored transform computes the spec's branch inside any function.
  W = np.float64(frozen['dense']['kernel']).T
  A, B = (np.float64(theta['dense']['kernel'][k]).T for k in ('a', 'b'))
  theta_moved = {'dense': {'kernel': {'a': A.T, 'b': np.ones_like(B.T)}}}
  forward = pj.factored(adapter, lambda p, x: x @ p['dense']['kernel'])
  x = np.float64(batch['x'])
  expected = x @ W.T + np.maximum(x @ A.T, 0) @ np.ones_like(B).T
  np.testing.assert_allclose(
    forward(frozen, jax.tree.map(jnp.float32, theta_moved), batch['x']),
    expected,
    rtol=1e-4,
    atol=1e-4,
  )
  optimizer = optax.adam(0.05)
  step = jax.jit(pj.make_train_step(loss_fn, adapter, optimizer, factored=True))
  state = pj.TrainState.create(theta, optimizer, jax.random.key(1))
  losses = []
  for _ in range(20):
    state, metrics = step(state, frozen, batch)
    losses.append(float(metrics['loss']))
  assert losses[-1] < 0.5 * losses[0]


def test_init_kaiming_uniform_a_zero_b_so_identity():
  d_in, d_out, rank = 512, 64, 32
  adapter = parallel_adapter(rank)
  w = jax.random.normal(jax.random.key(1), (d_in, d_out))
  theta = adapter.init(jax.random.key(0), w)
  a, bound = np.float64(theta['a']), 1 / np.sqrt(d_in)
  assert np.all(np.abs(a) <= bound) and np.abs(a).max() > 0.95 * bound
  np.testing.assert_allclose(a.var(), bound**2 / 3, rtol=0.05)
  np.testing.assert_array_equal(theta['b'], np.zeros((rank, d_out)))
  x = jax.random.normal(jax.random.key(2), (4, d_in))
  np.testing.assert_array_equal(adapter.factored(x, w, theta), x @ w)


def test_trainable_count_is_r_times_din_plus_dout():
  adapter = parallel_adapter(8)
  theta = jax.eval_shape(adapter.init, jax.random.key(0), jnp.zeros((768, 3072)))
  assert pj.count(theta) == adapter.num_params((768, 3072)) == 8 * (768 + 3072)


@pytest.mark.parametrize(
  'kwargs,leaf_shape,message',
  [
    ({'rank': 0}, (4, 4), 'rank=0 must be > 0'),
    ({'rank': 5}, (8, 4), r'rank=5 exceeds min\(d_in, d_out\)=4'),
    ({'activation': 'softmax'}, (4, 4), "activation='softmax' is not one of"),
    ({'param_dtype': 'int8'}, (4, 4), 'not a floating dtype'),
    ({'rank': 2}, (4,), 'expects a 2-D kernel'),
  ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, leaf_shape, message):
  with pytest.raises(pj.PeftError, match=f'parallel_adapter.*{message}'):
    parallel_adapter(**kwargs).init(jax.random.key(0), jnp.ones(leaf_shape))
