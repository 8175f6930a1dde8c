"""Wrappers compose in any order: every ordered pair of stacked, matrix_view, mpc.

Each pair is checked both ways round on lora and adalora: the same parameters
from the same key, the same merged weight, factored form and regulariser, and
both equal an independent computation from the plain method slice by slice.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from tests import references

METHODS = ['lora(rank=2, b_init="normal")', 'adalora(rank=2)']
MPC = dict(kind='d', gamma=0.3, form='mean')


def wrap(kind, method):
  if kind == 'stacked':
    return pj.stacked(method)
  if kind == 'matrix_view':
    return pj.matrix_view(method, n_in=1)
  return pj.mpc(method, **MPC)


# Kernel shapes: stacked layers first, then the matrix view's axes.
SHAPES = {
  frozenset({'stacked', 'mpc'}): (3, 6, 4),
  frozenset({'matrix_view', 'mpc'}): (6, 2, 3),
  frozenset({'stacked', 'matrix_view'}): (3, 6, 2, 3),
}
PAIRS = [
  (outer, inner)
  for outer in ('stacked', 'matrix_view', 'mpc')
  for inner in ('stacked', 'matrix_view', 'mpc')
  if outer != inner
]


def reference(method, kinds, w, params, buffers):
  """``(w', x ↦ x @ w', penalty terms)`` from the plain method, slice by slice."""
  base = pj.get(method)
  stacked = 'stacked' in kinds
  slices = range(w.shape[0]) if stacked else [None]
  take = lambda tree, i: tree if i is None else jax.tree.map(lambda t: t[i], tree)
  merged, terms = [], []
  for i in slices:
    w_i = w if i is None else w[i]
    matrix = w_i.reshape(w_i.shape[0], -1)
    p_i, b_i = take(params, i), take(buffers, i)
    merged.append(base.apply(matrix, p_i, b_i).reshape(w_i.shape))
    term = 0.0
    if 'mpc' in kinds:
      a, b = (np.float64(t) for t in base.factors(p_i, b_i))
      gram_b = b @ b.T
      norms = [
        np.linalg.norm(a.T @ a - np.eye(a.shape[1])),
        np.linalg.norm(gram_b - np.diag(np.diag(gram_b))),
      ]
      term += 0.3 * np.mean(norms)
    if base.regularizer is not None:
      term += float(base.regularizer(matrix, p_i, b_i))
    terms.append(term)
  merged = np.stack(merged) if stacked else merged[0]
  return merged, np.array(terms if stacked else terms[0])


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('outer,inner', PAIRS)
def test_both_orders_are_the_same_adapter_and_equal_the_plain_method(
  outer, inner, method
):
  shape = SHAPES[frozenset({outer, inner})]
  one = wrap(outer, wrap(inner, method))
  other = wrap(inner, wrap(outer, method))
  w = jax.random.normal(jax.random.key(0), shape)
  params, buffers = one.init(jax.random.key(1), w)
  params_other, buffers_other = other.init(jax.random.key(1), w)
  jax.tree.map(np.testing.assert_array_equal, params, params_other)
  jax.tree.map(np.testing.assert_array_equal, buffers, buffers_other)
  params = references.perturb(params, 2)

  merged, terms = reference(method, {outer, inner}, w, params, buffers)
  for adapter in (one, other):
    np.testing.assert_allclose(
      adapter.apply(w, params, buffers), merged, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
      adapter.unapply(adapter.apply(w, params, buffers), params, buffers),
      w,
      rtol=1e-4,
      atol=1e-5,
    )
    if adapter.regularizer is None:
      assert 'mpc' not in (outer, inner) and pj.get(method).regularizer is None
    else:
      np.testing.assert_allclose(
        adapter.regularizer(w, params, buffers), terms, rtol=1e-5, atol=1e-6
      )
    assert adapter.num_params(shape) == pj.count(params)
    assert adapter.factors is not None
  # The factored form (per layer, for stacked kernels) equals x @ w'.
  stacked = 'stacked' in (outer, inner)
  for adapter in (one, other):
    layer = adapter.linear.per_layer if stacked else adapter
    w_0 = w[0] if stacked else w
    p_0 = jax.tree.map(lambda t: t[0], params) if stacked else params
    b_0 = jax.tree.map(lambda t: t[0], buffers) if stacked else buffers
    x = jax.random.normal(jax.random.key(3), (5, w_0.shape[0]))
    expected = np.tensordot(x, merged[0] if stacked else merged, axes=1)
    np.testing.assert_allclose(
      layer.linear.factored(x, w_0, p_0, b_0), expected, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize('method', METHODS)
def test_names_round_trip_whatever_the_nesting(method):
  for outer, inner in PAIRS:
    adapter = wrap(outer, wrap(inner, method))
    assert pj.get(adapter.name).name == adapter.name


class Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    q = nn.DenseGeneral((2, 3), name='query')(h)  # kernel (L, 4, 2, 3) stacked
    return h + nn.DenseGeneral(4, axis=(-2, -1), name='out')(jnp.tanh(q)), None


class Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    layers = nn.scan(
      nn.remat(Block),
      variable_axes={'params': 0},
      split_rngs={'params': True},
      length=3,
    )
    return layers(name='layers')(x, None)[0]


@pytest.mark.parametrize('method', METHODS)
def test_wrapped_kernels_under_nn_scan_stay_factored(method):
  model = Scanned()
  x = jax.random.normal(jax.random.key(0), (5, 4))
  frozen = model.init(jax.random.key(1), x)['params']
  rules = [
    ('layers/query/kernel', pj.mpc(pj.matrix_view(pj.stacked(method), n_in=1))),
    ('layers/out/kernel', pj.stacked(pj.matrix_view(pj.mpc(method), n_in=2))),
  ]
  tree = pj.by_rules(rules)
  params, buffers = tree.init(jax.random.key(2), frozen)
  params = references.perturb(params, 4)
  fn = lambda w, x: model.apply({'params': w}, x)
  weight_space = pj.adapted(tree, fn)(frozen, params, buffers, x)
  with warnings.catch_warnings():
    warnings.simplefilter('error', pj.FactoredFallbackWarning)
    fast = jax.jit(pj.adapted(tree, fn, factored=True))(frozen, params, buffers, x)
  np.testing.assert_allclose(fast, weight_space, rtol=1e-5, atol=1e-5)
  assert tree.regularizer(frozen, params, buffers).shape == ()
