"""BOFT against a dense NumPy construction of HF PEFT's butterfly product."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import peft_jax as pj
from peft_jax.methods import boft
from peft_jax.methods.boft import BoftParams

D_IN, D_OUT = 16, 5


def hf_block_butterfly_perm(n, num_blocks, r, n_butterfly_factor):
  """HF PEFT's ``BOFTLayer.block_butterfly_perm``, written with loops."""
  if n_butterfly_factor == 0:
    return np.arange(n)
  block = n // num_blocks
  steps = block // r
  sorted_seq = list(range(0, steps, 2)) + list(range(1, steps, 2))
  order = np.empty(block, int)
  for i, pos in enumerate(sorted_seq):
    order[i * r : i * r + r] = np.arange(pos * r, pos * r + r)
  indices = np.arange(n)
  for start in range(0, n, block):
    indices[start : start + block] = indices[start : start + block][order]
  return indices


def perm_matrix(indices):
  """HF's ``perm2mat``: ``P[i, indices[i]] = 1``."""
  mat = np.zeros((len(indices), len(indices)))
  mat[np.arange(len(indices)), indices] = 1
  return mat


def cayley(q, b):
  rows, cols = np.triu_indices(b, 1)
  s = np.zeros((b, b))
  s[rows, cols] = q
  skew = s - s.T
  return (np.eye(b) + skew) @ np.linalg.inv(np.eye(b) - skew)


def dense_rotation(q, d, b):
  """``R = P_{m−1} B_{m−1} P_{m−1}ᵀ ⋯ P_0 B_0 P_0ᵀ`` (HF's ``get_delta_weight``)."""
  m, k = q.shape[:2]
  rotation = np.eye(d)
  for i in range(m):
    p = perm_matrix(hf_block_butterfly_perm(d, k // 2**i, b // 2, m - 1))
    blocks = scipy.linalg.block_diag(*(cayley(v, b) for v in np.float64(q[i])))
    rotation = p @ blocks @ p.T @ rotation
  return rotation


@pytest.mark.parametrize(
  'b,i', [(2, 0), (2, 1), (2, 2), (2, 3), (4, 1), (4, 2), (8, 1)]
)
def test_butterfly_permutations_match_hf(b, i):
  m = 4  # Any m > 1: HF's permutation of factor i does not depend on m then.
  expected = hf_block_butterfly_perm(D_IN, D_IN // b // 2**i, b // 2, m - 1)
  np.testing.assert_array_equal(boft.butterfly_perm(D_IN, b, i), expected)


def random_params(seed, adapter):
  rng = np.random.default_rng(seed)
  shapes, _ = jax.eval_shape(adapter.init, jax.random.key(0), jnp.zeros((D_IN, D_OUT)))
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


@pytest.mark.parametrize('b,m', [(2, 1), (2, 4), (4, 3), (8, 2)])
def test_apply_and_factored_match_dense_butterfly(b, m):
  adapter = boft.boft(block_size=b, n_butterfly_factor=m)
  params = random_params(m, adapter)
  w = np.random.default_rng(9).normal(size=(D_IN, D_OUT)).astype(np.float32)
  R = dense_rotation(params.q, D_IN, b)
  # HF, PyTorch layout: Wᵀ ← R Wᵀ, then W ← W ⊙ s (s per output row).
  expected = (np.float64(w).T @ R.T) * np.float64(params.s)[:, None]
  np.testing.assert_allclose(
    adapter.apply(w, params, None).T, expected, rtol=1e-5, atol=1e-5
  )
  x = np.random.default_rng(10).normal(size=(3, 2, D_IN))
  np.testing.assert_allclose(
    adapter.linear.factored(x.astype(np.float32), w, params, None),
    x @ expected.T,
    rtol=1e-5,
    atol=1e-5,
  )
  np.testing.assert_allclose(
    adapter.unapply(adapter.apply(w, params, None), params, None), w, atol=1e-5
  )


@pytest.mark.parametrize('b,m', [(2, 4), (4, 3), (4, 1)])
def test_rotation_is_orthogonal(b, m):
  adapter = boft.boft(block_size=b, n_butterfly_factor=m, scale=False)
  params = random_params(0, adapter)
  assert params.s is None
  rotation = np.asarray(adapter.apply(jnp.eye(D_IN), params, None), np.float64)
  # R @ I: compare with the dense product, then check it is orthogonal.
  dense = dense_rotation(params.q, D_IN, b)
  np.testing.assert_allclose(rotation, dense, atol=1e-5)
  x = np.random.default_rng(1).normal(size=(2, D_IN))
  np.testing.assert_allclose(
    adapter.linear.factored(jnp.float32(x), jnp.eye(D_IN), params, None),
    x @ dense,
    rtol=1e-5,
    atol=1e-5,
  )
  np.testing.assert_allclose(rotation.T @ rotation, np.eye(D_IN), atol=1e-5)
  # log2(d_in / b) + 1 factors make R dense; fewer leave it block-sparse.
  assert np.all(rotation != 0) == (2 ** (m - 1) * b == D_IN)


@pytest.mark.parametrize(
  'kwargs,count',
  [
    ({'block_size': 4, 'n_butterfly_factor': 2}, 2 * 4 * 6 + D_OUT),
    ({'block_size': 2, 'n_butterfly_factor': 3}, 3 * 8 * 1 + D_OUT),
    ({'block_size': 4, 'n_butterfly_factor': 1, 'scale': False}, 4 * 6),
  ],
)
def test_identity_at_init_and_count(kwargs, count):
  adapter = boft.boft(**kwargs)
  w = jax.random.normal(jax.random.key(0), (D_IN, D_OUT), jnp.bfloat16)
  params, buffers = adapter.init(jax.random.key(1), w)
  assert isinstance(params, BoftParams) and buffers is None
  np.testing.assert_array_equal(params.q, 0)
  assert (params.s is not None) == kwargs.get('scale', True)
  if params.s is not None:
    np.testing.assert_array_equal(params.s, 1)
  np.testing.assert_array_equal(adapter.apply(w, params, buffers), w)
  # m · (d_in / b) · b(b − 1)/2 (+ d_out for s).
  assert pj.count(params) == adapter.num_params(w.shape) == count


@pytest.mark.parametrize(
  'kwargs,leaf_shape,message',
  [
    ({'block_size': 0}, (4, 4), 'boft: block_size=0 must be > 0'),
    ({'n_butterfly_factor': 0}, (4, 4), 'n_butterfly_factor=0 must be > 0'),
    ({'block_size': 3, 'n_butterfly_factor': 2}, (12, 4), 'must be even when'),
    ({'block_size': 3}, (16, 4), 'block_size=3 does not divide d_in=16'),
    (
      {'block_size': 4, 'n_butterfly_factor': 3},
      (24, 4),
      r'd_in=24 is not a multiple of block_size·2\^\(m−1\)=16',
    ),
    ({'scale': 'yes'}, (4, 4), "scale='yes' must be True or False"),
    ({}, (4,), 'boft expects a 2-D kernel'),
  ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, leaf_shape, message):
  with pytest.raises(pj.PeftError, match=message):
    boft.boft(**kwargs).init(jax.random.key(0), jnp.ones(leaf_shape))
