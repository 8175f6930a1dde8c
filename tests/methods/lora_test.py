"""LoRA against the spec's formula, written in the spec's PyTorch layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax.methods.lora import LoraParams


def random_lora_params(seed, d_in, d_out, rank):
  rng = np.random.default_rng(seed)
  return LoraParams(
    a=rng.normal(size=(d_in, rank)).astype(np.float32),
    b=rng.normal(size=(rank, d_out)).astype(np.float32),
  )


@pytest.mark.parametrize('rslora', [False, True])
@pytest.mark.parametrize('rank,alpha', [(1, 1.0), (4, 16.0), (6, 3.0)])
def test_apply_is_w_plus_scaled_ba(rank, alpha, rslora):
  d_in, d_out = 9, 6
  w = np.random.default_rng(1).normal(size=(d_in, d_out)).astype(np.float32)
  params = random_lora_params(2, d_in, d_out, rank)
  # Spec, PyTorch layout: W' = W + s·B A with W: (d_out, d_in), A: (r, d_in),
  # B: (d_out, r), s = α/r (α/√r for rsLoRA).
  W, A, B = (np.float64(m).T for m in (w, params.a, params.b))
  s = alpha / (np.sqrt(rank) if rslora else rank)
  expected = W + s * B @ A
  adapter = pj.lora(rank=rank, alpha=alpha, rslora=rslora)
  np.testing.assert_allclose(
    adapter.apply(w, params, None).T, expected, rtol=1e-5, atol=1e-5
  )
  x = np.random.default_rng(3).normal(size=(5, d_in))
  np.testing.assert_allclose(
    adapter.linear.factored(x.astype(np.float32), w, params, None),
    x @ expected.T,
    rtol=1e-4,
    atol=1e-4,
  )


def test_default_init_is_kaiming_uniform_a_and_zero_b():
  d_in, d_out, rank = 512, 64, 32
  params, buffers = pj.lora(rank=rank).init(jax.random.key(0), jnp.zeros((d_in, d_out)))
  assert isinstance(params, LoraParams) and buffers is None
  a = np.asarray(params.a, np.float64)
  bound = 1 / np.sqrt(d_in)
  assert params.a.shape == (d_in, rank) and params.b.shape == (rank, d_out)
  assert np.all(np.abs(a) <= bound) and np.abs(a).max() > 0.95 * bound
  # Uniform(-c, c) has variance c²/3.
  np.testing.assert_allclose(a.var(), bound**2 / 3, rtol=0.05)
  np.testing.assert_array_equal(params.b, 0)


@pytest.mark.parametrize('a_init,std', [('gaussian', 1 / 16), ('normal', 0.02)])
def test_gaussian_inits(a_init, std):
  params, _ = pj.lora(rank=16, a_init=a_init).init(
    jax.random.key(0), jnp.zeros((1024, 64))
  )
  np.testing.assert_allclose(np.std(np.asarray(params.a, np.float64)), std, rtol=0.03)


def test_params_are_float32_for_bf16_weights_and_result_stays_bf16():
  w = jnp.ones((8, 4), jnp.bfloat16)
  adapter = pj.lora(rank=2)
  params, buffers = adapter.init(jax.random.key(0), w)
  assert params.a.dtype == params.b.dtype == jnp.float32
  assert adapter.apply(w, params, buffers).dtype == jnp.bfloat16


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
  params = random_lora_params(1, 6, 5, 2)
  adapter = pj.lora(rank=2, alpha=4)
  np.testing.assert_allclose(
    adapter.unapply(adapter.apply(w, params, None), params, None), w, atol=1e-5
  )


def test_tree_merge_and_factored_run_match_the_formula_per_leaf():
  rng = np.random.default_rng(4)
  shapes = {'q': (6, 4), 'v': (6, 5)}
  frozen = {
    name: {'kernel': jnp.float32(rng.normal(size=shape)), 'bias': jnp.zeros(shape[1])}
    for name, shape in shapes.items()
  }
  tree = pj.by_rules([('.*/kernel', 'lora(rank=2, alpha=3)')])
  params, buffers = tree.init(jax.random.key(0), frozen)
  assert buffers == {}
  params = {
    name: {'kernel': random_lora_params(i, *shape, 2)}
    for i, (name, shape) in enumerate(shapes.items())
  }
  merged = pj.merge(tree, frozen, params, buffers)
  x = rng.normal(size=(3, 6))
  fn = lambda weights, x: {n: x @ weights[n]['kernel'] for n in shapes}
  ys = pj.adapted(tree, fn, factored=True)(frozen, params, buffers, jnp.float32(x))
  for name in shapes:
    p = params[name]['kernel']
    W, A, B = (np.float64(m).T for m in (frozen[name]['kernel'], p.a, p.b))
    expected = W + 1.5 * B @ A
    np.testing.assert_allclose(merged[name]['kernel'].T, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(merged[name]['bias'], frozen[name]['bias'])
    np.testing.assert_allclose(ys[name], x @ expected.T, rtol=1e-4, atol=1e-4)
