"""LoKr (KronA) against HF PEFT's factorisation and Kronecker formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax.methods import lokr
from peft_jax.methods.lokr import LokrParams

D_IN, D_OUT = 12, 8  # factorization: (3, 4) and (2, 4)


@pytest.mark.parametrize(
  'dimension,factor,expected',
  [
    (256, -1, (16, 16)),  # HF PEFT docstring examples.
    (128, -1, (8, 16)),
    (127, -1, (1, 127)),
    (128, 4, (4, 32)),
    (128, 64, (64, 2)),  # A dividing factor is returned as is, unsorted.
    (128, 3, (2, 64)),  # Largest divisor <= factor.
    (12, -1, (3, 4)),
    (768, -1, (24, 32)),
  ],
)
def test_factorization_follows_hf(dimension, factor, expected):
  assert lokr.factorization(dimension, factor) == expected


def random_params(seed, adapter):
  """Random values for the factors ``adapter`` uses (the others stay None)."""
  rng = np.random.default_rng(seed)
  shapes, _ = jax.eval_shape(adapter.init, jax.random.key(0), jnp.zeros((D_IN, D_OUT)))
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def used(params):
  return sorted(f for f in params._fields if getattr(params, f) is not None)


CONFIGS = [
  ({}, 1.0),
  ({'alpha': 3.0}, 3.0),
  ({'rank': 2, 'alpha': 4.0}, 2.0),
  ({'rank': 2, 'alpha': 4.0, 'decompose_both': True}, 2.0),
  ({'factor': 2, 'rank': 1}, 1.0),
  # full_d: d stays (b1, b2) with a rank; s = α/r all the same.
  ({'rank': 2, 'alpha': 3.0, 'full_d': True}, 1.5),
  ({'rank': 1, 'alpha': 3.0, 'decompose_both': True, 'full_d': True}, 3.0),
]


@pytest.mark.parametrize('kwargs,scale', CONFIGS)
def test_apply_and_factored_equal_the_materialised_kronecker_product(kwargs, scale):
  adapter = lokr.lokr(**kwargs)
  params = random_params(1, adapter)
  w = np.random.default_rng(2).normal(size=(D_IN, D_OUT)).astype(np.float32)
  # HF PEFT, PyTorch layout: ΔW = s · kron(w1, w2), w1 = cᵀ, w2 = dᵀ (each
  # possibly a product of two low-rank factors).
  c = np.float64(params.c1) @ params.c2 if params.c is None else params.c
  d = np.float64(params.d1) @ params.d2 if params.d is None else params.d
  w1, w2 = np.float64(c).T, np.float64(d).T
  assert w1.shape[1] * w2.shape[1] == D_IN and w1.shape[0] * w2.shape[0] == D_OUT
  expected = np.float64(w).T + scale * np.kron(w1, w2)
  np.testing.assert_allclose(
    adapter.apply(w, params, None).T, expected, rtol=1e-5, atol=1e-4
  )
  x = np.random.default_rng(3).normal(size=(3, 2, D_IN))
  np.testing.assert_allclose(
    adapter.linear.factored(x.astype(np.float32), w, params, None),
    x @ expected.T,
    rtol=1e-4,
    atol=1e-4,
  )
  np.testing.assert_allclose(
    adapter.unapply(adapter.apply(w, params, None), params, None), w, atol=1e-4
  )


@pytest.mark.parametrize(
  'kwargs,names,count',
  [
    ({}, ['c', 'd'], 3 * 2 + 4 * 4),
    ({'rank': 2}, ['c', 'd1', 'd2'], 3 * 2 + 2 * (4 + 4)),
    ({'rank': 1, 'decompose_both': True}, ['c1', 'c2', 'd1', 'd2'], 5 + 8),
    ({'rank': 2, 'full_d': True}, ['c', 'd'], 3 * 2 + 4 * 4),
    ({'rank': 1, 'decompose_both': True, 'full_d': True}, ['c1', 'c2', 'd'], 5 + 16),
  ],
)
def test_factor_shapes_and_count(kwargs, names, count):
  adapter = lokr.lokr(**kwargs)
  params, buffers = adapter.init(jax.random.key(0), jnp.zeros((D_IN, D_OUT)))
  assert isinstance(params, LokrParams) and buffers is None
  assert used(params) == names
  assert pj.count(params) == adapter.num_params((D_IN, D_OUT)) == count


def test_init_zero_c_and_kaiming_uniform_d_identity_at_init():
  d_in, d_out, rank = 32 * 32, 32 * 32, 16  # c: (32, 32), d: (32, 32)
  w = jnp.ones((d_in, d_out))
  adapter = lokr.lokr(rank=rank, decompose_both=True)
  params, buffers = adapter.init(jax.random.key(0), w)
  np.testing.assert_array_equal(params.c2, 0)
  for leaf, fan_in in [(params.c1, 32), (params.d1, 32), (params.d2, rank)]:
    leaf = np.asarray(leaf, np.float64)
    bound = 1 / np.sqrt(fan_in)
    assert np.all(np.abs(leaf) <= bound) and np.abs(leaf).max() > 0.95 * bound
  full, _ = lokr.lokr().init(jax.random.key(0), jnp.ones((D_IN, D_OUT)))
  np.testing.assert_array_equal(full.c, 0)
  assert np.abs(np.asarray(full.d)).max() <= 1 / np.sqrt(4)
  np.testing.assert_array_equal(adapter.apply(w, params, buffers), w)


@pytest.mark.parametrize(
  'kwargs,leaf_shape,message',
  [
    ({'factor': 0}, (4, 4), 'lokr: factor=0 must be -1 (near √dim) or > 0'),
    ({'factor': 2.0}, (4, 4), 'factor=2.0 must be an int'),
    ({'rank': 0}, (4, 4), 'rank=0 must be > 0'),
    ({'decompose_both': True}, (4, 4), 'decompose_both=True needs a rank'),
    ({'decompose_both': 1}, (4, 4), 'decompose_both=1 must be True or False'),
    ({'full_d': True}, (4, 4), 'full_d=True needs a rank'),
    (
      {'rank': 5},
      (D_IN, D_OUT),
      'rank=5 exceeds min(4, 4)=4 of the Kronecker factor d',
    ),
    (
      {'rank': 3, 'decompose_both': True},
      (D_IN, D_OUT),
      'rank=3 exceeds min(3, 2)=2 of the Kronecker factor c',
    ),
    ({'alpha': 'one'}, (4, 4), "alpha='one' must be a number"),
    ({}, (4, 4, 4), 'lokr expects a 2-D kernel'),
  ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, leaf_shape, message):
  pattern = message.replace('(', r'\(').replace(')', r'\)')
  with pytest.raises(pj.PeftError, match=pattern):
    lokr.lokr(**kwargs).init(jax.random.key(0), jnp.ones(leaf_shape))
