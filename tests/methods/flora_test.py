"""FLoRA against the spec's formula and its two documented styles (PyTorch layout)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax.methods.flora import FloraParams, flora
from tests.methods.spec_checks import assert_factored_and_inverse

D_IN, D_OUT = 9, 6


def random_params(seed, rank):
  rng = np.random.default_rng(seed)
  return FloraParams(
    a=rng.normal(size=(D_IN, rank)).astype(np.float32),
    b=rng.normal(size=(rank, D_OUT)).astype(np.float32),
    g=rng.normal(size=(rank, rank)).astype(np.float32),
  )


@pytest.mark.parametrize(
  'style,rank,alpha,s',
  [
    ('cr_mr', 4, 16.0, 16 / 4),
    ('cr_mr', 3, 1.5, 1.5 / 3),
    ('loralib', 4, 16.0, 16 / (4 + 1e-5)),
    ('loralib', 3, 0.0, 3 / (3 + 1e-5)),  # α ≤ 0 is replaced by r.
  ],
)
def test_apply_and_factored_are_w_plus_s_bga(style, rank, alpha, s):
  w = np.random.default_rng(1).normal(size=(D_IN, D_OUT)).astype(np.float32)
  params = random_params(2, rank)
  # Spec: ΔW = s·B G A with the full core G = gᵀ (not symmetric here).
  W, A, G, B = (np.float64(m).T for m in (w, params.a, params.g, params.b))
  expected = W + s * B @ G @ A
  adapter = flora(rank, alpha, style=style)
  np.testing.assert_allclose(
    adapter.apply(w, params, None).T, expected, rtol=1e-5, atol=1e-5
  )
  x = np.random.default_rng(3).normal(size=(2, 5, D_IN))
  assert_factored_and_inverse(adapter, w, params, expected, x)


def test_cr_mr_init_is_kaiming_uniform_and_zero_core():
  d_in, d_out, rank = 512, 64, 32
  w = jax.random.normal(jax.random.key(1), (d_in, d_out))
  adapter = flora(rank)
  params, buffers = adapter.init(jax.random.key(0), w)
  assert isinstance(params, FloraParams) and buffers is None
  for name, fan_in in (('a', d_in), ('b', rank)):
    leaf, bound = np.float64(getattr(params, name)), 1 / np.sqrt(fan_in)
    assert np.all(np.abs(leaf) <= bound) and np.abs(leaf).max() > 0.9 * bound
    np.testing.assert_allclose(leaf.var(), bound**2 / 3, rtol=0.1)
  np.testing.assert_array_equal(params.g, np.zeros((rank, rank)))
  np.testing.assert_array_equal(adapter.apply(w, params, buffers), w)


def test_loralib_init_is_normal_002_and_zero_core():
  params, _ = flora(32, style='loralib').init(jax.random.key(0), jnp.zeros((512, 256)))
  for leaf in (params.a, params.b):
    np.testing.assert_allclose(np.std(np.float64(leaf)), 0.02, rtol=0.03)
  np.testing.assert_array_equal(params.g, 0)


def test_trainable_count_is_low_rank_plus_core():
  adapter = flora(8)
  params, _ = jax.eval_shape(adapter.init, jax.random.key(0), jnp.zeros((768, 3072)))
  assert pj.count(params) == adapter.num_params((768, 3072)) == 8 * (768 + 3072) + 64


@pytest.mark.parametrize(
  'kwargs,leaf_shape,message',
  [
    ({'rank': 0}, (4, 4), 'rank=0 must be > 0'),
    ({'rank': 0, 'style': 'loralib'}, (4, 4), 'rank=0 must be > 0'),
    ({'rank': 5}, (8, 4), r'rank=5 exceeds min\(d_in, d_out\)=4'),
    ({'alpha': None}, (4, 4), 'alpha=None must be a number'),
    ({'alpha': 0.0}, (4, 4), r'alpha=0.0 must be > 0'),  # loralib: α ≤ 0 → r.
    ({'style': 'hf'}, (4, 4), "style='hf' is not one of 'loralib', 'cr_mr'"),
    ({'param_dtype': 'int8'}, (4, 4), 'not a floating dtype'),
    ({'rank': 2}, (4,), 'expects a 2-D kernel'),
  ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, leaf_shape, message):
  with pytest.raises(pj.PeftError, match=f'flora.*{message}'):
    flora(**kwargs).init(jax.random.key(0), jnp.ones(leaf_shape))
