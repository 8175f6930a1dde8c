"""DiffPruning's layer against a float64 NumPy computation of its formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax._src import noise
from peft_jax.methods.diff_pruning import (
  DiffPruningBuffers,
  DiffPruningParams,
  diff_pruning,
  hard_concrete,
  uniform,
)

SHAPE = (7, 5)


def np_sigmoid(x):
  return 1 / (1 + np.exp(-x))


def np_gate(alpha, u, beta, l, r):  # noqa: E741
  """Hard concrete, ``clamp(σ((log u − log(1−u) + α)/β)(r − l) + l, 0, 1)``."""
  alpha, u = np.float64(alpha), np.float64(u)
  s = np_sigmoid((np.log(u) - np.log(1 - u) + alpha) / beta)
  return np.clip(s * (r - l) + l, 0, 1)


def np_deterministic_gate(alpha, beta, l, r):  # noqa: E741
  return np.clip(np_sigmoid(np.float64(alpha) / beta) * (r - l) + l, 0, 1)


def random_problem(seed, shape=SHAPE):
  """Frozen ``w``, diff ``d`` and logits ``α`` spread across the gate's range."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=shape).astype(np.float32)
  params = DiffPruningParams(
    w=rng.normal(size=shape).astype(np.float32),
    alpha=rng.uniform(-4, 4, size=shape).astype(np.float32),
  )
  return w, params


HYPER = [
  dict(l=-1.5, r=1.5, beta=1.0),  # Guo et al.'s defaults.
  dict(l=-0.1, r=1.1, beta=2 / 3),  # Louizos et al.'s.
  dict(l=-3.0, r=3.0, beta=1.0),  # The SAM code's clamp=3.
]


@pytest.mark.parametrize('hyper', HYPER)
def test_sampled_gate_is_hard_concrete(hyper):
  rng = np.random.default_rng(0)
  alpha = rng.uniform(-4, 4, size=(200,)).astype(np.float32)
  u = rng.uniform(1e-4, 1 - 1e-4, size=(200,)).astype(np.float32)
  got = hard_concrete(
    jnp.asarray(alpha), jnp.asarray(u), hyper['beta'], hyper['l'], hyper['r']
  )
  expected = np_gate(alpha, u, **hyper)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  # Not a degenerate draw: both clamps and the open interval occur.
  assert np.any(expected == 0) and np.any(expected == 1)
  assert np.any((expected > 0) & (expected < 1))


@pytest.mark.parametrize('hyper', HYPER)
def test_stored_buffers_give_the_deterministic_gate(hyper):
  w, params = random_problem(1)
  adapter = diff_pruning(p=0.1, **hyper)
  _, buffers = adapter.init(jax.random.key(0), w)
  expected = np.float64(w) + np_deterministic_gate(params.alpha, **hyper) * params.w
  first = adapter.apply(w, params, buffers)
  np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(jax.jit(adapter.apply)(w, params, buffers), first)


def test_active_noise_samples_u_per_entry_from_its_key():
  hyper = HYPER[1]
  w, params = random_problem(2)
  adapter = diff_pruning(p=0.1, **hyper)
  _, buffers = adapter.init(jax.random.key(0), w)
  outs = []
  for seed in (3, 4):
    active = noise.activate(buffers, jax.random.key(seed))
    assert bool(active.noise.active)
    u = np.asarray(uniform(noise.key_of(active.noise), SHAPE))
    expected = np.float64(w) + np_gate(params.alpha, u, **hyper) * params.w
    out = jax.jit(adapter.apply)(w, params, active)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    outs.append(out)
  assert not np.allclose(outs[0], outs[1])  # A fresh u per key.


def test_the_noise_is_uniform_on_the_open_interval():
  u = np.asarray(uniform(jax.random.key(0), (100_000,)), np.float64)
  assert u.min() >= 1e-6 and u.max() <= 1 - 1e-6
  # Mean and variance of U(0, 1): 1/2 and 1/12; 6σ bounds for n = 1e5.
  n = u.size
  assert abs(u.mean() - 0.5) < 6 * np.sqrt(1 / 12 / n)
  assert abs(u.var() - 1 / 12) < 6 * np.sqrt(1 / 180 / n)


def test_a_fixed_mask_gives_w_plus_masked_diff_whatever_the_noise():
  w, params = random_problem(5)
  adapter = diff_pruning(p=0.2)
  _, buffers = adapter.init(jax.random.key(0), w)
  mask = np.random.default_rng(6).random(SHAPE) < 0.2
  buffers = buffers._replace(mask=jnp.asarray(mask), fixed=jnp.asarray(True))
  expected = np.float64(w) + np.where(mask, np.float64(params.w), 0)
  for stored in (buffers, noise.activate(buffers, jax.random.key(1))):
    out = np.asarray(adapter.apply(w, params, stored))
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[~mask], w[~mask])  # Exactly θ0 outside.


@pytest.mark.parametrize('hyper', HYPER)
def test_regularizer_is_the_expected_l0_norm_until_the_fix(hyper):
  w, params = random_problem(7)
  coef = 0.37
  adapter = diff_pruning(p=0.1, l0_coef=coef, **hyper)
  _, buffers = adapter.init(jax.random.key(0), w)
  shift = hyper['beta'] * np.log(-hyper['l'] / hyper['r'])
  expected = coef * np.sum(np_sigmoid(np.float64(params.alpha) - shift))
  got = adapter.regularizer(w, params, buffers)
  assert got.shape == () and got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  fixed = buffers._replace(fixed=jnp.asarray(True))
  assert adapter.regularizer(w, params, fixed) == 0
  grads = jax.grad(lambda p: adapter.regularizer(w, p, fixed))(params)
  np.testing.assert_array_equal(grads.alpha, 0)
  assert diff_pruning(l0_coef=0.0).regularizer is None


@pytest.mark.parametrize('shape,p', [((7, 5), 0.2), ((64, 48), 0.005), ((10,), 0.35)])
def test_init_is_identity_typed_and_counts_the_budget(shape, p):
  w = jax.random.normal(jax.random.key(1), shape)
  adapter = diff_pruning(p=p, alpha_init=5.0)
  params, buffers = adapter.init(jax.random.key(0), w)
  assert isinstance(params, DiffPruningParams)
  assert isinstance(buffers, DiffPruningBuffers)
  assert isinstance(buffers.noise, pj.Noise) and not bool(buffers.noise.active)
  np.testing.assert_array_equal(params.w, 0)
  np.testing.assert_array_equal(params.alpha, 5.0)
  assert int(buffers.k) == int(np.floor(p * np.prod(shape)))
  assert not bool(buffers.fixed) and not np.any(buffers.mask)
  np.testing.assert_array_equal(adapter.apply(w, params, buffers), w)
  assert pj.count(params) == adapter.num_params(shape) == 2 * np.prod(shape)


def test_bf16_leaf_keeps_its_dtype_with_float32_params():
  w = jnp.ones(SHAPE, jnp.bfloat16)
  adapter = diff_pruning(p=0.1)
  params, buffers = adapter.init(jax.random.key(0), w)
  assert params.w.dtype == params.alpha.dtype == jnp.float32
  assert adapter.apply(w, params, buffers).dtype == jnp.bfloat16


@pytest.mark.parametrize(
  'kwargs,message',
  [
    ({'p': 0}, r'p=0.0 must be in \(0, 1\]'),
    ({'p': 1.5}, r'p=1.5 must be in \(0, 1\]'),
    ({'p': -0.1}, r'p=-0.1 must be in \(0, 1\]'),
    ({'p': 'half'}, "p='half' must be a number"),
    ({'l': 0.5}, 'l=0.5 must be < 0'),
    ({'r': 1.0}, 'r=1.0 must be > 1'),
    ({'beta': 0}, 'beta=0.0 must be > 0'),
    ({'l0_coef': -1}, 'l0_coef=-1.0 must be >= 0'),
    ({'param_dtype': 'int8'}, 'not a floating dtype'),
  ],
)
def test_bad_hyperparameters_are_one_line_errors(kwargs, message):
  with pytest.raises(pj.PeftError, match=message) as error:
    diff_pruning(**kwargs)
  assert '\n' not in str(error.value)
