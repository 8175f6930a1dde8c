"""TriLoRA against the spec's formula (PyTorch layout) in both of its scalings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax.methods.trilora import TriLoraParams, trilora
from tests.methods.spec_checks import assert_factored_and_inverse

D_IN, D_OUT = 9, 6


@pytest.mark.parametrize(
  'rank,alpha,s', [(3, None, 1.0), (4, 16.0, 4.0), (2, 1.0, 0.5)]
)
def test_apply_and_factored_are_w_plus_s_b_diag_e_a(rank, alpha, s):
  rng = np.random.default_rng(0)
  w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
  params = TriLoraParams(
    a=rng.normal(size=(D_IN, rank)).astype(np.float32),
    b=rng.normal(size=(rank, D_OUT)).astype(np.float32),
    e=rng.normal(size=rank).astype(np.float32),
  )
  # Spec: ΔW = B diag(e) A (loralib, no scale) or s·B diag(e) A, s = α/r (CR_MR).
  W, A, B = (np.float64(x).T for x in (w, params.a, params.b))
  expected = W + s * B @ np.diag(np.float64(params.e)) @ A
  adapter = trilora(rank, alpha)
  np.testing.assert_allclose(
    adapter.apply(w, params, None).T, expected, rtol=1e-5, atol=1e-5
  )
  x = rng.normal(size=(5, D_IN))
  assert_factored_and_inverse(adapter, w, params, expected, x)
  down, up = adapter.factors(params, None)
  np.testing.assert_array_equal(down, params.a)
  np.testing.assert_array_equal(up, params.b)


def test_init_kaiming_uniform_factors_and_zero_e_so_identity():
  d_in, d_out, rank = 512, 64, 32
  w = jax.random.normal(jax.random.key(1), (d_in, d_out))
  adapter = trilora(rank)
  params, buffers = adapter.init(jax.random.key(0), w)
  assert isinstance(params, TriLoraParams) and buffers is None
  for name, fan_in in (('a', d_in), ('b', rank)):
    leaf, bound = np.float64(getattr(params, name)), 1 / np.sqrt(fan_in)
    assert np.all(np.abs(leaf) <= bound) and np.abs(leaf).max() > 0.9 * bound
    np.testing.assert_allclose(leaf.var(), bound**2 / 3, rtol=0.1)
  np.testing.assert_array_equal(params.e, np.zeros(rank))
  np.testing.assert_array_equal(adapter.apply(w, params, buffers), w)


def test_trainable_count_is_r_times_din_plus_dout_plus_one():
  adapter = trilora(8)
  params, _ = jax.eval_shape(adapter.init, jax.random.key(0), jnp.zeros((768, 3072)))
  assert pj.count(params) == adapter.num_params((768, 3072)) == 8 * (768 + 3072 + 1)


@pytest.mark.parametrize(
  'kwargs,leaf_shape,message',
  [
    ({'rank': 0}, (4, 4), 'rank=0 must be > 0'),
    ({'rank': 5}, (8, 4), r'rank=5 exceeds min\(d_in, d_out\)=4'),
    ({'alpha': 'x'}, (4, 4), "alpha='x' must be a number"),
    ({'param_dtype': 'int8'}, (4, 4), 'not a floating dtype'),
    ({'rank': 2}, (4,), 'expects a 2-D kernel'),
  ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, leaf_shape, message):
  with pytest.raises(pj.PeftError, match=f'trilora.*{message}'):
    trilora(**kwargs).init(jax.random.key(0), jnp.ones(leaf_shape))
