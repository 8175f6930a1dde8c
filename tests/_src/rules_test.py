"""Rules: fullmatch, first match wins, predicates, strictness, clear errors."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import peft_jax as pj
from peft_jax._src import paths


def tree():
  dense = lambda: {'kernel': jnp.ones((4, 3)), 'bias': jnp.zeros(3)}
  return {
    'encoder': {'query': dense(), 'value': dense(), 'ffn': dense()},
    'head': dense(),
  }


def adapted_names(rules, params):
  theta = pj.by_rules(rules).init(jax.random.key(0), params)
  leaf_names = set(paths.flatten(params))
  return {n if n in leaf_names else n.rsplit('/', 1)[0] for n in paths.flatten(theta)}


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
  theta = pj.by_rules(rules).init(jax.random.key(0), tree())
  assert set(theta['encoder']) == {'query', 'value', 'ffn'}
  assert 'kernel' not in theta['encoder']['ffn']  # frozen by rule 0
  assert set(theta['encoder']['query']['kernel']) == {'a', 'b'}
  assert theta['encoder']['query']['bias'].shape == (3,)  # full, rule 2
  assert theta['head']['kernel'].shape == (4, 3)


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
  assert "rule 0 ('encoder/qeury/kernel', 'lora(rank=2)') matches no leaf" in message
  assert 'encoder/query/kernel' in message


def test_shadowed_rule_is_reported():
  rules = [('.*/kernel', 'ia3()'), ('head/kernel', 'lora(rank=2)')]
  with pytest.raises(pj.PeftError, match=r"rule 1 .* is shadowed.*'head/kernel'"):
    pj.by_rules(rules).init(jax.random.key(0), tree())


def test_non_strict_allows_unused_rules():
  rules = [('.*/kernel', 'ia3()'), ('nothing', 'lora(rank=2)')]
  theta = pj.by_rules(rules, strict=False).init(jax.random.key(0), tree())
  assert pj.count(theta) == 4 * 3


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
  theta = adapter.init(jax.random.key(1), state)
  assert set(paths.flatten(theta)) == {
    'layers/0/kernel/a',
    'layers/0/kernel/b',
    'layers/1/kernel/a',
    'layers/1/kernel/b',
  }
  new_state = adapter.apply(state, theta)
  merged = nnx.merge(graphdef, new_state)
  kernel = merged.layers[0].kernel.get_value()
  expected = state['layers'][0]['kernel'].get_value() + (16 / 2) * (
    theta['layers']['0']['kernel']['a'] @ theta['layers']['0']['kernel']['b']
  )
  assert jnp.allclose(kernel, expected)
  x = jnp.ones((2, 4))
  assert merged(x).shape == (2, 3)
