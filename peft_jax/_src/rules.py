"""Rules choose which leaves and hook points an adapter acts on.

A rule is ``(selector, spec)``. The selector is a regex, matched with
``re.fullmatch`` against a name, or a predicate ``(name, value) -> bool``.
The spec is a registry string (``'lora(rank=8)'``), an adapter, or ``None``
(keep frozen). A weight-space spec (``Adapter``) is matched against the
frozen tree's leaf names, an activation spec (``ActivationAdapter``) against
the model's hook-point names, and ``None`` against both. Rules are tried in
order and the first match wins; what no rule matches stays frozen. With
``strict=True`` a rule that matches nothing is an error naming the rule and
the closest names, so a mistyped pattern fails loudly instead of training
nothing.

``serialize_rules`` writes rules as JSON for adapter files (a predicate by
its registered name, an adapter by its canonical spec) and
``deserialize_rules`` reads them back.
"""

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from peft_jax._src import paths, registry, selectors
from peft_jax._src.base import ActivationAdapter, Adapter, Params, PeftError

Selector = str | Callable[[str, Any], bool]
Spec = str | Adapter | ActivationAdapter | None
Rule = tuple[Selector, Spec]


class CompiledRule(NamedTuple):
  """A validated rule: its position, a matcher and the resolved adapter."""

  index: int
  selector: Selector
  matches: Callable[[str, Any], bool]
  adapter: Adapter | ActivationAdapter | None

  def takes(self, kind: str) -> bool:
    """Whether this rule applies to ``'weights'`` or ``'hooks'``."""
    if self.adapter is None:
      return True
    return isinstance(self.adapter, Adapter) == (kind == 'weights')

  def label(self) -> str:
    name = (self.adapter.name or 'a hand-built adapter') if self.adapter else None
    return f'rule {self.index} ({describe_selector(self.selector)}, {name!r})'


def describe_selector(selector: Selector) -> str:
  if isinstance(selector, str):
    return repr(selector)
  return getattr(selector, '__name__', repr(selector))


def compile_pattern(label: str, pattern: str) -> Callable[[str, Any], bool]:
  """``(name, leaf) -> bool``: ``re.fullmatch`` of ``pattern`` on the name.

  Errors read ``f'{label}{pattern!r} ...'`` (e.g. ``"rule 0: pattern '/x'
  starts with ..."``).
  """
  if pattern.startswith(paths.SEPARATOR):
    raise PeftError(
      f'{label}{pattern!r} starts with "/"; names have no leading slash '
      f'(e.g. {pattern.lstrip("/")!r})'
    )
  try:
    compiled = re.compile(pattern)
  except re.error as e:
    raise PeftError(f'{label}{pattern!r} is not a regex: {e}') from None
  return lambda name, leaf: compiled.fullmatch(name) is not None


def _compile_selector(index: int, selector: Selector) -> Callable[[str, Any], bool]:
  if callable(selector):
    return lambda name, leaf: bool(selector(name, leaf))
  if not isinstance(selector, str):
    raise PeftError(
      f'rule {index}: selector {selector!r} must be a regex string or a '
      'predicate (name, leaf) -> bool'
    )
  return compile_pattern(f'rule {index}: pattern ', selector)


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
      raise PeftError(f'rule {index} ({describe_selector(selector)}): {e}') from None
    compiled.append(CompiledRule(index, selector, matches, adapter))
  return compiled


def serialize_rules(rules: Sequence[Rule]) -> list[list]:
  """Rules as JSON, for the metadata of adapter files.

  A regex selector stays as it is and a registered predicate becomes
  ``{'predicate': name}`` (``register_selector``); a spec string or an
  adapter becomes its canonical spec string (an adapter only when
  ``get(adapter.name)`` rebuilds it: ``registry.rebuilds``), ``None`` stays
  ``None``.

  Args:
    rules: ``(selector, spec)`` pairs, as for ``by_rules``.

  Returns:
    ``[[selector, spec], ...]``; ``deserialize_rules`` reads it back.

  Raises:
    PeftError: for a rule that a file cannot record, naming the rule's index
      and value and how to make it recordable.
  """
  return [
    [_selector_json(rule), _spec_json(rule, spec)]
    for rule, (_, spec) in zip(compile_rules(rules), rules, strict=True)
  ]


def _selector_json(rule: CompiledRule) -> str | dict[str, str]:
  if isinstance(rule.selector, str):
    return rule.selector
  name = selectors.selector_name(rule.selector)
  if name is None:
    raise PeftError(
      f'rule {rule.index}: selector {describe_selector(rule.selector)} is a '
      'predicate that is not registered, so an adapter file cannot record it; '
      "use a regex selector, or register it with @pj.register_selector('name')"
    )
  return {'predicate': name}


def _spec_json(rule: CompiledRule, spec: Spec) -> str | None:
  if rule.adapter is None:
    return None
  if isinstance(spec, str) or registry.rebuilds(rule.adapter):
    return rule.adapter.name
  what = (
    f'adapter {rule.adapter.name!r} differs from what pj.get of its name builds'
    if rule.adapter.name
    else 'a hand-built adapter (no name)'
  )
  raise PeftError(
    f'rule {rule.index} ({describe_selector(rule.selector)}): {what}, so an '
    'adapter file cannot record it; give a spec string, or register a method '
    "that builds it with @pj.register('name')"
  )


def deserialize_rules(data: Sequence[Sequence]) -> list[Rule]:
  """The rules that ``serialize_rules`` wrote, ready for ``by_rules``.

  Returns:
    ``[(selector, spec), ...]``: regexes and spec strings as written, each
    ``{'predicate': name}`` replaced by the registered predicate.

  Raises:
    PeftError: for an entry that is not a ``[selector, spec]`` pair or an
      unknown predicate name.
  """
  rules = []
  for index, rule in enumerate(data):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
      raise PeftError(f'rule {index}: {rule!r} is not a [selector, spec] pair')
    selector, spec = rule
    if isinstance(selector, dict):
      if set(selector) != {'predicate'}:
        raise PeftError(
          f"rule {index}: selector {selector!r} is not a regex or {{'predicate': name}}"
        )
      try:
        selector = selectors.get_selector(selector['predicate'])
      except PeftError as e:
        raise PeftError(f'rule {index}: {e}') from None
    rules.append((selector, spec))
  return rules


def _first_match(rules, kind: str, name: str, value) -> CompiledRule | None:
  for rule in rules:
    if rule.takes(kind) and rule.matches(name, value):
      return rule
  return None


def assign(
  rules: Sequence[CompiledRule],
  params: Params,
  hooks: Mapping[str, Any] | None = None,
  *,
  strict: bool = True,
) -> tuple[dict[str, CompiledRule], dict[str, CompiledRule]]:
  """The rule of each matched leaf and hook point, first match winning.

  Args:
    rules: compiled rules (see ``compile_rules``).
    params: the frozen parameter tree (Linen dict or NNX state).
    hooks: ``{hook name: value}`` of the model's hook points, or ``None``.
    strict: raise if a rule matches nothing.

  Returns:
    ``(weights, hooks)``: ``{name: rule}`` in order for leaves and hook points
    that some rule matched, ``None``-spec (frozen) rules included.
  """
  leaves = list(paths.named_leaves(params))
  points = list((hooks or {}).items())
  by_kind = {}
  for kind, named in (('weights', leaves), ('hooks', points)):
    by_kind[kind] = {
      name: rule
      for name, value in named
      if (rule := _first_match(rules, kind, name, value)) is not None
    }
  if strict:
    used = {r.index for chosen in by_kind.values() for r in chosen.values()}
    for rule in rules:
      if rule.index not in used:
        raise PeftError(_unused_rule_message(rule, leaves, points, hooks is None))
  return by_kind['weights'], by_kind['hooks']


def _unused_rule_message(rule: CompiledRule, leaves, points, no_hooks: bool) -> str:
  label = rule.label()
  if rule.adapter is not None and not rule.takes('weights') and no_hooks:
    return (
      f'{label} selects an activation adapter, but no hook points were given; '
      'pass hooks=peft_jax.hook_points(model, *example_inputs)'
    )
  kind, named = ('hooks', points) if rule.takes('hooks') else ('weights', leaves)
  if rule.adapter is None:
    named = leaves + points
  shadowed = [name for name, value in named if rule.matches(name, value)]
  if shadowed:
    return (
      f'{label} is shadowed: earlier rules already take everything it '
      f'matches (first match wins), e.g. {shadowed[0]!r}'
    )
  other = points if kind == 'weights' else leaves
  crossed = [name for name, value in other if rule.matches(name, value)]
  what = 'leaf' if kind == 'weights' else 'hook point'
  if rule.adapter is not None and crossed:
    family = 'a weight-space method' if kind == 'weights' else 'an activation method'
    return (
      f'{label} matches no {what}: it matches {crossed[0]!r}, but '
      f'{rule.adapter.name or "its method"} is {family}'
    )
  names = [name for name, _ in named]
  return f'{label} matches no {what}; closest names: {_closest(rule.selector, names)}'


def _closest(selector: Selector, names: list[str]) -> str:
  if not isinstance(selector, str):
    return ', '.join(names[:3])
  return ', '.join(difflib.get_close_matches(selector, names, n=3, cutoff=0.0))
