"""VeRA against its formula (PyTorch layout) and its shared, regenerated projections."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax.methods.vera import VeraParams, VeraProjections, projections, vera
from tests.methods.spec_checks import assert_factored_and_inverse

D_IN, D_OUT = 9, 6


@pytest.mark.parametrize('rank', [2, 16])  # r may exceed min(d_in, d_out).
def test_apply_and_factored_are_w_plus_lambda_b_b_lambda_d_a(rank):
  rng = np.random.default_rng(0)
  w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
  params = VeraParams(
    lambda_d=rng.normal(size=rank).astype(np.float32),
    lambda_b=rng.normal(size=D_OUT).astype(np.float32),
  )
  a, b = projections(0, rank, D_IN, D_OUT)
  # Spec (HF PEFT): ΔW = diag(λ_b) B diag(λ_d) A, A = aᵀ: (r, d_in), B = bᵀ.
  W, A, B = (np.float64(m).T for m in (w, a, b))
  L_d, L_b = (np.diag(np.float64(v)) for v in (params.lambda_d, params.lambda_b))
  expected = W + L_b @ B @ L_d @ A
  adapter = vera(rank)
  np.testing.assert_allclose(
    adapter.apply(w, params, None).T, expected, rtol=1e-5, atol=1e-5
  )
  x = rng.normal(size=(2, 3, D_IN))
  assert_factored_and_inverse(adapter, w, params, expected, x)


def test_projections_are_hf_kaiming_uniform():
  d_in, d_out, rank = 1024, 512, 64
  a, b = (np.float64(m) for m in projections(0, rank, d_in, d_out))
  assert a.shape == (d_in, rank) and b.shape == (rank, d_out)
  # HF PEFT _kaiming_init: U(±√(6/fan_in)), fan_in = d_in for A, r for B.
  for m, fan_in in ((a, d_in), (b, rank)):
    bound = np.sqrt(6 / fan_in)
    assert np.all(np.abs(m) <= bound) and np.abs(m).max() > 0.95 * bound
    np.testing.assert_allclose(m.var(), bound**2 / 3, rtol=0.05)


def test_projections_are_deterministic_and_shared_by_equal_widths():
  a, b = projections(3, 4, D_IN, D_OUT)
  a2, b2 = jax.jit(projections, static_argnums=(0, 1, 2, 3))(3, 4, D_IN, D_OUT)
  np.testing.assert_array_equal(a, a2)
  np.testing.assert_array_equal(b, b2)
  # a depends on d_in only, b on d_out only; a new seed gives new matrices.
  np.testing.assert_array_equal(projections(3, 4, D_IN, 11)[0], a)
  np.testing.assert_array_equal(projections(3, 4, 13, D_OUT)[1], b)
  assert not np.allclose(projections(4, 4, D_IN, D_OUT)[0], a)


def test_equal_shaped_leaves_share_matrices_and_nothing_is_stored():
  frozen = {'q': jnp.zeros((D_IN, D_OUT)), 'v': jnp.zeros((D_IN, D_OUT))}
  tree = pj.by_rules([('q|v', 'vera(rank=4, seed=7)')])
  params, buffers = tree.init(jax.random.key(0), frozen)
  assert buffers == {}
  assert all(isinstance(p, VeraParams) for p in params.values())
  assert pj.count(params) == 2 * (4 + D_OUT)
  params = jax.tree.map(jnp.ones_like, params)
  merged = jax.jit(functools.partial(pj.merge, tree))(frozen, params, buffers)
  np.testing.assert_array_equal(merged['q'], merged['v'])
  np.testing.assert_array_equal(merged['q'], pj.merge(tree, frozen, params)['q'])
  a, b = projections(7, 4, D_IN, D_OUT)
  np.testing.assert_allclose(merged['q'], a @ b, rtol=1e-6)


def test_init_is_d_init_and_zero_lambda_b_so_identity():
  w = jax.random.normal(jax.random.key(1), (D_IN, D_OUT))
  adapter = vera(8, d_init=0.25)
  params, buffers = adapter.init(jax.random.key(0), w)
  assert buffers is None  # the projections are regenerated, not stored
  np.testing.assert_array_equal(params.lambda_d, np.full(8, 0.25, np.float32))
  np.testing.assert_array_equal(params.lambda_b, np.zeros(D_OUT))
  np.testing.assert_array_equal(adapter.apply(w, params, buffers), w)


def test_trainable_count_is_r_plus_dout():
  adapter = vera()
  params, _ = jax.eval_shape(adapter.init, jax.random.key(0), jnp.zeros((768, 3072)))
  assert pj.count(params) == adapter.num_params((768, 3072)) == 256 + 3072


@pytest.mark.parametrize(
  'kwargs,leaf_shape,message',
  [
    ({'rank': 0}, (4, 4), 'rank=0 must be > 0'),
    ({'d_init': 'x'}, (4, 4), "d_init='x' must be a number"),
    ({'seed': -1}, (4, 4), 'seed=-1 must be an int >= 0'),
    ({'seed': 1.5}, (4, 4), 'seed=1.5 must be an int >= 0'),
    ({'seed': True}, (4, 4), 'seed=True must be an int >= 0'),
    ({'param_dtype': 'int8'}, (4, 4), 'not a floating dtype'),
    ({}, (4,), 'expects a 2-D kernel'),
  ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, leaf_shape, message):
  with pytest.raises(pj.PeftError, match=f'vera.*{message}'):
    vera(**kwargs).init(jax.random.key(0), jnp.ones(leaf_shape))


def test_stored_projections_are_sliced_from_one_pair():
  """``shared_shape=(n_in, n_out)``: buffers ``a: (n_in, r)``, ``b: (r, n_out)``
  (HF's ``vera_Aᵀ``, ``vera_Bᵀ``) and ``ΔW = Λ_b B[:d_out] Λ_d A[:, :d_in]``."""
  rank, n_in, n_out = 3, 12, 10
  rng = np.random.default_rng(1)
  w = rng.normal(size=(D_IN, D_OUT))
  adapter = vera(rank, seed=2, shared_shape=(n_in, n_out), param_dtype='float64')
  vera_a, vera_b = rng.normal(size=(rank, n_in)), rng.normal(size=(n_out, rank))
  lambda_d, lambda_b = rng.normal(size=rank), rng.normal(size=D_OUT)
  with jax.enable_x64():
    _, stored = adapter.init(jax.random.key(0), jnp.zeros((D_IN, D_OUT)))
    np.testing.assert_array_equal(stored.b, projections(2, rank, n_in, n_out)[1])
    params = VeraParams(jnp.asarray(lambda_d), jnp.asarray(lambda_b))
    buffers = VeraProjections(jnp.asarray(vera_a.T), jnp.asarray(vera_b.T))
    merged = np.asarray(adapter.apply(jnp.asarray(w), params, buffers))
    x = rng.normal(size=(2, D_IN))
    factored = adapter.linear.factored(jnp.asarray(x), jnp.asarray(w), params, buffers)
  A, B = vera_a[:, :D_IN], vera_b[:D_OUT]
  expected = w.T + np.diag(lambda_b) @ B @ np.diag(lambda_d) @ A
  np.testing.assert_allclose(merged.T, expected, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(factored, x @ expected.T, rtol=1e-12, atol=1e-12)


def test_stored_projections_must_fit_the_kernel():
  with pytest.raises(pj.PeftError, match=r'vera: a \(9, 6\) kernel does not fit'):
    vera(2, shared_shape=(8, 6)).init(jax.random.key(0), jnp.ones((D_IN, D_OUT)))
  with pytest.raises(pj.PeftError, match='shared_shape=5 must be'):
    vera(2, shared_shape=5)
