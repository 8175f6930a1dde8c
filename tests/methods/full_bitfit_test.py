"""Full fine-tuning and BitFit: the leaf itself becomes the trainable parameter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax._src import paths


def bert_like_tree():
  dense = lambda i, o: {'kernel': jnp.ones((i, o)), 'bias': jnp.zeros(o)}
  norm = {'scale': jnp.ones(4), 'bias': jnp.zeros(4)}
  return {
    'embeddings': {
      'word_embeddings': {'embedding': jnp.ones((10, 4))},
      'layer_norm': norm,
    },
    'layer_0': {
      'attention': {n: dense(4, 4) for n in ('query', 'key', 'value', 'output')},
      'intermediate': dense(4, 8),
      'output': dense(8, 4),
      'output_layer_norm': norm,
    },
  }


def test_bitfit_selects_every_bias_including_layer_norm():
  frozen = bert_like_tree()
  tree = pj.by_rules([(pj.is_bias, 'bitfit()')])
  params, buffers = tree.init(jax.random.key(0), frozen)
  names = sorted(paths.flatten(params))
  assert names == sorted(
    [
      'embeddings/layer_norm/bias',
      'layer_0/attention/query/bias',
      'layer_0/attention/key/bias',
      'layer_0/attention/value/bias',
      'layer_0/attention/output/bias',
      'layer_0/intermediate/bias',
      'layer_0/output/bias',
      'layer_0/output_layer_norm/bias',
    ]
  )
  assert buffers == {}
  assert pj.count(params) == 4 * 7 + 8


def test_bitfit_merge_replaces_only_the_biases():
  frozen = bert_like_tree()
  tree = pj.by_rules([(pj.is_bias, 'bitfit()')])
  params, buffers = tree.init(jax.random.key(0), frozen)
  rng = np.random.default_rng(0)
  trained = jax.tree.map(lambda b: jnp.float32(rng.normal(size=b.shape)), params)
  merged = paths.flatten(pj.merge(tree, frozen, trained, buffers))
  new = paths.flatten(trained)
  for name, leaf in paths.flatten(frozen).items():
    np.testing.assert_array_equal(merged[name], np.asarray(new.get(name, leaf)))


def test_bitfit_apply_replaces_the_bias_and_rejects_matrices():
  b = jnp.arange(3.0)
  adapter = pj.bitfit()
  params, buffers = adapter.init(jax.random.key(0), b)
  assert buffers is None
  np.testing.assert_array_equal(params, b)
  np.testing.assert_array_equal(adapter.apply(b, params + 1.5, buffers), b + 1.5)
  with pytest.raises(pj.PeftError, match=r'bitfit expects a 1-D leaf \(a bias\)'):
    adapter.init(jax.random.key(0), jnp.ones((2, 2)))


def test_full_trains_a_float32_copy_not_the_frozen_buffer():
  w = jnp.ones((3, 2), jnp.bfloat16)
  adapter = pj.full()
  params, buffers = adapter.init(jax.random.key(0), w)
  assert buffers is None
  assert params.dtype == jnp.float32 and params.shape == w.shape
  assert params.unsafe_buffer_pointer() != w.unsafe_buffer_pointer()
  new = params - 0.5
  out = adapter.apply(w, new, buffers)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.float32(out), np.float32(new))
  assert adapter.unapply is None


def test_full_factored_is_x_at_theta():
  rng = np.random.default_rng(1)
  w, theta, x = (jnp.float32(rng.normal(size=s)) for s in ((4, 3), (4, 3), (5, 4)))
  y = pj.full().linear.factored(x, w, theta, None)
  np.testing.assert_allclose(y, np.float64(x) @ np.float64(theta), rtol=1e-5, atol=1e-5)
