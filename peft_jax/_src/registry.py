"""The registry: ``@register('lora')``, ``get('lora(rank=8)')``, ``names()``.

Spec strings are Python call syntax with literal arguments, parsed with
``ast`` (never ``eval``): ``'lora'``, ``'lora()'``, ``'lora(8, alpha=16)'``.
Two namespaces share the syntax: *methods* (``names()``; every one passes the
contract test) and *wrappers* that take a method and return a modified one
(``wrapper_names()``: ``stacked``, ``matrix_view``, ``mpc``, ``rank_masked``), so
``get("stacked('lora(rank=4)')")`` works.

Every built adapter carries its canonical spec string as ``name``: every
argument by keyword, defaults applied, floats written as floats, a wrapped
method by its own canonical name. ``get(adapter.name)`` rebuilds an equal
adapter, so names round-trip through configs and checkpoints. Adapters built
from literal arguments are kept in a bounded cache keyed by that name, so
``lora()`` and ``get('lora(rank=8)')`` return the same object (one jit trace
for both).
"""

import ast
import collections
import difflib
import functools
import inspect
import types
from collections.abc import Callable
from typing import Any

import numpy as np

from peft_jax._src.base import ActivationAdapter, Adapter, PeftError

AnyAdapter = Adapter | ActivationAdapter
Factory = Callable[..., AnyAdapter]
CACHE_SIZE = 512

_METHODS: dict[str, Factory] = {}
_WRAPPERS: dict[str, Factory] = {}
_CACHE: collections.OrderedDict[str, AnyAdapter] = collections.OrderedDict()


def _literal(value: Any, annotation: Any) -> str:
  """One argument as spec text (adapters by their canonical name)."""
  if isinstance(value, (Adapter, ActivationAdapter)):
    return repr(value.name)
  if annotation is float and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  return repr(value)


def _canonical(name: str, factory: Factory, args, kwargs) -> str:
  """``'lora(rank=8, alpha=16.0, ...)'`` for a call of ``factory``."""
  signature = inspect.signature(factory)
  try:
    bound = signature.bind(*args, **kwargs)
  except TypeError as e:
    accepted = ', '.join(signature.parameters) or 'no arguments'
    raise PeftError(f'{name}(): {e}; accepted: {accepted}') from None
  bound.apply_defaults()
  text = ', '.join(
    f'{key}={_literal(value, signature.parameters[key].annotation)}'
    for key, value in bound.arguments.items()
  )
  return f'{name}({text})'


def _named(name: str, factory: Factory, canonicalize_method: bool) -> Factory:
  """``factory`` with canonical names and the bounded cache.

  Only calls with literal arguments are cached: an adapter object argument
  may not be rebuilt exactly by its name.
  """

  @functools.wraps(factory)
  def named_factory(*args, **kwargs) -> AnyAdapter:
    literal = not any(
      isinstance(v, (Adapter, ActivationAdapter)) for v in (*args, *kwargs.values())
    )
    if canonicalize_method:  # A wrapped method given as a spec string.
      args, kwargs = _resolve_method(factory, args, kwargs)
    spec = _canonical(name, factory, args, kwargs)
    cacheable = literal
    if cacheable and spec in _CACHE:
      _CACHE.move_to_end(spec)
      return _CACHE[spec]
    adapter = factory(*args, **kwargs)
    # A wrapper of a hand-built (unnamed) adapter has no spec that rebuilds it.
    adapter = adapter._replace(name='' if _has_unnamed_adapter(args, kwargs) else spec)
    if cacheable:
      _CACHE[spec] = adapter
      if len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return adapter

  return named_factory


def _has_unnamed_adapter(args, kwargs) -> bool:
  values = [*args, *kwargs.values()]
  return any(isinstance(v, (Adapter, ActivationAdapter)) and not v.name for v in values)


def _resolve_method(factory: Factory, args, kwargs):
  """Replaces a spec-string ``method`` argument by the adapter it names."""
  bound = inspect.signature(factory).bind_partial(*args, **kwargs)
  method = bound.arguments.get('method')
  if isinstance(method, str):
    bound.arguments['method'] = get(method)
  return bound.args, bound.kwargs


def _decorator(table: dict[str, Factory], name: str, replace: bool, wrapper: bool):
  if not name.isidentifier():
    raise PeftError(f'registry name {name!r} is not a Python identifier')
  if not replace and (name in _METHODS or name in _WRAPPERS):
    raise PeftError(f'{name!r} is already registered; pass replace=True')

  def decorator(factory: Factory) -> Factory:
    _METHODS.pop(name, None)
    _WRAPPERS.pop(name, None)
    for spec in [s for s in _CACHE if s.startswith(f'{name}(')]:
      del _CACHE[spec]
    table[name] = _named(name, factory, canonicalize_method=wrapper)
    return table[name]

  return decorator


def register(name: str, *, replace: bool = False) -> Callable[[Factory], Factory]:
  """Registers a method factory under ``name`` (a decorator).

  The decorated factory sets ``name`` on the adapters it returns to the
  canonical spec string of the call, so ``describe`` tables, configs and
  checkpoints record the exact hyper-parameters.

  Args:
    name: the method's registry name, snake_case (``'lora'``).
    replace: allow re-registering an existing name.
  """
  return _decorator(_METHODS, name, replace, wrapper=False)


def register_wrapper(
  name: str, *, replace: bool = False
) -> Callable[[Factory], Factory]:
  """Registers a wrapper: a factory whose first argument ``method`` is a method.

  ``method`` may be given as a spec string or an adapter; the canonical name
  holds the wrapped method's canonical name.
  """
  return _decorator(_WRAPPERS, name, replace, wrapper=True)


def names() -> list[str]:
  """The names of all registered methods, sorted (wrappers excluded)."""
  return sorted(_METHODS)


def wrapper_names() -> list[str]:
  """The names of all registered wrappers, sorted."""
  return sorted(_WRAPPERS)


def brief(spec: str) -> str:
  """A canonical spec without the arguments that equal their defaults.

  For tables: ``'lora(rank=2, alpha=16.0, rslora=False, ...)'`` ->
  ``'lora(rank=2)'``; a wrapped method is shortened too. Specs that do not
  parse (hand-built adapters) come back unchanged.
  """
  try:
    name, args, kwargs = parse(spec)
  except PeftError:
    return spec
  factory = _METHODS.get(name) or _WRAPPERS.get(name)
  if factory is None or args:
    return spec
  parameters = inspect.signature(factory).parameters
  kept = []
  for key, value in kwargs.items():
    default = parameters[key].default if key in parameters else inspect.Parameter.empty
    if value == default and type(value) is type(default):
      continue
    if key == 'method' and isinstance(value, str):
      value = brief(value)
    kept.append(f'{key}={value!r}')
  return f'{name}({", ".join(kept)})'


def parse(spec: str) -> tuple[str, tuple, dict]:
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


def get(spec: str | AnyAdapter) -> AnyAdapter:
  """Builds the adapter a spec string names; an adapter passes through.

  Args:
    spec: ``'lora(rank=8, alpha=16)'``, ``"stacked('lora')"``, or an
      ``Adapter``/``ActivationAdapter`` value.

  Returns:
    The adapter, equal to calling the factory directly.
  """
  if isinstance(spec, (Adapter, ActivationAdapter)):
    return spec
  if not isinstance(spec, str):
    raise PeftError(
      f'method spec {spec!r} has type {type(spec).__name__}; '
      'expected a spec string such as "lora(rank=8)" or an adapter'
    )
  name, args, kwargs = parse(spec)
  factory = _METHODS.get(name) or _WRAPPERS.get(name)
  if factory is None:
    known = names() + wrapper_names()
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f'did you mean {", ".join(close)}? ' if close else ''
    raise PeftError(f'unknown method {name!r}; {hint}registered: {", ".join(known)}')
  return factory(*args, **kwargs)


def rebuilds(adapter: AnyAdapter) -> bool:
  """Whether ``get(adapter.name)`` builds an adapter that works as ``adapter``.

  Every field but ``init`` must match: the same object, or a function of the
  same code over equal closed-over values (hyper-parameters, a wrapped
  adapter), so a wrapper built around an adapter object, or an adapter built
  again after the cache dropped it, counts as rebuilt. ``init`` may differ:
  an adapter file holds what ``init`` made, and loading checks its structure
  (``sparse_rules`` gives ``sparse`` adapters the init of a mask). A
  hand-built adapter (no name) or one whose ``apply`` was replaced is not
  rebuilt.

  Returns:
    ``True`` when ``adapter.name`` can stand for ``adapter`` in a file.
  """
  if not adapter.name:
    return False
  try:
    rebuilt = get(adapter.name)
  except PeftError:
    return False
  if type(rebuilt) is not type(adapter):
    return False
  return all(
    _equivalent(getattr(adapter, field), getattr(rebuilt, field), set())
    for field in adapter._fields
    if field != 'init'
  )


_EMPTY = object()  # an empty closure cell


def _cells(fn: types.FunctionType) -> tuple:
  def content(cell):
    try:
      return cell.cell_contents
    except ValueError:
      return _EMPTY

  return tuple(content(cell) for cell in fn.__closure__ or ())


def _equivalent(a: Any, b: Any, seen: set) -> bool:
  """``a`` and ``b`` compute the same: equal values, or functions of one
  code object (also under ``jax.jit``) whose defaults and closed-over values
  are equivalent."""
  if a is b:
    return True
  if type(a) is not type(b):
    return False
  if (id(a), id(b)) in seen:  # A cycle (a function closing over itself).
    return True
  seen.add((id(a), id(b)))
  if isinstance(a, types.FunctionType):
    return a.__code__ is b.__code__ and all(
      _equivalent(x, y, seen)
      for x, y in [
        (a.__defaults__, b.__defaults__),
        (a.__kwdefaults__, b.__kwdefaults__),
        (_cells(a), _cells(b)),
      ]
    )
  if isinstance(a, functools.partial):
    return _equivalent((a.func, a.args, a.keywords), (b.func, b.args, b.keywords), seen)
  if hasattr(a, '__wrapped__'):  # jax.jit of a function, and other wrappers
    return _equivalent(a.__wrapped__, getattr(b, '__wrapped__', None), seen)
  if isinstance(a, (tuple, list)):
    return len(a) == len(b) and all(
      _equivalent(x, y, seen) for x, y in zip(a, b, strict=True)
    )
  if isinstance(a, dict):
    return a.keys() == b.keys() and all(_equivalent(a[k], b[k], seen) for k in a)
  if hasattr(a, 'shape') and hasattr(a, 'dtype'):  # NumPy or JAX arrays
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
  try:
    return bool(a == b)
  except (TypeError, ValueError):
    return False
