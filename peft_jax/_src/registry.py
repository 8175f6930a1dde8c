"""The method registry: ``@register('lora')`` and ``get('lora(rank=8)')``.

Spec strings are Python call syntax with literal arguments, parsed with
``ast`` (never ``eval``): ``'lora'``, ``'lora()'``, ``'lora(8, alpha=16)'``.
Calling a registered factory directly and looking it up by spec give the
same object: adapters are cached by their canonical spec string.
"""

import ast
import difflib
import functools
import inspect
from collections.abc import Callable

from peft_jax._src.base import Adapter, PeftError

Factory = Callable[..., Adapter]
_FACTORIES: dict[str, Factory] = {}


def _canonical_call(name: str, factory: Factory, args, kwargs) -> str:
  """``'lora(rank=8, alpha=16)'``: the passed arguments, as keywords."""
  signature = inspect.signature(factory)
  try:
    bound = signature.bind(*args, **kwargs)
  except TypeError as e:
    accepted = ', '.join(signature.parameters) or 'no arguments'
    raise PeftError(f'{name}(): {e}; accepted: {accepted}') from None
  text = ', '.join(f'{k}={_literal(v)}' for k, v in bound.arguments.items())
  return f'{name}({text})'


def _literal(value) -> str:
  """An argument as spec text; an Adapter argument by its own spec string."""
  if isinstance(value, Adapter) and value.name:
    return repr(value.name)
  return repr(value)


def register(name: str, *, replace: bool = False) -> Callable[[Factory], Factory]:
  """Registers a method factory under ``name`` (a decorator).

  The decorated factory sets ``Adapter.name`` to the canonical spec string
  of the call, so ``describe`` tables and checkpoints record the exact
  hyper-parameters.

  Args:
    name: the method's registry name, snake_case (``'lora'``).
    replace: allow re-registering an existing name.
  """
  if not name.isidentifier():
    raise PeftError(f'method name {name!r} is not a Python identifier')

  def decorator(factory: Factory) -> Factory:
    if name in _FACTORIES and not replace:
      raise PeftError(f'method {name!r} is already registered; pass replace=True')

    built: dict[str, Adapter] = {}

    @functools.wraps(factory)
    def named_factory(*args, **kwargs) -> Adapter:
      spec = _canonical_call(name, factory, args, kwargs)
      if spec not in built:
        built[spec] = factory(*args, **kwargs)._replace(name=spec)
      return built[spec]

    _FACTORIES[name] = named_factory
    return named_factory

  return decorator


def names() -> list[str]:
  """The names of all registered methods, sorted."""
  return sorted(_FACTORIES)


def _parse(spec: str) -> tuple[str, tuple, dict]:
  """``'lora(8, alpha=16)'`` -> ``('lora', (8,), {'alpha': 16})``."""
  usage = "expected 'name' or 'name(arg=literal, ...)'"
  try:
    node = ast.parse(spec.strip(), mode='eval').body
  except SyntaxError:
    raise PeftError(f'cannot parse method spec {spec!r}: {usage}') from None
  if isinstance(node, ast.Name):
    return node.id, (), {}
  if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
    raise PeftError(f'cannot parse method spec {spec!r}: {usage}')
  if any(k.arg is None for k in node.keywords):
    raise PeftError(f'method spec {spec!r} uses **kwargs: {usage}')
  try:
    args = tuple(ast.literal_eval(a) for a in node.args)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
  except ValueError:
    raise PeftError(
      f'method spec {spec!r} has a non-literal argument: {usage}'
    ) from None
  return node.func.id, args, kwargs


def get(spec: str | Adapter) -> Adapter:
  """Builds the adapter a spec string names; an ``Adapter`` passes through.

  Args:
    spec: ``'lora(rank=8, alpha=16)'`` or an ``Adapter`` value.

  Returns:
    The ``Adapter``; the same object as calling the factory directly.
  """
  if isinstance(spec, Adapter):
    return spec
  if not isinstance(spec, str):
    raise PeftError(
      f'method spec {spec!r} has type {type(spec).__name__}; '
      'expected a spec string such as "lora(rank=8)" or an Adapter'
    )
  name, args, kwargs = _parse(spec)
  if name not in _FACTORIES:
    close = difflib.get_close_matches(name, names(), n=3, cutoff=0.5)
    hint = f'did you mean {", ".join(close)}? ' if close else ''
    raise PeftError(f'unknown method {name!r}; {hint}registered: {", ".join(names())}')
  return _FACTORIES[name](*args, **kwargs)
