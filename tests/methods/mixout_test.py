"""Mixout against a float64 NumPy computation of Lee et al.'s mixing formula."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_jax as pj
from peft_jax._src import noise
from peft_jax.methods.mixout import MixoutBuffers, MixoutParams, keep_mask, mix, mixout
from tests.references import compiled_programs

SHAPE = (7, 5)


def np_mix(theta, theta0, keep, p):
  """``(M ⊙ θ + (1 − M) ⊙ θ0 − p θ0) / (1 − p)`` (Lee et al., ICLR 2020, §3)."""
  theta, theta0, keep = np.float64(theta), np.float64(theta0), np.float64(keep)
  return (keep * theta + (1 - keep) * theta0 - p * theta0) / (1 - p)


def random_problem(seed, shape=SHAPE):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=shape).astype(np.float32)
  theta = (w + rng.normal(size=shape)).astype(np.float32)
  return w, MixoutParams(theta=jnp.asarray(theta))


def active(buffers, seed):
  return noise.activate(buffers, jax.random.key(seed))


@pytest.mark.parametrize('p', [0.1, 0.5, 0.9])
def test_mix_is_the_formula_for_a_given_mask(p):
  w, params = random_problem(0)
  keep = np.random.default_rng(1).random(SHAPE) < 0.5
  got = mix(params.theta, jnp.asarray(w), jnp.asarray(keep), p)
  np.testing.assert_allclose(
    got, np_mix(params.theta, w, keep, p), rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize('p', [0.1, 0.6])
def test_training_forward_is_the_formula_with_a_bernoulli_mask(p):
  """Each entry is either ``θ0`` (M = 0) or ``(θ − p θ0)/(1 − p)`` (M = 1)."""
  w, params = random_problem(2)
  adapter = mixout(p=p)
  _, buffers = adapter.init(jax.random.key(0), w)
  out = np.asarray(jax.jit(adapter.apply)(w, params, active(buffers, 3)), np.float64)
  keep = np.abs(out - w) > np.abs(out - np_mix(params.theta, w, 1, p))
  np.testing.assert_allclose(
    out, np_mix(params.theta, w, keep, p), rtol=1e-5, atol=1e-5
  )
  assert 0 < keep.sum() < keep.size
  other = np.asarray(adapter.apply(w, params, active(buffers, 4)))
  assert not np.allclose(out, other)  # A fresh mask per key.


def test_the_training_forward_is_unbiased():
  """``E[θ_mix] = θ``. Per entry ``Var θ_mix = p/(1 − p) (θ − θ0)²``, so the mean
  of n draws is within 5 standard errors ``√(p/((1 − p) n)) |θ − θ0|`` (each of
  35 entries fails with probability 6e-7)."""
  p, n = 0.3, 20_000
  w, params = random_problem(5)
  adapter = mixout(p=p)
  _, buffers = adapter.init(jax.random.key(0), w)
  keys = jax.random.split(jax.random.key(6), n)
  sample = jax.jit(
    jax.vmap(
      lambda key: adapter.apply(
        w, params, buffers._replace(noise=pj.Noise(jax.random.key_data(key), True))
      )
    )
  )
  draws = np.asarray(sample(keys), np.float64)
  theta = np.float64(params.theta)
  error = np.sqrt(p / ((1 - p) * n)) * np.abs(theta - w)
  assert np.all(np.abs(draws.mean(0) - theta) <= 5 * error)
  kept = np.abs(draws - w) > 1e-4 * np.abs(theta - w)  # M = 1 entries.
  # The kept fraction is 1 − p, within 5 standard errors of n·35 draws.
  assert abs(kept.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / kept.size)


def test_per_input_draws_one_mask_per_input_row():
  w, params = random_problem(7, (12, 9))
  adapter = mixout(p=0.5, per='input')
  _, buffers = adapter.init(jax.random.key(0), w)
  for seed in range(3):
    out = np.asarray(adapter.apply(w, params, active(buffers, seed)), np.float64)
    keep = np.abs(out - w) > np.abs(out - np_mix(params.theta, w, 1, 0.5))
    assert np.all(keep == keep[:, :1])  # Shared by every output.
    assert 0 < keep[:, 0].sum() < 12
  assert keep_mask(jax.random.key(0), (12, 9), 0.5, 'input').shape == (12, 1)
  assert keep_mask(jax.random.key(0), (9,), 0.5, 'input').shape == (9,)


def test_stored_buffers_give_theta_and_init_is_identity():
  w, params = random_problem(8)
  adapter = mixout(p=0.4)
  params0, buffers = adapter.init(jax.random.key(0), w)
  assert isinstance(params0, MixoutParams) and isinstance(buffers, MixoutBuffers)
  assert not bool(buffers.noise.active)
  np.testing.assert_array_equal(adapter.apply(w, params0, buffers), w)
  np.testing.assert_array_equal(adapter.apply(w, params, buffers), params.theta)
  x = np.random.default_rng(9).normal(size=(3, 7)).astype(np.float32)
  np.testing.assert_allclose(
    adapter.linear.factored(x, w, params, buffers),
    np.float64(x) @ np.float64(params.theta),
    rtol=1e-5,
    atol=1e-5,
  )
  assert pj.count(params0) == adapter.num_params(SHAPE) == 35
  assert adapter.unapply is None


def test_the_mask_is_random_in_the_step_only_and_the_step_compiles_once():
  rng = np.random.default_rng(0)
  frozen = {'dense': {'kernel': rng.normal(size=(6, 3)).astype(np.float32)}}
  batch = (rng.normal(size=(16, 6)).astype(np.float32), np.zeros((16, 3), np.float32))

  def loss_fn(weights, batch, rng):
    del rng
    return jnp.mean((batch[0] @ weights['dense']['kernel'] - batch[1]) ** 2), {}

  adapter = pj.by_rules([('dense/kernel', 'mixout(p=0.3)')])
  optimizer = optax.adamw(1e-2, weight_decay=0.1)

  def create(key):
    params, buffers = adapter.init(key, frozen)
    params = jax.tree.map(lambda x: x + 0.5, params)  # θ ≠ θ0: mixing matters.
    return pj.TrainState.create(params, buffers, optimizer, key)

  state = jax.jit(create)(jax.random.key(1))
  step = jax.jit(pj.make_train_step(loss_fn, adapter, optimizer))
  evaluate = jax.jit(lambda p, b: loss_fn(adapter.apply(frozen, p, b), batch, None)[0])
  with compiled_programs() as compiled:
    for _ in range(5):
      eval_loss = evaluate(state.params, state.buffers)
      new_state, metrics = step(state, frozen, batch)
      assert metrics['loss'] != eval_loss  # The step saw a mixed weight.
      assert not bool(new_state.buffers['dense']['kernel'].noise.active)
      state = new_state
  assert compiled.count('jit(step)') == 1, compiled
  weights = adapter.apply(frozen, state.params, state.buffers)  # Evaluation: θ.
  np.testing.assert_array_equal(
    weights['dense']['kernel'], state.params['dense']['kernel'].theta
  )


@pytest.mark.parametrize(
  'kwargs,message',
  [
    ({'p': 0}, r'p=0.0 must be in \(0, 1\)'),
    ({'p': 1}, r'p=1.0 must be in \(0, 1\)'),
    ({'p': 1.5}, r'p=1.5 must be in \(0, 1\)'),
    ({'p': -0.2}, r'p=-0.2 must be in \(0, 1\)'),
    ({'per': 'output'}, "per='output' is not one of 'entry', 'input'"),
    ({'param_dtype': 'int8'}, 'not a floating dtype'),
  ],
)
def test_bad_hyperparameters_are_one_line_errors(kwargs, message):
  with pytest.raises(pj.PeftError, match=message) as error:
    mixout(**kwargs)
  assert '\n' not in str(error.value)
