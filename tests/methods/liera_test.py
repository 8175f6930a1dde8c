"""LieRA against the spec: the code's first-order form and the paper's exponential."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax.methods.liera import LieraParams, liera

D_IN, D_OUT = 9, 6


def random_case(seed, rank):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
  params = LieraParams(
    a=(0.3 * rng.normal(size=(D_IN, rank))).astype(np.float32),
    b=(0.3 * rng.normal(size=(rank, D_OUT))).astype(np.float32),
  )
  return w, params


@pytest.mark.parametrize('form', ['first_order', 'exp'])
@pytest.mark.parametrize('rank,alpha', [(1, 1.0), (4, 8.0)])
def test_apply_is_hadamard_rescaling_of_w(form, rank, alpha):
  w, params = random_case(0, rank)
  # Spec: W' = W ⊙ (1 + s·BA) (code) or W ⊙ exp(s·BA) (paper), s = α/r.
  W, A, B = (np.float64(m).T for m in (w, params.a, params.b))
  delta = alpha / rank * B @ A
  expected = W * (1 + delta if form == 'first_order' else np.exp(delta))
  adapter = liera(rank, alpha, form=form)
  np.testing.assert_allclose(
    adapter.apply(w, params, None).T, expected, rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(
    adapter.unapply(adapter.apply(w, params, None), params, None),
    w,
    rtol=1e-5,
    atol=1e-5,
  )
  down, up = adapter.factors(params, None)
  np.testing.assert_array_equal(down, params.a)
  np.testing.assert_array_equal(up, params.b)


def test_update_is_multiplicative_zero_entries_of_w_stay_zero():
  w, params = random_case(1, 3)
  w[2, :] = 0
  w[:, 4] = 0
  merged = np.asarray(liera(3).apply(w, params, None))
  assert np.all(merged[2] == 0) and np.all(merged[:, 4] == 0)
  assert np.all(merged[w != 0] != w[w != 0])


@pytest.mark.parametrize('form', ['first_order', 'exp'])
def test_init_kaiming_uniform_a_zero_b_so_exact_identity(form):
  d_in, d_out, rank = 512, 64, 32
  w = jax.random.normal(jax.random.key(1), (d_in, d_out))
  adapter = liera(rank, form=form)
  params, buffers = adapter.init(jax.random.key(0), w)
  assert isinstance(params, LieraParams) and buffers is None
  a, bound = np.float64(params.a), 1 / np.sqrt(d_in)
  assert np.all(np.abs(a) <= bound) and np.abs(a).max() > 0.95 * bound
  np.testing.assert_allclose(a.var(), bound**2 / 3, rtol=0.05)
  np.testing.assert_array_equal(params.b, np.zeros((rank, d_out)))
  np.testing.assert_array_equal(adapter.apply(w, params, buffers), w)


def test_trainable_count_is_lora_count_and_there_is_no_factored_form():
  adapter = liera(8)
  params, _ = jax.eval_shape(adapter.init, jax.random.key(0), jnp.zeros((768, 3072)))
  assert pj.count(params) == adapter.num_params((768, 3072)) == 8 * (768 + 3072)
  assert adapter.linear is None and adapter.mergeable


@pytest.mark.parametrize(
  'kwargs,leaf_shape,message',
  [
    ({'rank': 0}, (4, 4), 'rank=0 must be > 0'),
    ({'rank': 5}, (8, 4), r'rank=5 exceeds min\(d_in, d_out\)=4'),
    ({'alpha': 'x'}, (4, 4), "alpha='x' must be a number"),
    ({'form': 'log'}, (4, 4), "form='log' is not one of 'first_order', 'exp'"),
    ({'param_dtype': 'int8'}, (4, 4), 'not a floating dtype'),
    ({'rank': 2}, (4,), 'expects a 2-D kernel'),
  ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, leaf_shape, message):
  with pytest.raises(pj.PeftError, match=f'liera.*{message}'):
    liera(**kwargs).init(jax.random.key(0), jnp.ones(leaf_shape))
