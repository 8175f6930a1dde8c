"""The registry: spec strings, canonical names, a bounded cache, wrappers apart."""

import jax
import jax.numpy as jnp
import pytest

import peft_jax as pj
from peft_jax._src import registry

LORA_DEFAULTS = (
  "rank=8, alpha=16.0, rslora=False, a_init='kaiming_uniform', b_init='zeros', "
  "param_dtype='float32'"
)


def test_names_are_canonical_with_defaults_applied():
  assert pj.lora().name == f'lora({LORA_DEFAULTS})'
  assert pj.lora(rank=8).name == pj.lora().name
  assert pj.get('lora').name == pj.lora().name
  # An int for a float argument is written as a float; positional = keyword.
  assert pj.get('lora(4, 8)').name == pj.lora(rank=4, alpha=8.0).name
  assert 'alpha=8.0' in pj.get('lora(4, 8)').name


def test_spec_strings_round_trip_through_get():
  for spec in (
    'lora(rank=4, alpha=8)',
    'ssb()',
    "stacked('lora(rank=2)')",
    "mpc(\"matrix_view('adalora(rank=2)', n_in=2)\", kind='d')",
    'prompt_tuning(length=3)',
  ):
    adapter = pj.get(spec)
    again = pj.get(adapter.name)
    assert again.name == adapter.name
    assert again is adapter  # Literal specs come from the bounded cache.


def test_calls_and_specs_share_one_object_per_canonical_name():
  assert pj.lora() is pj.lora(rank=8)
  assert pj.get(' lora( rank=4 , alpha=8 ) ') is pj.lora(rank=4, alpha=8)
  adapter = pj.ssb()
  assert pj.get(adapter) is adapter


def test_the_cache_is_bounded(monkeypatch):
  monkeypatch.setattr(registry, 'CACHE_SIZE', 3)
  monkeypatch.setattr(registry, '_CACHE', registry._CACHE.__class__())
  first = pj.lora(rank=1)
  for rank in (2, 3, 4):
    pj.lora(rank=rank)
  assert len(registry._CACHE) == 3
  assert pj.lora(rank=1) is not first  # Evicted, rebuilt.
  assert pj.lora(rank=1).name == first.name


def test_wrappers_are_in_their_own_namespace():
  assert pj.wrapper_names() == ['matrix_view', 'mpc', 'rank_masked', 'stacked']
  assert not set(pj.wrapper_names()) & set(pj.names())
  wrapped = pj.stacked('lora(rank=2)')
  assert wrapped.name == f'stacked(method="{pj.lora(rank=2).name}")'


def test_a_wrapper_of_a_hand_built_adapter_has_no_name():
  hand_built = pj.lora(rank=2)._replace(name='')
  assert pj.stacked(hand_built).name == ''
  assert pj.stacked(pj.lora(rank=2)).name == pj.stacked('lora(rank=2)').name


def test_wrapping_an_activation_method_is_a_clear_error():
  with pytest.raises(pj.PeftError, match='stacked wraps weight-space methods'):
    pj.stacked('prompt_tuning()')


@pytest.mark.parametrize(
  'spec,message',
  [
    ('lroa(rank=2)', "unknown method 'lroa'; did you mean lora"),
    ('lora(rnak=2)', "unexpected keyword argument 'rnak'; accepted: rank, alpha"),
    ('lora(rank=', 'cannot parse method spec'),
    ('lora(rank=x)', 'non-literal argument'),
    ('lora(**k)', 'uses \\*\\*kwargs'),
    ('pj.lora()', 'cannot parse method spec'),
    ("stacked('lroa')", "unknown method 'lroa'"),
  ],
)
def test_bad_specs_are_clear_errors(spec, message):
  with pytest.raises(pj.PeftError, match=message):
    pj.get(spec)


def test_non_string_spec_is_a_clear_error():
  with pytest.raises(pj.PeftError, match='has type int; expected a spec string'):
    pj.get(8)


def test_register_adds_a_method_and_refuses_duplicates(monkeypatch):
  monkeypatch.setattr(registry, '_METHODS', dict(registry._METHODS))

  @pj.register('scaled_full')
  def scaled_full(factor: float = 2.0):
    base = pj.full()
    return base._replace(apply=lambda w, p, b: factor * base.apply(w, p, b))

  assert 'scaled_full' in pj.names()
  adapter = pj.get('scaled_full(factor=3)')
  assert adapter.name == 'scaled_full(factor=3.0)'
  w = jnp.ones((2, 2))
  params, buffers = adapter.init(jax.random.key(0), w)
  assert float(adapter.apply(w, params, buffers)[0, 0]) == 3.0
  with pytest.raises(pj.PeftError, match='already registered'):
    pj.register('scaled_full')(scaled_full)
  with pytest.raises(pj.PeftError, match='already registered'):
    pj.register_wrapper('lora')(scaled_full)
  with pytest.raises(pj.PeftError, match='not a Python identifier'):
    pj.register('scaled-full')


def test_brief_names_drop_default_arguments_for_tables():
  assert registry.brief(pj.lora(rank=2).name) == 'lora(rank=2)'
  assert registry.brief(pj.lora().name) == 'lora()'
  assert registry.brief(pj.lora(alpha=8).name) == 'lora(alpha=8.0)'
  nested = pj.mpc(pj.stacked('lora(rank=4)'), gamma=0.2).name
  assert (
    registry.brief(nested)
    == 'mpc(method="stacked(method=\'lora(rank=4)\')", gamma=0.2)'
  )
  assert registry.brief('not a spec(') == 'not a spec('
