"""The parallel adapter (= MPC_n) against the spec's forward pass, PyTorch layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax.methods.parallel_adapter import ParallelAdapterParams, parallel_adapter
from tests import references

D_IN, D_OUT = 9, 6
ACTIVATIONS = {
  'relu': lambda z: np.maximum(z, 0),
  'tanh': np.tanh,
  'silu': lambda z: z / (1 + np.exp(-z)),
}


def random_params(seed, rank):
  rng = np.random.default_rng(seed)
  return ParallelAdapterParams(
    a=rng.normal(size=(D_IN, rank)).astype(np.float32),
    b=rng.normal(size=(rank, D_OUT)).astype(np.float32),
  )


@pytest.mark.parametrize('activation', sorted(ACTIVATIONS))
def test_factored_is_wx_plus_b_sigma_ax(activation):
  rng = np.random.default_rng(0)
  w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
  params = random_params(1, 4)
  x = rng.normal(size=(2, 5, D_IN))
  # Spec: h = W x + B·σ(A x), no scale; columns of x here are its rows.
  W, A, B = (np.float64(m).T for m in (w, params.a, params.b))
  expected = x @ W.T + ACTIVATIONS[activation](x @ A.T) @ B.T
  y = parallel_adapter(4, activation).linear.factored(np.float32(x), w, params, None)
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def frozen_and_batch():
  rng = np.random.default_rng(1)
  frozen = {'dense': {'kernel': jnp.float32(rng.normal(size=(D_IN, D_OUT)))}}
  batch = {'x': jnp.float32(rng.normal(size=(16, D_IN)))}
  batch['y'] = jnp.tanh(batch['x'] @ frozen['dense']['kernel']) + 1.0
  return frozen, batch


def test_no_weight_space_form_merge_refuses_but_adapted_runs_the_linear_form():
  adapter = parallel_adapter(2)
  assert adapter.apply is None and adapter.unapply is None
  assert not adapter.mergeable
  frozen, batch = frozen_and_batch()
  tree = pj.by_rules([('dense/kernel', 'parallel_adapter(rank=2)')])
  assert not tree.mergeable
  params, buffers = tree.init(jax.random.key(0), frozen)
  assert buffers == {}
  params = {'dense': {'kernel': random_params(2, 2)}}
  with pytest.raises(pj.PeftError, match='not mergeable') as error:
    pj.merge(tree, frozen, params, buffers)
  assert '\n' not in str(error.value)
  with pytest.raises(pj.PeftError, match=r'dense/kernel: .*no weight-space form'):
    tree.apply(frozen, params, buffers)
  # Both paths run the branch through its linear form: y = x@w + relu(x@a)@b.
  p = params['dense']['kernel']
  w, a, b = (np.float64(m) for m in (frozen['dense']['kernel'], p.a, p.b))
  x = np.float64(batch['x'])
  expected = x @ w + np.maximum(x @ a, 0) @ b
  fn = lambda weights, x: x @ weights['dense']['kernel']
  for factored in (False, True):
    y = pj.adapted(tree, fn, factored=factored)(frozen, params, buffers, batch['x'])
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def loss_fn(weights, batch, rng):
  del rng
  pred = jnp.tanh(batch['x'] @ weights['dense']['kernel'])
  return jnp.mean((pred - batch['y']) ** 2), {}


@pytest.mark.parametrize('factored', [False, True])
def test_trains_on_either_path(factored):
  frozen, batch = frozen_and_batch()
  tree = pj.by_rules([('dense/kernel', 'parallel_adapter(rank=3)')])
  params, buffers = tree.init(jax.random.key(0), frozen)
  _, losses = references.train(
    loss_fn, tree, frozen, params, buffers, batch, steps=20, lr=0.05, factored=factored
  )
  assert losses[-1] < 0.5 * losses[0]


def test_init_kaiming_uniform_a_zero_b_so_identity():
  d_in, d_out, rank = 512, 64, 32
  adapter = parallel_adapter(rank)
  w = jax.random.normal(jax.random.key(1), (d_in, d_out))
  params, buffers = adapter.init(jax.random.key(0), w)
  assert isinstance(params, ParallelAdapterParams) and buffers is None
  a, bound = np.float64(params.a), 1 / np.sqrt(d_in)
  assert np.all(np.abs(a) <= bound) and np.abs(a).max() > 0.95 * bound
  np.testing.assert_allclose(a.var(), bound**2 / 3, rtol=0.05)
  np.testing.assert_array_equal(params.b, np.zeros((rank, d_out)))
  x = jax.random.normal(jax.random.key(2), (4, d_in))
  np.testing.assert_array_equal(adapter.linear.factored(x, w, params, buffers), x @ w)
  down, up = adapter.factors(params, buffers)
  np.testing.assert_array_equal(down, params.a)
  np.testing.assert_array_equal(up, params.b)


def test_trainable_count_is_r_times_din_plus_dout():
  adapter = parallel_adapter(8)
  params, _ = jax.eval_shape(adapter.init, jax.random.key(0), jnp.zeros((768, 3072)))
  assert pj.count(params) == adapter.num_params((768, 3072)) == 8 * (768 + 3072)


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
