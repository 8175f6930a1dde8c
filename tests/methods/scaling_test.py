"""(IA)³, SSL and SSB against the spec's formulas on a Dense layer with bias.

The spec (PyTorch layout, h = W x + b):
  (IA)³  h = l ⊙ (W x) + b                (l: d_out; the bias is not scaled)
  SSL    h = W (l ⊙ x) + b                (l: d_in)
  SSB    h = l_o ⊙ (W (l_i ⊙ x)) + b      (l_o: d_out, l_i: d_in)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj

D_IN, D_OUT = 7, 5


def reference(method, x, W, b, l_in, l_out):
  """The spec's forward pass, float64, column convention."""
  if method == 'ia3':
    return (l_out * (W @ x.T).T) + b
  if method == 'ssl':
    return (W @ (l_in * x).T).T + b
  return l_out * (W @ (l_in * x).T).T + b


@pytest.mark.parametrize('method', ['ia3', 'ssl', 'ssb'])
def test_dense_layer_matches_spec(method):
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(D_IN, D_OUT))
  bias = rng.normal(size=D_OUT)
  l_in, l_out = rng.normal(size=D_IN), rng.normal(size=D_OUT)
  x = rng.normal(size=(3, D_IN))
  frozen = {'dense': {'kernel': jnp.float32(kernel), 'bias': jnp.float32(bias)}}
  tree = pj.by_rules([('dense/kernel', f'{method}()')])
  params, buffers = tree.init(jax.random.key(0), frozen)
  scales = params['dense']['kernel']
  given = {'l_in': l_in, 'l_out': l_out}
  params['dense']['kernel'] = scales._replace(
    **{k: jnp.float32(given[k]) for k in scales._fields}
  )
  expected = reference(method, x, kernel.T, bias, l_in, l_out)
  weights = pj.merge(tree, frozen, params, buffers)
  h = x @ np.float64(weights['dense']['kernel']) + np.float64(weights['dense']['bias'])
  np.testing.assert_allclose(h, expected, rtol=1e-5, atol=1e-5)
  dense = lambda weights, x: x @ weights['dense']['kernel'] + weights['dense']['bias']
  h = pj.adapted(tree, dense, factored=True)(frozen, params, buffers, jnp.float32(x))
  np.testing.assert_allclose(h, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  'method,names,per_layer',
  [
    ('ia3', ['l_out'], 768 + 768 + 3072),
    ('ssl', ['l_in'], 768 * 3),
    ('ssb', ['l_in', 'l_out'], 768 * 3 + 768 + 768 + 3072),
  ],
)
def test_roberta_base_budgets_on_key_value_ffn1(method, names, per_layer):
  """The paper's budgets (RoBERTa-base: SSL 27.6k, (IA)³ 55.3k, SSB their sum)."""
  layer = {
    'query': {'kernel': jax.ShapeDtypeStruct((768, 768), jnp.float32)},
    'key': {'kernel': jax.ShapeDtypeStruct((768, 768), jnp.float32)},
    'value': {'kernel': jax.ShapeDtypeStruct((768, 768), jnp.float32)},
    'intermediate': {'kernel': jax.ShapeDtypeStruct((768, 3072), jnp.float32)},
    'output': {'kernel': jax.ShapeDtypeStruct((3072, 768), jnp.float32)},
  }
  frozen = {f'layer_{i}': layer for i in range(12)}
  tree = pj.by_rules([('.*/(key|value|intermediate)/kernel', f'{method}()')])
  params, buffers = jax.eval_shape(tree.init, jax.random.key(0), frozen)
  assert pj.count(params) == 12 * per_layer
  assert sorted(params['layer_0']['key']['kernel']._fields) == names
  assert buffers == {}


@pytest.mark.parametrize('method', ['ia3', 'ssl', 'ssb'])
def test_scales_start_at_one(method):
  params, buffers = pj.get(method).init(jax.random.key(0), jnp.ones((D_IN, D_OUT)))
  assert buffers is None
  for leaf in jax.tree.leaves(params):
    np.testing.assert_array_equal(leaf, 1)


@pytest.mark.parametrize('method', ['ia3', 'ssl', 'ssb'])
def test_non_matrix_leaf_is_a_clear_error(method):
  with pytest.raises(pj.PeftError, match=rf'{method} expects a 2-D kernel'):
    pj.get(method).init(jax.random.key(0), jnp.ones((3,)))
