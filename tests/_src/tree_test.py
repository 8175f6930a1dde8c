"""by_rules lifting, merge/unmerge, count, regularisers, describe, mismatch errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax._src import tree as tree_lib
from peft_jax.methods.lora import LoraParams

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
  params, buffers = adapter.init(jax.random.key(1), frozen)
  out = adapter.apply(frozen, params, buffers)
  lora = params['layer_1']['kernel']
  np.testing.assert_allclose(
    out['layer_1']['kernel'],
    frozen['layer_1']['kernel'] + 2.0 * lora.a @ lora.b,
    rtol=1e-6,
  )
  np.testing.assert_array_equal(out['layer_0']['bias'], params['layer_0']['bias'])


def test_leaf_keys_do_not_depend_on_tree_order():
  frozen = mlp()
  reordered = {
    'layer_1': frozen['layer_1'],
    'layer_0': frozen['layer_0'],
    'extra': jnp.ones(2),
  }
  a, _ = pj.by_rules(RULES).init(jax.random.key(7), frozen)
  b, _ = pj.by_rules(RULES).init(jax.random.key(7), reordered)
  np.testing.assert_array_equal(a['layer_0']['kernel'].a, b['layer_0']['kernel'].a)


def test_merged_forward_equals_the_side_branch_computation_and_unmerge_restores():
  frozen = mlp()
  adapter = pj.by_rules([('.*/kernel', 'lora(rank=2, b_init="normal")')])
  params, buffers = adapter.init(jax.random.key(1), frozen)
  x = np.random.default_rng(0).normal(size=(4, 3))
  # Independent: the unmerged model, LoRA as a side branch x@W + s·(x@a)@b in f64.
  f64 = lambda t: np.asarray(t, np.float64)
  s = 16 / 2
  branch = lambda h, name: (
    h @ f64(frozen[name]['kernel'])
    + s * (h @ f64(params[name]['kernel'].a)) @ f64(params[name]['kernel'].b)
  )
  hidden = np.tanh(branch(x, 'layer_0') + f64(frozen['layer_0']['bias']))
  expected = branch(hidden, 'layer_1') + f64(frozen['layer_1']['bias'])
  merged = pj.merge(adapter, frozen, params, buffers)
  np.testing.assert_allclose(forward(merged, x), expected, rtol=1e-4, atol=1e-5)
  restored = pj.unmerge(adapter, merged, params, buffers)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), restored, frozen
  )
  with pytest.raises(pj.PeftError, match='is not invertible'):
    pj.unmerge(pj.by_rules(RULES), merged, params, buffers)


def test_merge_refuses_methods_without_a_weight_space_form():
  adapter = pj.by_rules([('.*/kernel', 'parallel_adapter(rank=2)')])
  params, buffers = adapter.init(jax.random.key(0), mlp())
  assert not adapter.mergeable
  with pytest.raises(
    pj.PeftError, match=r'not mergeable: parallel_adapter at 2 leaves \('
  ) as error:
    pj.merge(adapter, mlp(), params, buffers)
  assert 'stay as modules' in str(error.value) and '\n' not in str(error.value)
  with pytest.raises(pj.PeftError, match='has no weight-space form; run'):
    adapter.apply(mlp(), params, buffers)


def test_a_module_named_buffers_trains_like_any_other():
  # v1 hid everything under a 'buffers' key from the optimizer.
  frozen = {
    'buffers': {'kernel': jnp.ones((4, 3))},
    'dense': {'kernel': jnp.ones((4, 3))},
  }
  params, buffers = pj.by_rules([('.*/kernel', 'lora(rank=2)')]).init(
    jax.random.key(0), frozen
  )
  assert pj.count(params) == 2 * 2 * (4 + 3)
  assert buffers == {}


def test_params_and_buffers_are_apart_by_structure():
  frozen = {'k': {'kernel': jax.random.normal(jax.random.key(0), (6, 4))}}
  params, buffers = pj.by_rules([('.*', 'pissa(rank=2)')]).init(
    jax.random.key(1), frozen
  )
  assert set(tree_lib.entries(params)) == set(tree_lib.entries(buffers)) == {'k/kernel'}
  assert pj.count(params) == 2 * (6 + 4)
  grads = jax.grad(
    lambda p: jnp.sum(
      pj.by_rules([('.*', 'pissa(rank=2)')]).apply(frozen, p, buffers)['k']['kernel']
    )
  )(params)
  assert jax.tree.structure(grads) == jax.tree.structure(params)


def test_method_params_must_be_typed():
  untyped = pj.Adapter(init=lambda key, w: ({'a': w}, None), apply=lambda w, p, b: w)
  with pytest.raises(pj.PeftError, match='parameters must be typed'):
    pj.by_rules([('.*/kernel', untyped)]).init(jax.random.key(0), mlp())


def test_apply_to_a_tree_it_was_not_built_for_names_the_path_and_shapes():
  adapter = pj.by_rules(RULES)
  params, buffers = adapter.init(jax.random.key(0), mlp(width=5))
  with pytest.raises(pj.PeftError) as e:
    adapter.apply(mlp(width=6), params, buffers)
  assert "at 'layer_0/bias' the frozen tree needs (6,) float32" in str(e.value)
  missing = {'layer_0': params['layer_0']}
  with pytest.raises(pj.PeftError) as e:
    adapter.apply(mlp(), missing, buffers)
  assert "at 'layer_1/bias' the frozen tree needs (2,) float32" in str(e.value)
  assert 'have nothing' in str(e.value)


def test_per_leaf_errors_name_the_leaf():
  with pytest.raises(pj.PeftError, match=r'^layer_1/kernel: lora: rank=3 exceeds'):
    pj.by_rules([('.*/kernel', 'lora(rank=3)')]).init(jax.random.key(0), mlp())


@pytest.mark.parametrize('reduction', ['sum', 'mean'])
def test_regulariser_terms_are_summed_or_averaged_over_matrices(reduction):
  frozen = {
    'a': {'kernel': jnp.ones((4, 3))},
    'b': {'kernel': jnp.ones((3, 5))},
    'c': {'kernel': jnp.ones((2, 4, 3))},  # two stacked layers: two matrices
  }
  rules = [
    ('(a|b)/kernel', 'adalora(rank=2, reg_orth_coef=0.3)'),
    ('c/kernel', "stacked('adalora(rank=2, reg_orth_coef=0.3)')"),
  ]
  adapter = pj.by_rules(rules, regularizer=reduction)
  params, buffers = adapter.init(jax.random.key(0), frozen)

  def penalty(a, b):  # AdaLoRA's code: mean of the two unsquared norms.
    a, b = np.float64(a), np.float64(b)
    eye = np.eye(a.shape[-1])
    return (np.linalg.norm(a.T @ a - eye) + np.linalg.norm(b @ b.T - eye)) / 2

  terms = [0.3 * penalty(params[n]['kernel'].a, params[n]['kernel'].b) for n in 'ab']
  stacked = params['c']['kernel']
  terms += [0.3 * penalty(stacked.a[i], stacked.b[i]) for i in range(2)]
  expected = sum(terms) / (1 if reduction == 'sum' else len(terms))
  got = adapter.regularizer(frozen, params, buffers)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_unknown_regulariser_reduction_is_a_clear_error():
  with pytest.raises(pj.PeftError, match="regularizer='avg' is not 'sum' or 'mean'"):
    pj.by_rules(RULES, regularizer='avg')


def test_count_and_describe():
  frozen = mlp()
  params, _ = pj.by_rules(RULES).init(jax.random.key(0), frozen)
  assert pj.count(params) == 2 * (3 + 5) + 2 * (5 + 2) + 5 + 2
  lines = []
  pj.describe(RULES, frozen, print_fn=lines.append)
  table = lines[0].splitlines()
  assert table[0].split() == ['name', 'shape', 'method', 'trainable', 'changed', 'rank']
  row = next(r for r in table if r.startswith('layer_0/kernel'))
  # LoRA r=2 on (3, 5): 2·(3+5) trainable; a random θ changes all 15 entries
  # of w, at rank 2.
  assert row.split()[-3:] == ['16', '15', '2'] and 'lora(rank=2' in row
  bias_row = next(r for r in table if r.startswith('layer_1/bias'))
  assert bias_row.split()[-3:] == ['2', '2', '-']
  frozen_size = 3 * 5 + 5 + 5 * 2 + 2
  assert table[-1] == (
    f'trainable 37 of {frozen_size} frozen (115.625%); changed 32 (100.000%)'
  )


def test_apply_is_jittable_and_differentiable_in_params_only():
  frozen = mlp()
  adapter = pj.by_rules(RULES)
  params, buffers = adapter.init(jax.random.key(0), frozen)
  loss = lambda p, f: jnp.sum(
    forward(adapter.apply(f, p, buffers), jnp.ones((2, 3))) ** 2
  )
  grads = jax.jit(jax.grad(loss))(params, frozen)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert isinstance(grads['layer_0']['kernel'], LoraParams)
