"""Rules choose which leaves an adapter perturbs.

A rule is ``(selector, spec)``. The selector is a regex, matched with
``re.fullmatch`` against the leaf name, or a predicate ``(name, leaf) ->
bool``. The spec is a registry string (``'lora(rank=8)'``), an ``Adapter``,
or ``None`` (keep frozen). Rules are tried in order and the first match wins;
leaves that no rule matches stay frozen. With ``strict=True`` a rule that
matches no leaf is an error naming the rule and the closest leaf names, so a
mistyped pattern fails loudly instead of training nothing.
"""

import difflib
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from peft_jax._src import paths, registry
from peft_jax._src.base import Adapter, Params, PeftError

Selector = str | Callable[[str, Any], bool]
Spec = str | Adapter | None
Rule = tuple[Selector, Spec]


class CompiledRule(NamedTuple):
  """A validated rule: its position, a matcher and the resolved adapter."""

  index: int
  selector: Selector
  matches: Callable[[str, Any], bool]
  adapter: Adapter | None


def _describe_selector(selector: Selector) -> str:
  if isinstance(selector, str):
    return repr(selector)
  return getattr(selector, '__name__', repr(selector))


def _compile_selector(index: int, selector: Selector) -> Callable[[str, Any], bool]:
  if callable(selector):
    return lambda name, leaf: bool(selector(name, leaf))
  if not isinstance(selector, str):
    raise PeftError(
      f'rule {index}: selector {selector!r} must be a regex string or a '
      'predicate (name, leaf) -> bool'
    )
  if selector.startswith(paths.SEPARATOR):
    raise PeftError(
      f'rule {index}: pattern {selector!r} starts with "/"; leaf names '
      f'have no leading slash (e.g. {selector.lstrip("/")!r})'
    )
  try:
    pattern = re.compile(selector)
  except re.error as e:
    raise PeftError(f'rule {index}: pattern {selector!r} is not a regex: {e}') from None
  return lambda name, leaf: pattern.fullmatch(name) is not None


def compile_rules(rules: Sequence[Rule]) -> list[CompiledRule]:
  """Validates rules and resolves their specs through the registry."""
  if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
    raise PeftError(
      f'rules must be a list of (pattern, spec) pairs; got {type(rules).__name__}'
    )
  compiled = []
  for index, rule in enumerate(rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
      raise PeftError(f'rule {index}: {rule!r} is not a (pattern, spec) pair')
    selector, spec = rule
    matches = _compile_selector(index, selector)
    try:
      adapter = None if spec is None else registry.get(spec)
    except PeftError as e:
      raise PeftError(f'rule {index} ({_describe_selector(selector)}): {e}') from None
    compiled.append(CompiledRule(index, selector, matches, adapter))
  return compiled


def _closest_names(selector: Selector, names: list[str]) -> str:
  if not isinstance(selector, str):
    return ', '.join(names[:3])
  return ', '.join(difflib.get_close_matches(selector, names, n=3, cutoff=0.0))


def assign(
  rules: Sequence[CompiledRule], params: Params, *, strict: bool = True
) -> dict[str, tuple[CompiledRule, Any]]:
  """Maps each matched leaf name to ``(rule, leaf)``, first match winning.

  Args:
    rules: compiled rules (see ``compile_rules``).
    params: the frozen parameter tree (Linen dict or NNX state).
    strict: raise if a rule matches no leaf.

  Returns:
    ``{name: (rule, leaf)}`` in tree order, for leaves some rule matched,
    ``None``-spec (frozen) rules included.
  """
  leaves = list(paths.named_leaves(params))
  assigned, used = {}, set()
  for name, leaf in leaves:
    for rule in rules:
      if rule.matches(name, leaf):
        assigned[name] = (rule, leaf)
        used.add(rule.index)
        break
  if strict:
    for rule in rules:
      if rule.index not in used:
        raise PeftError(_unused_rule_message(rule, leaves))
  return assigned


def _unused_rule_message(rule: CompiledRule, leaves: list[tuple[str, Any]]) -> str:
  label = (
    f'rule {rule.index} ({_describe_selector(rule.selector)}, '
    f'{rule.adapter.name if rule.adapter else None!r})'
  )
  shadowed = [name for name, leaf in leaves if rule.matches(name, leaf)]
  if shadowed:
    return (
      f'{label} is shadowed: earlier rules already take every leaf it '
      f'matches (first match wins), e.g. {shadowed[0]!r}'
    )
  names = [name for name, _ in leaves]
  return (
    f'{label} matches no leaf; closest leaf names: '
    f'{_closest_names(rule.selector, names)}'
  )
