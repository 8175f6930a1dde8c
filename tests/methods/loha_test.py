"""LoHa against HF PEFT's formula, written in the PyTorch layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax.methods import loha
from peft_jax.methods.loha import LohaParams

D_IN, D_OUT = 9, 6


def random_params(seed, rank):
  rng = np.random.default_rng(seed)
  shapes = {'a1': (D_IN, rank), 'b1': (rank, D_OUT), 'a2': (D_IN, rank)}
  shapes['b2'] = (rank, D_OUT)
  return LohaParams(
    **{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  )


@pytest.mark.parametrize('rank,alpha', [(1, 1.0), (3, 8.0), (6, 2.0)])
def test_apply_and_factored_match_hf_formula(rank, alpha):
  w = np.random.default_rng(1).normal(size=(D_IN, D_OUT)).astype(np.float32)
  params = random_params(2, rank)
  # HF PEFT, PyTorch layout: ΔW = s (w1_a w1_b) ⊙ (w2_a w2_b), s = α/r, with
  # w1_a: (d_out, r) = b1ᵀ, w1_b: (r, d_in) = a1ᵀ (likewise for pair 2).
  W = np.float64(w).T
  w1_a, w1_b = np.float64(params.b1).T, np.float64(params.a1).T
  w2_a, w2_b = np.float64(params.b2).T, np.float64(params.a2).T
  expected = W + alpha / rank * (w1_a @ w1_b) * (w2_a @ w2_b)
  adapter = loha.loha(rank=rank, alpha=alpha)
  np.testing.assert_allclose(
    adapter.apply(w, params, None).T, expected, rtol=1e-5, atol=1e-4
  )
  x = np.random.default_rng(3).normal(size=(2, 4, D_IN))
  np.testing.assert_allclose(
    adapter.linear.factored(x.astype(np.float32), w, params, None),
    x @ expected.T,
    rtol=1e-4,
    atol=1e-4,
  )


def test_hadamard_product_reaches_rank_r_squared():
  params = random_params(0, 2)
  delta = loha.loha(rank=2).apply(jnp.zeros((D_IN, D_OUT)), params, None)
  assert np.linalg.matrix_rank(np.float64(delta), tol=1e-4) == 4


def test_init_is_hf_kaiming_uniform_with_a2_zero():
  d_in, d_out, rank = 512, 256, 16
  w = jnp.zeros((d_in, d_out))
  params, buffers = loha.loha(rank=rank).init(jax.random.key(0), w)
  assert isinstance(params, LohaParams) and buffers is None
  np.testing.assert_array_equal(params.a2, 0)
  for leaf, fan_in in [(params.a1, d_in), (params.b1, rank), (params.b2, rank)]:
    leaf = np.asarray(leaf, np.float64)
    bound = 1 / np.sqrt(fan_in)
    assert np.all(np.abs(leaf) <= bound) and np.abs(leaf).max() > 0.95 * bound
    np.testing.assert_allclose(leaf.var(), bound**2 / 3, rtol=0.1)
  assert params.a1.shape == params.a2.shape == (d_in, rank)
  assert params.b1.shape == params.b2.shape == (rank, d_out)


def test_identity_at_init_and_count():
  w = jax.random.normal(jax.random.key(1), (D_IN, D_OUT))
  adapter = loha.loha(rank=3)
  params, buffers = adapter.init(jax.random.key(0), w)
  np.testing.assert_array_equal(adapter.apply(w, params, buffers), w)
  assert pj.count(params) == adapter.num_params(w.shape) == 2 * 3 * (D_IN + D_OUT)


def test_unapply_recovers_the_frozen_weight():
  w = np.random.default_rng(0).normal(size=(D_IN, D_OUT)).astype(np.float32)
  params = random_params(1, 2)
  adapter = loha.loha(rank=2, alpha=4.0)
  np.testing.assert_allclose(
    adapter.unapply(adapter.apply(w, params, None), params, None), w, atol=1e-5
  )


def test_bf16_kernel_keeps_its_dtype_with_float32_factors():
  w = jnp.ones((D_IN, D_OUT), jnp.bfloat16)
  adapter = loha.loha(rank=2)
  params, buffers = adapter.init(jax.random.key(0), w)
  assert all(leaf.dtype == jnp.float32 for leaf in params)
  assert adapter.apply(w, params, buffers).dtype == jnp.bfloat16
  x = jnp.ones((3, D_IN), jnp.bfloat16)
  assert adapter.linear.factored(x, w, params, buffers).dtype == jnp.bfloat16


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
