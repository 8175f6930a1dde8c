"""Compacter's LPHM parallel adapter against a NumPy reference (PyTorch layout)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

import peft_jax as pj
from peft_jax.methods import compacter
from peft_jax.methods.compacter import CompacterParams

D_IN, D_OUT = 16, 12


def random_params(seed, adapter):
  rng = np.random.default_rng(seed)
  shapes, _ = jax.eval_shape(adapter.init, jax.random.key(0), jnp.zeros((D_IN, D_OUT)))
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def lphm(rule, s, t):
  """``Σ_i A_i ⊗ (S_i T_i)`` with explicit Kronecker products, float64."""
  rule, s, t = (np.float64(a) for a in (rule, s, t))
  return sum(np.kron(rule[i], s[i] @ t[i]) for i in range(len(rule)))


@pytest.mark.parametrize(
  'n,rank,reduction', [(2, 1, 2), (4, 1, 4), (2, 2, 2), (4, 1, 1)]
)
def test_factored_matches_the_lphm_adapter(n, rank, reduction):
  adapter = compacter.compacter(reduction_factor=reduction, n=n, rank=rank)
  params = random_params(n + rank, adapter)
  rng = np.random.default_rng(0)
  w, x = rng.normal(size=(D_IN, D_OUT)), rng.normal(size=(3, 2, D_IN))
  # PyTorch layout: h = W x + W_upᵀ GELU(W_downᵀ x + b_down) + b_up, with the
  # Flax-layout LPHM matrices W_down: (d_in, m), W_up: (m, d_out).
  w_down = lphm(params.a, params.down_s, params.down_t)
  w_up = lphm(params.a, params.up_s, params.up_t)
  assert w_down.shape == (D_IN, D_IN // reduction) and w_up.shape[1] == D_OUT
  pre = (w_down.T @ x[..., None])[..., 0] + params.b_down
  gelu = 0.5 * pre * (1 + scipy.special.erf(pre / np.sqrt(2)))
  expected = (
    (w.T @ x[..., None])[..., 0] + (w_up.T @ gelu[..., None])[..., 0] + params.b_up
  )
  got = adapter.linear.factored(jnp.float32(x), jnp.float32(w), params, None)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_init_starts_at_the_identity_with_adapterhub_scales():
  n, d_in, d_out = 8, 256, 128
  adapter = compacter.compacter(reduction_factor=4, n=n)  # m = 64
  w = jax.random.normal(jax.random.key(0), (d_in, d_out))
  params, buffers = jax.jit(adapter.init)(jax.random.key(1), w)
  assert isinstance(params, CompacterParams) and buffers is None
  np.testing.assert_array_equal(params.up_t, 0)
  np.testing.assert_array_equal(params.b_down, 0)
  np.testing.assert_array_equal(params.b_up, 0)
  np.testing.assert_allclose(np.std(np.asarray(params.a, np.float64)), 1e-4, rtol=0.1)
  shapes = {'down_s': (n, 32, 1), 'down_t': (n, 1, 8), 'up_s': (n, 8, 1)}
  for name, shape in shapes.items():
    leaf = np.asarray(getattr(params, name), np.float64)
    bound = np.sqrt(6 / (shape[1] + shape[2]))  # Glorot-uniform per A_i slot.
    assert leaf.shape == shape and np.all(np.abs(leaf) <= bound)
    assert np.abs(leaf).max() > 0.8 * bound
  x = jax.random.normal(jax.random.key(2), (5, d_in))
  np.testing.assert_array_equal(
    jax.jit(adapter.linear.factored)(x, w, params, buffers), x @ w
  )


@pytest.mark.parametrize('n,rank,reduction', [(4, 1, 32), (2, 3, 2), (4, 1, 4)])
def test_count(n, rank, reduction):
  adapter = compacter.compacter(reduction_factor=reduction, n=n, rank=rank)
  d_in, d_out = 128, 64
  params, _ = jax.eval_shape(adapter.init, jax.random.key(0), jnp.zeros((d_in, d_out)))
  m = d_in // reduction
  expected = n**3 + rank * (d_in + 2 * m + d_out) + m + d_out
  assert pj.count(params) == adapter.num_params((d_in, d_out)) == expected


def reference_forward(params, w, bias, x):
  """``x @ w + bias + up(GELU(down(x)))`` from explicit LPHM matrices, float64."""
  w_down = lphm(params.a, params.down_s, params.down_t)
  w_up = lphm(params.a, params.up_s, params.up_t)
  pre = x @ w_down + params.b_down
  gelu = 0.5 * pre * (1 + scipy.special.erf(pre / np.sqrt(2)))
  return x @ w + bias + gelu @ w_up + params.b_up


def test_not_mergeable_but_runs_through_its_linear_form():
  adapter = compacter.compacter(reduction_factor=2, n=2)
  assert not adapter.mergeable and adapter.apply is None and adapter.unapply is None
  rng = np.random.default_rng(5)
  kernel = np.float32(rng.normal(size=(D_IN, D_OUT)))
  frozen = {'dense': {'kernel': jnp.asarray(kernel), 'bias': jnp.ones(D_OUT)}}
  tree = pj.by_rules([('dense/kernel', adapter)])
  params, buffers = tree.init(jax.random.key(0), frozen)
  assert buffers == {}
  params['dense']['kernel'] = random_params(0, adapter)
  with pytest.raises(pj.PeftError, match='not mergeable') as error:
    pj.merge(tree, frozen, params, buffers)
  assert '\n' not in str(error.value)
  dense = lambda p, x: x @ p['dense']['kernel'] + p['dense']['bias']
  x = rng.normal(size=(3, D_IN))
  expected = reference_forward(params['dense']['kernel'], kernel, 1.0, x)
  for factored in (False, True):
    y = pj.adapted(tree, dense, factored=factored)(
      frozen, params, buffers, jnp.float32(x)
    )
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
  'kwargs,leaf_shape,message',
  [
    ({'reduction_factor': 0}, (16, 16), 'compacter: reduction_factor=0 must be > 0'),
    ({'n': 4.0}, (16, 16), 'n=4.0 must be an int'),
    ({'n': 3}, (16, 15), 'n=3 must divide d_in=16'),
    ({'n': 4, 'reduction_factor': 8}, (16, 16), 'n=4 must divide bottleneck m=2'),
    ({'n': 4, 'reduction_factor': 32}, (16, 16), 'n=4 must divide bottleneck m=0'),
    ({'n': 4, 'reduction_factor': 1}, (16, 6), 'n=4 must divide d_out=6'),
    ({'n': 2, 'rank': 3, 'reduction_factor': 4}, (16, 16), 'rank=3 exceeds'),
    ({'phm_init_range': '0.1'}, (16, 16), "phm_init_range='0.1' must be a number"),
    ({}, (16,), 'compacter expects a 2-D kernel'),
  ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, leaf_shape, message):
  with pytest.raises(pj.PeftError, match=message):
    compacter.compacter(**kwargs).init(jax.random.key(0), jnp.ones(leaf_shape))
