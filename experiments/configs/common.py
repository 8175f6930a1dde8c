"""Shared config helpers: ``file.py:key=value,...`` arguments and loading."""

import ast
import importlib.util
import pathlib

import ml_collections

from peft_jax import PeftError


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # A bare word is a string.


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``'method=lora,steps=300,runlocal'`` against typed defaults.

  Values are Python literals cast to the default's type; a bare key means
  ``True``. A key without a default is an error that lists the known keys.

  Args:
    arg: the text after ``:`` in ``--config file.py:arg`` (or None).
    **defaults: the accepted keys and their default values.

  Returns:
    A ConfigDict of the defaults, updated from ``arg``.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, _, text = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise PeftError(
        f'unknown config argument {key!r}; known: {", ".join(sorted(defaults))}'
      )
    value = _literal(text.strip()) if text else True
    kind = type(defaults[key])
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if not isinstance(value, kind):
      raise PeftError(
        f'config argument {key}={text!r} should be a {kind.__name__} '
        f'(default {defaults[key]!r})'
      )
    parsed[key] = value
  return parsed


def lookup(table: dict, kind: str, name: str):
  """``table[name]``, or a one-line error naming the value and the choices."""
  if name not in table:
    raise PeftError(f'{kind}={name!r} is unknown; expected one of {", ".join(table)}')
  return table[name]


def load_module(path: str):
  """Imports a config module from its file path."""
  file = pathlib.Path(path)
  if not file.is_file():
    raise PeftError(f'config file {path!r} does not exist')
  spec = importlib.util.spec_from_file_location(f'config_{file.stem}', file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise PeftError(f'config file {path!r} defines no get_config(arg)')
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``'experiments/configs/x.py:method=lora'`` -> ``get_config('method=lora')``."""
  path, _, arg = spec.partition(':')
  return load_module(path).get_config(arg or None)
