"""OFT against the paper's and HF PEFT's block-diagonal Cayley rotation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import peft_jax as pj
from peft_jax._src import linalg
from peft_jax.methods import oft
from peft_jax.methods.oft import OftParams

D_IN, D_OUT = 12, 5


def reference_blocks(q, b):
  """Cayley blocks ``(I + Q)(I − Q)⁻¹``, ``Q = S − Sᵀ``, in float64."""
  rows, cols = np.triu_indices(b, 1)
  blocks = []
  for vec in np.float64(q):
    s = np.zeros((b, b))
    s[rows, cols] = vec
    skew = s - s.T
    blocks.append((np.eye(b) + skew) @ np.linalg.inv(np.eye(b) - skew))
  return blocks


def test_cayley_is_orthogonal_and_matches_the_formula():
  q = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
  r = np.asarray(linalg.cayley(jnp.asarray(q), 4), np.float64)
  np.testing.assert_allclose(r, np.stack(reference_blocks(q, 4)), atol=1e-5)
  np.testing.assert_allclose(
    r @ r.transpose(0, 2, 1), np.broadcast_to(np.eye(4), r.shape), atol=1e-5
  )
  np.testing.assert_array_equal(
    linalg.cayley(jnp.zeros((2, 6)), 4), np.broadcast_to(np.eye(4), (2, 4, 4))
  )


@pytest.mark.parametrize(
  'block_size,block_share', [(3, False), (4, False), (4, True), (12, False)]
)
def test_apply_rotates_the_input_side_like_hf(block_size, block_share):
  adapter = oft.oft(block_size=block_size, block_share=block_share)
  rng = np.random.default_rng(1)
  w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
  k = 1 if block_share else D_IN // block_size
  params = OftParams(
    q=rng.normal(size=(k, block_size * (block_size - 1) // 2)).astype(np.float32)
  )
  blocks = reference_blocks(params.q, block_size)
  R = scipy.linalg.block_diag(
    *(blocks * (D_IN // block_size) if block_share else blocks)
  )
  # PyTorch layout: W' = W Rᵀ (HF merge: Wᵀ ← R Wᵀ); the paper: (R W0)ᵀ x.
  expected = np.float64(w).T @ R.T
  np.testing.assert_allclose(
    adapter.apply(w, params, None).T, expected, rtol=1e-5, atol=1e-5
  )
  # HF forward: x ↦ x R (blockwise), then the base layer.
  x = rng.normal(size=(2, 3, D_IN))
  np.testing.assert_allclose(
    adapter.linear.factored(x.astype(np.float32), w, params, None),
    (x @ R) @ np.float64(w),
    rtol=1e-5,
    atol=1e-5,
  )
  np.testing.assert_allclose(
    adapter.unapply(adapter.apply(w, params, None), params, None), w, atol=1e-5
  )


def test_rotation_preserves_neuron_norms_and_angles():
  """Hyperspherical energy: w'ᵀw' = wᵀw (the neurons are w's columns)."""
  rng = np.random.default_rng(2)
  w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
  params = OftParams(q=rng.normal(size=(3, 6)).astype(np.float32))
  merged = np.asarray(oft.oft(block_size=4).apply(w, params, None), np.float64)
  np.testing.assert_allclose(
    merged.T @ merged, np.float64(w).T @ w, rtol=1e-5, atol=1e-4
  )
  assert not np.allclose(merged, w, atol=0.1)


@pytest.mark.parametrize(
  'kwargs,count',
  [({'block_size': 4}, 3 * 6), ({'block_size': 4, 'block_share': True}, 6)],
)
def test_zero_init_is_identity_and_count_is_free_skew_entries(kwargs, count):
  adapter = oft.oft(**kwargs)
  w = jax.random.normal(jax.random.key(0), (D_IN, D_OUT), jnp.bfloat16)
  params, buffers = adapter.init(jax.random.key(1), w)
  assert isinstance(params, OftParams) and buffers is None
  np.testing.assert_array_equal(params.q, 0)
  assert params.q.dtype == jnp.float32
  merged = adapter.apply(w, params, buffers)
  assert merged.dtype == jnp.bfloat16
  np.testing.assert_array_equal(merged, w)
  # d_in (b − 1)/2 free entries (b(b − 1)/2 for one shared block).
  assert pj.count(params) == adapter.num_params(w.shape) == count


@pytest.mark.parametrize(
  'kwargs,leaf_shape,message',
  [
    ({'block_size': 0}, (4, 4), 'oft: block_size=0 must be > 0'),
    ({'block_size': 2.0}, (4, 4), 'block_size=2.0 must be an int'),
    ({'block_size': 5}, (12, 4), 'block_size=5 does not divide d_in=12'),
    ({'block_share': 1}, (4, 4), 'block_share=1 must be True or False'),
    ({'block_size': 2}, (4,), 'oft expects a 2-D kernel'),
  ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, leaf_shape, message):
  with pytest.raises(pj.PeftError, match=message):
    oft.oft(**kwargs).init(jax.random.key(0), jnp.ones(leaf_shape))


def reference_neumann(q, b, terms):
  """HF PEFT's Cayley–Neumann blocks, in float64: ``I + Σ_{j=1}^{n−1} c_j Qʲ``
  with ``c_j = 2`` except the last term's 1 (``n = 3`` keeps ``Q³`` as ``n = 4``)."""
  rows, cols = np.triu_indices(b, 1)
  coefficients = {1: [], 2: [2], 3: [2, 2, 1]}.get(terms, [2] * (terms - 2) + [1])
  blocks = []
  for vec in np.float64(q):
    s = np.zeros((b, b))
    s[rows, cols] = vec
    skew = s - s.T
    blocks.append(
      np.eye(b)
      + sum(c * np.linalg.matrix_power(skew, j + 1) for j, c in enumerate(coefficients))
    )
  return np.stack(blocks)


@pytest.mark.parametrize('terms', [1, 2, 3, 4, 5, 7])
def test_neumann_terms_match_hf_series(terms):
  rng = np.random.default_rng(terms)
  q = rng.normal(scale=0.3, size=(3, 6))
  w = rng.normal(size=(D_IN, D_OUT))
  adapter = oft.oft(block_size=4, neumann_terms=terms, param_dtype='float64')
  with jax.enable_x64():
    params = OftParams(q=jnp.asarray(q))
    merged = np.asarray(adapter.apply(jnp.asarray(w), params, None))
    restored = adapter.unapply(jnp.asarray(merged), params, None)
    x = rng.normal(size=(2, D_IN))
    factored = adapter.linear.factored(jnp.asarray(x), jnp.asarray(w), params, None)
  R = scipy.linalg.block_diag(*reference_neumann(q, 4, terms))
  np.testing.assert_allclose(merged, R @ w, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(factored, x @ R @ w, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(restored, w, rtol=1e-10, atol=1e-10)
  # The series approaches the exact Cayley transform as terms grow.
  if terms == 7:
    np.testing.assert_allclose(R[:4, :4], reference_blocks(q, 4)[0], atol=0.05)


def test_coft_clips_each_block_to_eps_over_sqrt_blocks():
  rng = np.random.default_rng(4)
  q = rng.normal(scale=0.3, size=(3, 6))
  q[1] *= 0.01  # Within the radius: kept as is.
  w = rng.normal(size=(D_IN, D_OUT))
  eps = 0.4
  radius = eps / np.sqrt(3)
  norms = np.sqrt(2) * np.linalg.norm(q, axis=1, keepdims=True)
  clipped = np.where(norms > radius, q * radius / norms, q)
  assert (norms > radius).sum() == 2
  adapter = oft.oft(block_size=4, coft_eps=eps, param_dtype='float64')
  with jax.enable_x64():
    merged = adapter.apply(jnp.asarray(w), OftParams(q=jnp.asarray(q)), None)
  R = scipy.linalg.block_diag(*reference_blocks(clipped, 4))
  np.testing.assert_allclose(merged, R @ w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
  'kwargs,message',
  [
    ({'neumann_terms': -1}, 'oft: neumann_terms=-1 must be > 0'),
    ({'neumann_terms': 2.0}, 'neumann_terms=2.0 must be an int'),
    ({'coft_eps': -0.1}, 'coft_eps=-0.1 must be >= 0'),
    ({'coft_eps': 'a'}, "coft_eps='a' must be a number"),
  ],
)
def test_bad_rotation_options_are_clear_errors(kwargs, message):
  with pytest.raises(pj.PeftError, match=message):
    oft.oft(block_size=4, **kwargs)
