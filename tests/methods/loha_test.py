"""LoHa against HF PEFT's formula, written in the PyTorch layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax.methods import loha

D_IN, D_OUT = 9, 6


def random_theta(seed, rank):
  rng = np.random.default_rng(seed)
  shapes = {'a1': (D_IN, rank), 'b1': (rank, D_OUT), 'a2': (D_IN, rank)}
  shapes['b2'] = (rank, D_OUT)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


@pytest.mark.parametrize('rank,alpha', [(1, 1.0), (3, 8.0), (6, 2.0)])
def test_apply_and_factored_match_hf_formula(rank, alpha):
  w = np.random.default_rng(1).normal(size=(D_IN, D_OUT)).astype(np.float32)
  theta = random_theta(2, rank)
  # HF PEFT, PyTorch layout: ΔW = s (w1_a w1_b) ⊙ (w2_a w2_b), s = α/r, with
  # w1_a: (d_out, r) = b1ᵀ, w1_b: (r, d_in) = a1ᵀ (likewise for pair 2).
  W = np.float64(w).T
  w1_a, w1_b = np.float64(theta['b1']).T, np.float64(theta['a1']).T
  w2_a, w2_b = np.float64(theta['b2']).T, np.float64(theta['a2']).T
  expected = W + alpha / rank * (w1_a @ w1_b) * (w2_a @ w2_b)
  adapter = loha.loha(rank=rank, alpha=alpha)
  np.testing.assert_allclose(adapter.apply(w, theta).T, expected, rtol=1e-5, atol=1e-4)
  x = np.random.default_rng(3).normal(size=(2, 4, D_IN))
  np.testing.assert_allclose(
    adapter.factored(x.astype(np.float32), w, theta),
    x @ expected.T,
    rtol=1e-4,
    atol=1e-4,
  )


def test_hadamard_product_reaches_rank_r_squared():
  theta = random_theta(0, 2)
  delta = loha.loha(rank=2).apply(jnp.zeros((D_IN, D_OUT)), theta)
  assert np.linalg.matrix_rank(np.float64(delta), tol=1e-4) == 4


def test_init_is_hf_kaiming_uniform_with_a2_zero():
  d_in, d_out, rank = 512, 256, 16
  theta = loha.loha(rank=rank).init(jax.random.key(0), jnp.zeros((d_in, d_out)))
  np.testing.assert_array_equal(theta['a2'], 0)
  for name, fan_in in [('a1', d_in), ('b1', rank), ('b2', rank)]:
    leaf = np.asarray(theta[name], np.float64)
    bound = 1 / np.sqrt(fan_in)
    assert np.all(np.abs(leaf) <= bound) and np.abs(leaf).max() > 0.95 * bound
    np.testing.assert_allclose(leaf.var(), bound**2 / 3, rtol=0.1)
  assert theta['a1'].shape == (d_in, rank) and theta['b2'].shape == (rank, d_out)


def test_identity_at_init_and_count():
  w = jax.random.normal(jax.random.key(1), (D_IN, D_OUT))
  adapter = loha.loha(rank=3)
  theta = adapter.init(jax.random.key(0), w)
  np.testing.assert_array_equal(adapter.apply(w, theta), w)
  assert pj.count(theta) == adapter.num_params(w.shape) == 2 * 3 * (D_IN + D_OUT)


def test_unapply_recovers_the_frozen_weight():
  w = np.random.default_rng(0).normal(size=(D_IN, D_OUT)).astype(np.float32)
  theta = random_theta(1, 2)
  adapter = loha.loha(rank=2, alpha=4.0)
  np.testing.assert_allclose(
    adapter.unapply(adapter.apply(w, theta), theta), w, atol=1e-5
  )


@pytest.mark.parametrize(
  'kwargs,leaf_shape,message',
  [
    ({'rank': 0}, (4, 4), 'loha: rank=0 must be > 0'),
    ({'rank': 1.5}, (4, 4), 'rank=1.5 must be an int'),
    ({'rank': 5}, (8, 4), 'rank=5 exceeds min(d_in, d_out)=4'),
    ({'alpha': None}, (4, 4), 'alpha=None must be a number'),
    ({'param_dtype': 'int32'}, (4, 4), 'not a floating dtype'),
    ({'rank': 2}, (4,), 'loha expects a 2-D kernel'),
  ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, leaf_shape, message):
  with pytest.raises(
    pj.PeftError, match=message.replace('(', r'\(').replace(')', r'\)')
  ):
    loha.loha(**kwargs).init(jax.random.key(0), jnp.ones(leaf_shape))
