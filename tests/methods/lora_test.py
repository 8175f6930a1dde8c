"""LoRA against the spec's formula, written in the spec's PyTorch layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj


def random_lora_params(seed, d_in, d_out, rank):
  rng = np.random.default_rng(seed)
  return {
    'a': rng.normal(size=(d_in, rank)).astype(np.float32),
    'b': rng.normal(size=(rank, d_out)).astype(np.float32),
  }


@pytest.mark.parametrize('rslora', [False, True])
@pytest.mark.parametrize('rank,alpha', [(1, 1.0), (4, 16.0), (6, 3.0)])
def test_apply_is_w_plus_scaled_ba(rank, alpha, rslora):
  d_in, d_out = 9, 6
  w = np.random.default_rng(1).normal(size=(d_in, d_out)).astype(np.float32)
  theta = random_lora_params(2, d_in, d_out, rank)
  # Spec, PyTorch layout: W' = W + s·B A with W: (d_out, d_in), A: (r, d_in),
  # B: (d_out, r), s = α/r (α/√r for rsLoRA).
  W, A, B = (np.float64(m).T for m in (w, theta['a'], theta['b']))
  s = alpha / (np.sqrt(rank) if rslora else rank)
  expected = W + s * B @ A
  adapter = pj.lora(rank=rank, alpha=alpha, rslora=rslora)
  np.testing.assert_allclose(adapter.apply(w, theta).T, expected, rtol=1e-5, atol=1e-5)
  x = np.random.default_rng(3).normal(size=(5, d_in))
  np.testing.assert_allclose(
    adapter.factored(x.astype(np.float32), w, theta),
    x @ expected.T,
    rtol=1e-4,
    atol=1e-4,
  )


def test_default_init_is_kaiming_uniform_a_and_zero_b():
  d_in, d_out, rank = 512, 64, 32
  theta = pj.lora(rank=rank).init(jax.random.key(0), jnp.zeros((d_in, d_out)))
  a = np.asarray(theta['a'], np.float64)
  bound = 1 / np.sqrt(d_in)
  assert theta['a'].shape == (d_in, rank) and theta['b'].shape == (rank, d_out)
  assert np.all(np.abs(a) <= bound) and np.abs(a).max() > 0.95 * bound
  # Uniform(-c, c) has variance c²/3.
  np.testing.assert_allclose(a.var(), bound**2 / 3, rtol=0.05)
  np.testing.assert_array_equal(theta['b'], 0)


@pytest.mark.parametrize('a_init,std', [('gaussian', 1 / 16), ('normal', 0.02)])
def test_gaussian_inits(a_init, std):
  theta = pj.lora(rank=16, a_init=a_init).init(jax.random.key(0), jnp.zeros((1024, 64)))
  np.testing.assert_allclose(np.std(np.asarray(theta['a'], np.float64)), std, rtol=0.03)


def test_params_are_float32_for_bf16_weights_and_result_stays_bf16():
  w = jnp.ones((8, 4), jnp.bfloat16)
  adapter = pj.lora(rank=2)
  theta = adapter.init(jax.random.key(0), w)
  assert theta['a'].dtype == jnp.float32
  assert adapter.apply(w, theta).dtype == jnp.bfloat16


@pytest.mark.parametrize(
  'kwargs,leaf_shape,message',
  [
    ({'rank': 0}, (4, 4), 'rank=0 must be > 0'),
    ({'rank': 2.5}, (4, 4), 'must be an int'),
    ({'rank': True}, (4, 4), 'must be an int'),
    ({'rank': 5}, (8, 4), 'rank=5 exceeds min(d_in, d_out)=4'),
    ({'alpha': 'big'}, (4, 4), "alpha='big' must be a number"),
    ({'a_init': 'xavier'}, (4, 4), "a_init='xavier' is not one of"),
    ({'rslora': 1}, (4, 4), 'rslora=1 must be True or False'),
    ({'param_dtype': 'int8'}, (4, 4), 'not a floating dtype'),
    ({'rank': 2}, (4, 4, 4), 'expects a 2-D kernel'),
  ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, leaf_shape, message):
  with pytest.raises(
    pj.PeftError, match=message.replace('(', r'\(').replace(')', r'\)')
  ):
    pj.lora(**kwargs).init(jax.random.key(0), jnp.ones(leaf_shape))


def test_unmerge_recovers_the_frozen_weight():
  w = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
  theta = random_lora_params(1, 6, 5, 2)
  adapter = pj.lora(rank=2, alpha=4)
  np.testing.assert_allclose(
    adapter.unapply(adapter.apply(w, theta), theta), w, atol=1e-5
  )
