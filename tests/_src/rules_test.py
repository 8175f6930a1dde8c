"""Rules: fullmatch, first match wins, predicates, strictness, clear errors."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import peft_jax as pj
from peft_jax._src import tree as tree_lib
from peft_jax.methods.lora import LoraParams


def tree():
  dense = lambda: {'kernel': jnp.ones((4, 3)), 'bias': jnp.zeros(3)}
  return {
    'encoder': {'query': dense(), 'value': dense(), 'ffn': dense()},
    'head': dense(),
  }


def adapted_names(rules, params, hooks=None):
  theta, _ = pj.by_rules(rules).init(jax.random.key(0), params, hooks)
  return set(tree_lib.entries(theta))


def test_fullmatch_not_search():
  names = adapted_names([('.*query/kernel', 'lora(rank=2)')], tree())
  assert names == {'encoder/query/kernel'}
  with pytest.raises(pj.PeftError, match='matches no leaf'):
    pj.by_rules([('query', 'lora(rank=2)')]).init(jax.random.key(0), tree())


def test_first_match_wins_and_none_freezes():
  rules = [
    ('encoder/ffn/kernel', None),
    ('encoder/.*/kernel', 'lora(rank=2)'),
    ('.*', 'full()'),
  ]
  params, buffers = pj.by_rules(rules).init(jax.random.key(0), tree())
  assert set(params['encoder']) == {'query', 'value', 'ffn'}
  assert 'kernel' not in params['encoder']['ffn']  # frozen by rule 0
  assert isinstance(params['encoder']['query']['kernel'], LoraParams)
  assert params['encoder']['query']['bias'].shape == (3,)  # full, rule 2
  assert params['head']['kernel'].shape == (4, 3)
  assert buffers == {}


def test_predicate_rules():
  big = lambda name, leaf: leaf.ndim == 2 and name.startswith('encoder/')
  names = adapted_names([(big, 'ssb()')], tree())
  assert names == {'encoder/query/kernel', 'encoder/value/kernel', 'encoder/ffn/kernel'}


def test_unused_rule_names_the_rule_and_the_closest_leaves():
  with pytest.raises(pj.PeftError) as e:
    pj.by_rules([('encoder/qeury/kernel', 'lora(rank=2)')]).init(
      jax.random.key(0), tree()
    )
  message = str(e.value)
  assert (
    f"rule 0 ('encoder/qeury/kernel', {pj.lora(rank=2).name!r}) matches no leaf"
    in (message)
  )
  assert 'encoder/query/kernel' in message


def test_shadowed_rule_is_reported():
  rules = [('.*/kernel', 'ia3()'), ('head/kernel', 'lora(rank=2)')]
  with pytest.raises(pj.PeftError, match=r"rule 1 .* is shadowed.*'head/kernel'"):
    pj.by_rules(rules).init(jax.random.key(0), tree())


def test_non_strict_allows_unused_rules():
  rules = [('.*/kernel', 'ia3()'), ('nothing', 'lora(rank=2)')]
  params, _ = pj.by_rules(rules, strict=False).init(jax.random.key(0), tree())
  assert pj.count(params) == 4 * 3


def test_activation_rules_match_hook_points_and_weight_rules_leaves():
  hooks = {
    'encoder/ffn_output': pj.HookPoint(jax.ShapeDtypeStruct((2, 5, 3), jnp.float32)),
  }
  rules = [('encoder/.*', 'houlsby(reduction_factor=3)'), ('.*/kernel', 'ia3()')]
  # The first rule is an activation method: it takes the hook point only.
  names = adapted_names(rules, tree(), hooks)
  assert names == {
    'encoder/ffn_output',
    'encoder/query/kernel',
    'encoder/value/kernel',
    'encoder/ffn/kernel',
    'head/kernel',
  }


def test_activation_rule_without_hook_points_says_how_to_get_them():
  rules = [('.*ffn_output', 'houlsby()')]
  with pytest.raises(pj.PeftError, match='no hook points were given; pass hooks='):
    pj.by_rules(rules).init(jax.random.key(0), tree())


def test_a_method_on_the_wrong_kind_of_name_is_named():
  hooks = {
    'encoder/ffn_output': pj.HookPoint(jax.ShapeDtypeStruct((2, 3), jnp.float32))
  }
  with pytest.raises(pj.PeftError, match='is a weight-space method'):
    pj.by_rules([('encoder/ffn_output', 'lora(rank=2)')]).init(
      jax.random.key(0), tree(), hooks
    )
  with pytest.raises(pj.PeftError, match='is an activation method'):
    pj.by_rules([('head/kernel', 'houlsby()')]).init(jax.random.key(0), tree(), hooks)


@pytest.mark.parametrize(
  'rules,message',
  [
    ([('/encoder/.*', 'ia3()')], 'starts with "/"'),
    ([('enc[oder', 'ia3()')], 'is not a regex'),
    ([('.*', 'nope()')], "rule 0 \\('.\\*'\\): unknown method 'nope'"),
    ([('.*',)], 'is not a \\(pattern, spec\\) pair'),
    ([(3, 'ia3()')], 'must be a regex string or a predicate'),
    ('.*', 'rules must be a list'),
  ],
)
def test_malformed_rules_are_clear_errors(rules, message):
  with pytest.raises(pj.PeftError, match=message):
    pj.by_rules(rules)


def test_nnx_state_names_and_round_trip():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(4, 3, rngs=rngs) for _ in range(2)])
      self.norm = nnx.LayerNorm(3, rngs=rngs)

    def __call__(self, x):
      return self.norm(self.layers[1](self.layers[0](x) @ jnp.ones((3, 4))))

  model = Model(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  adapter = pj.by_rules([('layers/.*/kernel', 'lora(rank=2, b_init="normal")')])
  params, buffers = adapter.init(jax.random.key(1), state)
  assert set(tree_lib.entries(params)) == {'layers/0/kernel', 'layers/1/kernel'}
  new_state = adapter.apply(state, params, buffers)
  merged = nnx.merge(graphdef, new_state)
  kernel = merged.layers[0].kernel.get_value()
  lora = params['layers']['0']['kernel']
  expected = state['layers'][0]['kernel'].get_value() + (16 / 2) * (lora.a @ lora.b)
  assert jnp.allclose(kernel, expected)
  x = jnp.ones((2, 4))
  assert merged(x).shape == (2, 3)
