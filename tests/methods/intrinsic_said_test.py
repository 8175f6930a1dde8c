"""Intrinsic SAID: the Fastfood transform against dense Hadamard matrices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import peft_jax as pj
from peft_jax.methods import intrinsic_said


@pytest.mark.parametrize('length', [1, 2, 8, 64])
def test_fwht_is_multiplication_by_the_hadamard_matrix(length):
  x = np.random.default_rng(length).normal(size=(3, 2, length))
  np.testing.assert_allclose(
    jax.jit(intrinsic_said.fwht)(jnp.float32(x)),
    x @ scipy.linalg.hadamard(length),
    rtol=1e-5,
    atol=1e-4,
  )


def dense_projection(buffers, dim, size):
  """``P = (H G Π H B)[:D, :d] / √(D ΣG²)`` with explicit matrices, float64."""
  sign, gauss, keys = (np.float64(buffers[k]) for k in ('sign', 'gauss', 'perm_keys'))
  length = len(sign)
  hadamard = scipy.linalg.hadamard(length).astype(np.float64)
  perm = np.zeros((length, length))
  perm[np.arange(length), np.argsort(keys, kind='stable')] = 1  # (Π u)_j = u[π_j]
  full = hadamard @ np.diag(gauss) @ perm @ hadamard @ np.diag(sign)
  return full[:size, :dim] / np.sqrt(size * np.sum(gauss**2))


@pytest.mark.parametrize('shape,dim', [((7, 5), 4), ((5,), 5), ((3, 4, 2), 7)])
def test_apply_is_theta0_plus_lambda_times_dense_fastfood(shape, dim):
  adapter = intrinsic_said.intrinsic_said(dim=dim)
  rng = np.random.default_rng(0)
  w = rng.normal(size=shape).astype(np.float32)
  theta = jax.jit(adapter.init)(jax.random.key(1), w)
  theta['theta_d'] = jnp.float32(rng.normal(size=dim))
  theta['lam'] = jnp.float32(0.7)
  size = int(np.prod(shape))
  assert len(theta['buffers']['sign']) == 2 ** int(np.ceil(np.log2(size)))
  proj = dense_projection(theta['buffers'], dim, size)
  expected = np.float64(w) + 0.7 * (proj @ np.float64(theta['theta_d'])).reshape(shape)
  round_trip = jax.jit(lambda w, t: (m := adapter.apply(w, t), adapter.unapply(m, t)))
  merged, unmerged = round_trip(w, theta)
  np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(unmerged, w, atol=1e-5)


def test_gradient_is_the_exact_transpose_projection():
  """Pitfall: the reference FWHT backward scales by 1/√L; ours is exact."""
  adapter = intrinsic_said.intrinsic_said(dim=6)
  w = jnp.zeros((10, 3))
  theta = adapter.init(jax.random.key(0), w)
  probe = np.random.default_rng(1).normal(size=(10, 3))
  grads = jax.jit(jax.grad(lambda t: jnp.sum(adapter.apply(w, t) * probe)))(theta)
  proj = dense_projection(theta['buffers'], 6, 30)
  np.testing.assert_allclose(
    grads['theta_d'], proj.T @ probe.reshape(-1), rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize('shape,rtol', [((16, 16), 1e-5), ((32, 30), 0.05)])
def test_columns_of_the_projection_are_unit_norm(shape, rtol):
  """Exactly for D = L (H G Π H B / √(L ΣG²) is then orthonormal), else about."""
  adapter = intrinsic_said.intrinsic_said(dim=16)
  w = jnp.zeros(shape)
  theta = adapter.init(jax.random.key(0), w)
  column = lambda e: adapter.apply(w, {**theta, 'theta_d': e}).reshape(-1)
  cols = np.asarray(jax.jit(jax.vmap(column))(jnp.eye(16)), np.float64)
  np.testing.assert_allclose(np.linalg.norm(cols, axis=1), 1.0, rtol=rtol)


def test_init_identity_buffers_and_count():
  adapter = intrinsic_said.intrinsic_said(dim=32)
  w = jax.random.normal(jax.random.key(0), (96, 40), jnp.bfloat16)  # L = 4096
  theta = adapter.init(jax.random.key(1), w)
  np.testing.assert_array_equal(theta['theta_d'], 0)
  np.testing.assert_array_equal(theta['lam'], 1)
  buffers = {k: np.asarray(v, np.float64) for k, v in theta['buffers'].items()}
  assert set(np.unique(buffers['sign'])) == {-1.0, 1.0}
  assert np.all((buffers['perm_keys'] >= 0) & (buffers['perm_keys'] < 1))
  np.testing.assert_allclose(
    [buffers['gauss'].mean(), buffers['gauss'].std()], [0, 1], atol=0.05
  )
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(theta))
  merged = jax.jit(adapter.apply)(w, theta)
  assert merged.dtype == jnp.bfloat16
  np.testing.assert_array_equal(merged, w)
  assert pj.count(theta) == adapter.num_params(w.shape) == 33  # d + 1 (λ)


@pytest.mark.parametrize(
  'kwargs,leaf_shape,message',
  [
    ({'dim': 0}, (4, 4), 'intrinsic_said: dim=0 must be > 0'),
    ({'dim': 2.5}, (4, 4), 'dim=2.5 must be an int'),
    ({'dim': 17}, (4, 4), r'dim=17 exceeds the leaf size D=16 \(shape \(4, 4\)\)'),
    ({'param_dtype': 'int8'}, (4, 4), 'not a floating dtype'),
  ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, leaf_shape, message):
  with pytest.raises(pj.PeftError, match=message):
    intrinsic_said.intrinsic_said(**kwargs).init(
      jax.random.key(0), jnp.ones(leaf_shape)
    )
