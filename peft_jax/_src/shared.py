"""Parameters shared by every hook point of one rule (``ActivationAdapter.shared``).

θ keeps one copy per rule under the top-level key ``'@shared'``, named by
the method (``'prefix_tuning'``; a second rule with the same method gets
``'prefix_tuning_2'``, in rule order). ``by_rules`` initialises it from one
point's value and, when it plans a run, gives each point
``derive(shared, own)``: the derivation runs outside any ``nn.scan``, on the
point's own parameters with their layer axes, so every layer's gradient
reaches the one copy.
"""

from collections.abc import Mapping, Sequence

import jax
import numpy as np

from peft_jax._src import paths
from peft_jax._src.base import AdapterParams, Array, PeftError
from peft_jax._src.rules import CompiledRule

KEY = '@shared'


def keys(compiled: Sequence[CompiledRule]) -> dict[int, str]:
  """``{rule index: key under '@shared'}`` of the rules whose adapter shares."""
  found, seen = {}, {}
  for rule in compiled:
    adapter = rule.adapter
    if adapter is None or getattr(adapter, 'shared', None) is None:
      continue
    method = adapter.name.split('(')[0] or 'shared'
    seen[method] = seen.get(method, 0) + 1
    found[rule.index] = method if seen[method] == 1 else f'{method}_{seen[method]}'
  return found


def is_shared(name: str) -> bool:
  """Whether an entry name of θ (``'@shared/prefix_tuning'``) is a shared copy."""
  return name.split(paths.SEPARATOR)[0] == KEY


def _shapes(value) -> object:
  return jax.tree.map(lambda x: (tuple(np.shape(x)), np.dtype(x.dtype).name), value)


def init(
  key: Array,
  compiled: Sequence[CompiledRule],
  assigned: Mapping[str, CompiledRule],
  values: Mapping[str, object],
) -> dict[str, AdapterParams]:
  """``{'@shared/<key>': params}``, one per sharing rule that matched a point.

  Args:
    key: the PRNG key (each copy folds in its entry name).
    compiled: the rules.
    assigned: ``{hook name: rule}`` of the matched points.
    values: ``{hook name: value}`` of one call at each point.
  """
  names = keys(compiled)
  made = {}
  for index, shared_key in names.items():
    points = [n for n, rule in assigned.items() if rule.index == index]
    if not points:
      continue
    adapter = compiled[index].adapter
    first = _shapes(values[points[0]])
    for name in points[1:]:
      if _shapes(values[name]) != first:
        raise PeftError(
          f'{compiled[index].label()}: its points share parameters, so they '
          f'must show the same shapes; {points[0]} has {first}, {name} has '
          f'{_shapes(values[name])}'
        )
    entry = paths.SEPARATOR.join([KEY, shared_key])
    made[entry] = adapter.shared.init(paths.leaf_key(key, entry), values[points[0]])
  return made


def derived(
  rule: CompiledRule,
  name: str,
  own: AdapterParams,
  given: Mapping[str, AdapterParams],
  compiled: Sequence[CompiledRule],
) -> AdapterParams:
  """The parameters the point ``name`` runs with: ``own``, or
  ``derive(shared, own)`` when its rule shares."""
  shared = rule.adapter.shared
  if shared is None:
    return own
  entry = paths.SEPARATOR.join([KEY, keys(compiled)[rule.index]])
  if entry not in given:
    raise PeftError(
      f'{name}: {rule.label()} shares parameters across its points, but the '
      f'adapter parameters hold nothing at {entry!r}'
    )
  return shared.derive(given[entry], own)


def check_used(given: Mapping[str, object], compiled: Sequence[CompiledRule]) -> None:
  """Every ``'@shared/...'`` entry of θ belongs to a sharing rule."""
  expected = {paths.SEPARATOR.join([KEY, k]) for k in keys(compiled).values()}
  for name in given:
    if is_shared(name) and name not in expected:
      raise PeftError(
        f'adapter parameters hold {name!r}, but no rule shares parameters '
        f'under that name (expected {sorted(expected) or "none"})'
      )
