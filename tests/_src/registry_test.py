"""The registry: spec strings, canonical names, clear errors."""

import pytest

import peft_jax as pj
from peft_jax._src import registry


def test_spec_strings_parse_like_python_calls():
  assert pj.get('lora').name == 'lora()'
  assert pj.get('lora(4, alpha=8)').name == 'lora(rank=4, alpha=8)'
  assert pj.get(' lora( rank=4 , alpha=8 ) ') is pj.lora(rank=4, alpha=8)
  adapter = pj.ssb()
  assert pj.get(adapter) is adapter


@pytest.mark.parametrize(
  'spec,message',
  [
    ('lroa(rank=2)', "unknown method 'lroa'; did you mean lora"),
    ('lora(rnak=2)', "unexpected keyword argument 'rnak'; accepted: rank, alpha"),
    ('lora(rank=', 'cannot parse method spec'),
    ('lora(rank=x)', 'non-literal argument'),
    ('lora(**k)', 'uses \\*\\*kwargs'),
    ('pj.lora()', 'cannot parse method spec'),
  ],
)
def test_bad_specs_are_clear_errors(spec, message):
  with pytest.raises(pj.PeftError, match=message):
    pj.get(spec)


def test_non_string_spec_is_a_clear_error():
  with pytest.raises(pj.PeftError, match='has type int; expected a spec string'):
    pj.get(8)


def test_register_adds_a_method_and_refuses_duplicates(monkeypatch):
  monkeypatch.setattr(registry, '_FACTORIES', dict(registry._FACTORIES))

  @pj.register('scaled_full')
  def scaled_full(factor: float = 2.0):
    base = pj.full()
    return base._replace(apply=lambda w, t: factor * base.apply(w, t))

  assert 'scaled_full' in pj.names()
  assert pj.get('scaled_full(factor=3.0)').name == 'scaled_full(factor=3.0)'
  with pytest.raises(pj.PeftError, match='already registered'):
    pj.register('scaled_full')(scaled_full)
  with pytest.raises(pj.PeftError, match='not a Python identifier'):
    pj.register('scaled-full')
