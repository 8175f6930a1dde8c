"""ChildPruning's layer: ``w' = w + Δ`` with a dense ``Δ`` (NumPy float64 checks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax.methods.child_pruning import (
  ChildPruningBuffers,
  ChildPruningParams,
  child_pruning,
)


def test_apply_factored_and_unapply_are_w_plus_delta():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(7, 5)).astype(np.float32)
  delta = rng.normal(size=(7, 5)).astype(np.float32)
  adapter = child_pruning(p=0.2)
  _, buffers = adapter.init(jax.random.key(0), w)
  params = ChildPruningParams(delta=jnp.asarray(delta))
  expected = np.float64(w) + np.float64(delta)
  np.testing.assert_allclose(adapter.apply(w, params, buffers), expected, rtol=1e-6)
  x = rng.normal(size=(3, 7))
  np.testing.assert_allclose(
    adapter.linear.factored(np.float32(x), w, params, buffers),
    x @ expected,
    rtol=1e-5,
    atol=1e-5,
  )
  np.testing.assert_allclose(
    adapter.unapply(adapter.apply(w, params, buffers), params, buffers), w, atol=1e-6
  )


@pytest.mark.parametrize('shape,p', [((7, 5), 0.2), ((64, 48), 0.005), ((10,), 1.0)])
def test_init_is_identity_typed_and_counts_the_budget(shape, p):
  w = jax.random.normal(jax.random.key(1), shape)
  adapter = child_pruning(p=p)
  params, buffers = adapter.init(jax.random.key(0), w)
  assert isinstance(params, ChildPruningParams)
  assert isinstance(buffers, ChildPruningBuffers)
  np.testing.assert_array_equal(params.delta, 0)
  assert buffers.k.dtype == jnp.int32
  assert int(buffers.k) == int(np.floor(p * np.prod(shape)))
  np.testing.assert_array_equal(adapter.apply(w, params, buffers), w)
  assert pj.count(params) == adapter.num_params(shape) == np.prod(shape)


@pytest.mark.parametrize(
  'kwargs,message',
  [
    ({'p': 0}, r'p=0.0 must be in \(0, 1\]'),
    ({'p': 1.01}, r'p=1.01 must be in \(0, 1\]'),
    ({'p': -0.5}, r'p=-0.5 must be in \(0, 1\]'),
    ({'p': True}, 'p=True must be a number'),
    ({'param_dtype': 'int32'}, 'not a floating dtype'),
  ],
)
def test_bad_hyperparameters_are_one_line_errors(kwargs, message):
  with pytest.raises(pj.PeftError, match=message) as error:
    child_pruning(**kwargs)
  assert '\n' not in str(error.value)
