"""Intrinsic SAID: the Fastfood transform against dense Hadamard matrices."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats

import peft_jax as pj
from peft_jax.methods import intrinsic_said
from peft_jax.methods.intrinsic_said import IntrinsicSaidBuffers, IntrinsicSaidParams


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
  sign, gauss = np.float64(buffers.sign), np.float64(buffers.gauss)
  length = len(sign)
  hadamard = scipy.linalg.hadamard(length).astype(np.float64)
  perm = np.zeros((length, length))
  perm[np.arange(length), np.asarray(buffers.perm)] = 1  # (Π u)_j = u[π_j]
  full = hadamard @ np.diag(gauss) @ perm @ hadamard @ np.diag(sign)
  return full[:size, :dim] / np.sqrt(size * np.sum(gauss**2))


@pytest.mark.parametrize('shape,dim', [((7, 5), 4), ((5,), 5), ((3, 4, 2), 7)])
def test_apply_is_theta0_plus_lambda_times_dense_fastfood(shape, dim):
  adapter = intrinsic_said.intrinsic_said(dim=dim)
  rng = np.random.default_rng(0)
  w = rng.normal(size=shape).astype(np.float32)
  _, buffers = jax.jit(adapter.init)(jax.random.key(1), w)
  params = IntrinsicSaidParams(
    theta_d=jnp.float32(rng.normal(size=dim)), lam=jnp.float32(0.7)
  )
  size = int(np.prod(shape))
  assert len(buffers.sign) == 2 ** int(np.ceil(np.log2(size)))
  proj = dense_projection(buffers, dim, size)
  expected = np.float64(w) + 0.7 * (proj @ np.float64(params.theta_d)).reshape(shape)
  round_trip = jax.jit(
    lambda w, p, b: (m := adapter.apply(w, p, b), adapter.unapply(m, p, b))
  )
  merged, unmerged = round_trip(w, params, buffers)
  np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(unmerged, w, atol=1e-5)


@pytest.mark.slow
def test_tree_merge_and_adapted_run_apply_the_update_in_weight_space():
  rng = np.random.default_rng(2)
  frozen = {
    'dense': {
      'kernel': jnp.float32(rng.normal(size=(6, 4))),
      'bias': jnp.float32(rng.normal(size=4)),
    }
  }
  tree = pj.by_rules([('dense/(kernel|bias)', 'intrinsic_said(dim=3)')])
  params, buffers = tree.init(jax.random.key(0), frozen)
  assert isinstance(buffers['dense']['kernel'], IntrinsicSaidBuffers)
  params = jax.tree.map(lambda p: p + jnp.float32(rng.normal(size=p.shape)), params)
  expected = {}
  for name, leaf in frozen['dense'].items():
    p, b = params['dense'][name], buffers['dense'][name]
    proj = dense_projection(b, 3, leaf.size)
    update = np.float64(p.lam) * (proj @ np.float64(p.theta_d)).reshape(leaf.shape)
    expected[name] = np.float64(leaf) + update
  merged = pj.merge(tree, frozen, params, buffers)
  for name in frozen['dense']:
    np.testing.assert_allclose(
      merged['dense'][name], expected[name], rtol=1e-5, atol=1e-5
    )
  x = rng.normal(size=(3, 6))
  dense = lambda weights, x: x @ weights['dense']['kernel'] + weights['dense']['bias']
  y = pj.adapted(tree, dense, factored=True)(frozen, params, buffers, jnp.float32(x))
  np.testing.assert_allclose(
    y, x @ expected['kernel'] + expected['bias'], rtol=1e-5, atol=1e-5
  )


def test_gradient_is_the_exact_transpose_projection():
  """Pitfall: the reference FWHT backward scales by 1/√L; ours is exact."""
  adapter = intrinsic_said.intrinsic_said(dim=6)
  w = jnp.zeros((10, 3))
  params, buffers = adapter.init(jax.random.key(0), w)
  probe = np.random.default_rng(1).normal(size=(10, 3))
  loss = lambda p: jnp.sum(adapter.apply(w, p, buffers) * probe)
  grads = jax.jit(jax.grad(loss))(params)
  proj = dense_projection(buffers, 6, 30)
  np.testing.assert_allclose(
    grads.theta_d, proj.T @ probe.reshape(-1), rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize('shape,rtol', [((16, 16), 1e-5), ((32, 30), 0.05)])
def test_columns_of_the_projection_are_unit_norm(shape, rtol):
  """Exactly for D = L (H G Π H B / √(L ΣG²) is then orthonormal), else about."""
  adapter = intrinsic_said.intrinsic_said(dim=16)
  w = jnp.zeros(shape)
  params, buffers = adapter.init(jax.random.key(0), w)
  column = lambda e: adapter.apply(w, params._replace(theta_d=e), buffers).reshape(-1)
  cols = np.asarray(jax.jit(jax.vmap(column))(jnp.eye(16)), np.float64)
  np.testing.assert_allclose(np.linalg.norm(cols, axis=1), 1.0, rtol=rtol)


@pytest.mark.parametrize('param_dtype', ['float32', 'bfloat16'])
def test_init_identity_buffers_and_count(param_dtype):
  adapter = intrinsic_said.intrinsic_said(dim=32, param_dtype=param_dtype)
  w = jax.random.normal(jax.random.key(0), (96, 40), jnp.bfloat16)  # L = 4096
  params, buffers = adapter.init(jax.random.key(1), w)
  assert isinstance(params, IntrinsicSaidParams)
  assert isinstance(buffers, IntrinsicSaidBuffers)
  np.testing.assert_array_equal(params.theta_d, 0)
  np.testing.assert_array_equal(params.lam, 1)
  assert params.theta_d.dtype == params.lam.dtype == jnp.dtype(param_dtype)
  # Buffer dtypes: sign and gauss float (param_dtype), perm int32.
  assert buffers.sign.dtype == buffers.gauss.dtype == jnp.dtype(param_dtype)
  assert buffers.perm.dtype == jnp.int32
  assert buffers.sign.shape == buffers.perm.shape == buffers.gauss.shape == (4096,)
  sign, gauss = np.float64(buffers.sign), np.float64(buffers.gauss)
  assert set(np.unique(sign)) == {-1.0, 1.0} and abs(sign.mean()) < 0.05
  np.testing.assert_array_equal(np.sort(buffers.perm), np.arange(4096))
  np.testing.assert_allclose([gauss.mean(), gauss.std()], [0, 1], atol=0.05)
  merged = jax.jit(adapter.apply)(w, params, buffers)
  assert merged.dtype == jnp.bfloat16
  np.testing.assert_array_equal(merged, w)
  assert pj.count(params) == adapter.num_params(w.shape) == 33  # d + 1 (λ)


def test_permutation_is_uniform_over_all_permutations():
  """Π is drawn uniformly (the reference's np.random.permutation): L = 4 has
  24 permutations, each about equally often over many keys."""
  adapter = intrinsic_said.intrinsic_said(dim=2)
  keys = jax.random.split(jax.random.key(0), 4800)
  _, buffers = jax.vmap(adapter.init, in_axes=(0, None))(keys, jnp.zeros(3))
  perms = np.asarray(buffers.perm)
  assert perms.shape == (4800, 4)
  index = {p: i for i, p in enumerate(itertools.permutations(range(4)))}
  counts = np.bincount([index[tuple(p)] for p in perms], minlength=24)
  assert counts.sum() == 4800  # every draw is a permutation of 0..3
  assert scipy.stats.chisquare(counts).pvalue > 1e-3


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
