"""by_rules lifting, merge/unmerge, count, describe, and mismatch errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj

RULES = [
  ('.*/kernel', 'lora(rank=2, alpha=4, b_init="normal")'),
  (pj.is_bias, 'bitfit()'),
]


def mlp(seed=0, width=5):
  keys = jax.random.split(jax.random.key(seed), 2)
  return {
    'layer_0': {
      'kernel': jax.random.normal(keys[0], (3, width)),
      'bias': jnp.zeros(width),
    },
    'layer_1': {'kernel': jax.random.normal(keys[1], (width, 2)), 'bias': jnp.zeros(2)},
  }


def forward(params, x):
  h = jnp.tanh(x @ params['layer_0']['kernel'] + params['layer_0']['bias'])
  return h @ params['layer_1']['kernel'] + params['layer_1']['bias']


def test_apply_perturbs_only_chosen_leaves_with_their_method():
  frozen = mlp()
  adapter = pj.by_rules(RULES)
  theta = adapter.init(jax.random.key(1), frozen)
  out = adapter.apply(frozen, theta)
  lora = theta['layer_1']['kernel']
  np.testing.assert_allclose(
    out['layer_1']['kernel'],
    frozen['layer_1']['kernel'] + 2.0 * lora['a'] @ lora['b'],
    rtol=1e-6,
  )
  np.testing.assert_array_equal(out['layer_0']['bias'], theta['layer_0']['bias'])


def test_leaf_keys_do_not_depend_on_tree_order():
  frozen = mlp()
  reordered = {
    'layer_1': frozen['layer_1'],
    'layer_0': frozen['layer_0'],
    'extra': jnp.ones(2),
  }
  a = pj.by_rules(RULES).init(jax.random.key(7), frozen)
  b = pj.by_rules(RULES).init(jax.random.key(7), reordered)
  np.testing.assert_array_equal(
    a['layer_0']['kernel']['a'], b['layer_0']['kernel']['a']
  )


def test_merge_equals_unmerged_forward_and_unmerge_needs_invertible_methods():
  frozen = mlp()
  adapter = pj.by_rules([('.*/kernel', 'lora(rank=2, b_init="normal")')])
  theta = adapter.init(jax.random.key(1), frozen)
  x = jnp.ones((4, 3))
  merged = pj.merge(adapter, frozen, theta)
  np.testing.assert_allclose(
    forward(merged, x), forward(adapter.apply(frozen, theta), x)
  )
  restored = pj.unmerge(adapter, merged, theta)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), restored, frozen
  )
  with pytest.raises(pj.PeftError, match='is not invertible'):
    pj.unmerge(pj.by_rules(RULES), merged, theta)


def test_apply_to_a_tree_it_was_not_built_for_names_the_path_and_shapes():
  adapter = pj.by_rules(RULES)
  theta = adapter.init(jax.random.key(0), mlp(width=5))
  with pytest.raises(pj.PeftError) as e:
    adapter.apply(mlp(width=6), theta)
  assert (
    "at 'layer_0/bias' the frozen tree needs (6,), the adapter parameters have (5,)"
    in str(e.value)
  )
  missing = {'layer_0': theta['layer_0']}
  with pytest.raises(pj.PeftError) as e:
    adapter.apply(mlp(), missing)
  assert (
    "at 'layer_1/bias' the frozen tree needs (2,), the adapter parameters "
    'have nothing' in str(e.value)
  )


def test_per_leaf_errors_name_the_leaf():
  with pytest.raises(pj.PeftError, match=r'^layer_1/kernel: lora: rank=3 exceeds'):
    pj.by_rules([('.*/kernel', 'lora(rank=3)')]).init(jax.random.key(0), mlp())


def test_count_and_describe():
  frozen = mlp()
  theta = pj.by_rules(RULES).init(jax.random.key(0), frozen)
  assert pj.count(theta) == 2 * (3 + 5) + 2 * (5 + 2) + 5 + 2
  lines = []
  pj.describe(RULES, frozen, print_fn=lines.append)
  table = lines[0].splitlines()
  assert table[0].split() == ['name', 'shape', 'method', 'trainable']
  row = next(r for r in table if r.startswith('layer_0/kernel'))
  assert row.split()[-1] == '16' and 'lora(rank=2' in row
  assert table[-1] == f'trainable 37 of {3 * 5 + 5 + 5 * 2 + 2} (115.625%)'


def test_apply_is_jittable_and_differentiable_in_theta_only():
  frozen = mlp()
  adapter = pj.by_rules(RULES)
  theta = adapter.init(jax.random.key(0), frozen)
  loss = lambda t, f: jnp.sum(forward(adapter.apply(f, t), jnp.ones((2, 3))) ** 2)
  grads = jax.jit(jax.grad(loss))(theta, frozen)
  assert jax.tree.structure(grads) == jax.tree.structure(theta)
