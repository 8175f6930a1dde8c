"""MoSLoRA against the spec's formula (PyTorch layout) and its mixer inits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax.methods.moslora import MosLoraParams, moslora
from tests.methods.spec_checks import assert_factored_and_inverse

D_IN, D_OUT = 9, 6


@pytest.mark.parametrize('rank,alpha', [(1, 2.0), (4, 16.0), (3, -1.0)])
def test_apply_and_factored_are_w_plus_s_bma(rank, alpha):
  rng = np.random.default_rng(0)
  w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
  params = MosLoraParams(
    a=rng.normal(size=(D_IN, rank)).astype(np.float32),
    b=rng.normal(size=(rank, D_OUT)).astype(np.float32),
    m=rng.normal(size=(rank, rank)).astype(np.float32),
  )
  # Spec: ΔW = s·B M A, s = α/(r+1e-5) with α ≤ 0 replaced by r; M = mᵀ.
  W, A, M, B = (np.float64(x).T for x in (w, params.a, params.m, params.b))
  s = (alpha if alpha > 0 else rank) / (rank + 1e-5)
  expected = W + s * B @ M @ A
  adapter = moslora(rank, alpha)
  np.testing.assert_allclose(
    adapter.apply(w, params, None).T, expected, rtol=1e-5, atol=1e-5
  )
  x = rng.normal(size=(5, D_IN))
  assert_factored_and_inverse(adapter, w, params, expected, x)


def test_default_init_normal_a_and_mixer_zero_b_so_identity():
  w = jax.random.normal(jax.random.key(1), (512, 256))
  adapter = moslora(64)
  params, buffers = adapter.init(jax.random.key(0), w)
  assert isinstance(params, MosLoraParams) and buffers is None
  np.testing.assert_allclose(np.std(np.float64(params.a)), 0.02, rtol=0.03)
  np.testing.assert_allclose(np.std(np.float64(params.m)), 0.02, rtol=0.05)
  np.testing.assert_array_equal(params.b, np.zeros((64, 256)))
  np.testing.assert_array_equal(adapter.apply(w, params, buffers), w)


def test_paper_mixer_inits_kaiming_and_orthogonal():
  w = jnp.zeros((96, 80))
  m = np.float64(moslora(64, mixer_init='kaiming').init(jax.random.key(0), w)[0].m)
  bound = 1 / np.sqrt(64)
  assert np.all(np.abs(m) <= bound) and np.abs(m).max() > 0.95 * bound
  m = np.float64(moslora(64, mixer_init='orthogonal').init(jax.random.key(0), w)[0].m)
  np.testing.assert_allclose(m.T @ m, np.eye(64), atol=1e-5)


def test_trainable_count_is_low_rank_plus_mixer():
  adapter = moslora(8)
  params, _ = jax.eval_shape(adapter.init, jax.random.key(0), jnp.zeros((768, 3072)))
  assert pj.count(params) == adapter.num_params((768, 3072)) == 8 * (768 + 3072) + 64


@pytest.mark.parametrize(
  'kwargs,leaf_shape,message',
  [
    ({'rank': 0}, (4, 4), 'rank=0 must be > 0'),
    ({'rank': 5}, (8, 4), r'rank=5 exceeds min\(d_in, d_out\)=4'),
    ({'alpha': 'x'}, (4, 4), "alpha='x' must be a number"),
    ({'mixer_init': 'xavier'}, (4, 4), "mixer_init='xavier' is not one of"),
    ({'param_dtype': 'int8'}, (4, 4), 'not a floating dtype'),
    ({'rank': 2}, (4,), 'expects a 2-D kernel'),
  ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, leaf_shape, message):
  with pytest.raises(pj.PeftError, match=f'moslora.*{message}'):
    moslora(**kwargs).init(jax.random.key(0), jnp.ones(leaf_shape))
