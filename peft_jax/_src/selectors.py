"""Named selectors: predicates ``(name, leaf) -> bool`` that files can record.

A rule's selector is a regex or a predicate. A regex is text, so an adapter
file records it as it is; a predicate is code, so a file records the name it
is registered under (``@register_selector('is_bias')``) and ``get_selector``
finds it again when the file is loaded. The built-ins, ``is_bias`` and
``is_layer_norm``, register where they are defined (``peft_jax.methods``).
"""

import difflib
from collections.abc import Callable
from typing import Any

from peft_jax._src.base import PeftError

Predicate = Callable[[str, Any], bool]

_SELECTORS: dict[str, Predicate] = {}


def register_selector(
  name: str, *, replace: bool = False
) -> Callable[[Predicate], Predicate]:
  """Registers a predicate under ``name`` (a decorator; the predicate is
  returned unchanged), so adapter files can record rules that use it.

  Args:
    name: a Python identifier, e.g. ``'is_bias'``.
    replace: allow re-registering an existing name.
  """
  if not name.isidentifier():
    raise PeftError(f'selector name {name!r} is not a Python identifier')
  if name in _SELECTORS and not replace:
    raise PeftError(f'selector {name!r} is already registered; pass replace=True')

  def decorator(predicate: Predicate) -> Predicate:
    _SELECTORS[name] = predicate
    return predicate

  return decorator


def selector_names() -> list[str]:
  """The names of all registered selectors, sorted."""
  return sorted(_SELECTORS)


def get_selector(name: str) -> Predicate:
  """Returns the predicate registered under ``name``."""
  if name not in _SELECTORS:
    close = difflib.get_close_matches(str(name), _SELECTORS, n=3, cutoff=0.5)
    hint = f'did you mean {", ".join(close)}? ' if close else ''
    raise PeftError(
      f'unknown selector {name!r}; {hint}registered: {", ".join(selector_names())}'
    )
  return _SELECTORS[name]


def selector_name(predicate: Predicate) -> str | None:
  """Returns the name ``predicate`` is registered under, or ``None``."""
  return next((n for n, p in _SELECTORS.items() if p is predicate), None)
