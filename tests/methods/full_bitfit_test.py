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
  theta = pj.by_rules([(pj.is_bias, 'bitfit()')]).init(jax.random.key(0), frozen)
  names = sorted(paths.flatten(theta))
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
  assert pj.count(theta) == 4 * 7 + 8


def test_bitfit_apply_replaces_the_bias_and_rejects_matrices():
  b = jnp.arange(3.0)
  adapter = pj.bitfit()
  theta = adapter.init(jax.random.key(0), b)
  np.testing.assert_array_equal(adapter.apply(b, theta + 1.5), b + 1.5)
  with pytest.raises(pj.PeftError, match=r'bitfit expects a 1-D leaf \(a bias\)'):
    adapter.init(jax.random.key(0), jnp.ones((2, 2)))


def test_full_trains_a_float32_copy_not_the_frozen_buffer():
  w = jnp.ones((3, 2), jnp.bfloat16)
  adapter = pj.full()
  theta = adapter.init(jax.random.key(0), w)
  assert theta.dtype == jnp.float32 and theta.shape == w.shape
  assert theta.unsafe_buffer_pointer() != w.unsafe_buffer_pointer()
  new = theta - 0.5
  out = adapter.apply(w, new)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.float32(out), np.float32(new))
  assert adapter.unapply is None
