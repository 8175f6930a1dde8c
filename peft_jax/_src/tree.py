"""Whole-tree adapters: ``by_rules`` lifts per-leaf adapters to a pytree.

``by_rules(rules).init(key, frozen)`` returns a *sparse* nested dict holding
only the trainable parameters, keyed like the frozen tree
(``{'encoder': {'layer_0': {'attention': {'query': {'kernel': {'a': ..,
'b': ..}}}}}}``): checkpoints stay small and optax only sees trainable
leaves, with no masks. ``apply(frozen, theta)`` returns the full perturbed
tree, ready for ``model.apply({'params': ...}, x)``.
"""

import functools
import zlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src import paths
from peft_jax._src.base import Adapter, AdapterParams, Array, Params, PeftError
from peft_jax._src.rules import Rule, assign, compile_rules


def leaf_key(key: Array, name: str) -> Array:
  """The PRNG key of one leaf: depends on its name, not on tree order."""
  return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _with_leaf_name(name: str, fn: Callable, *args):
  """Calls ``fn(*args)``, prefixing the leaf name to any PeftError."""
  try:
    return fn(*args)
  except PeftError as e:
    raise PeftError(f'{name}: {e}') from None


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  return {name: tuple(np.shape(leaf)) for name, leaf in paths.named_leaves(tree)}


def _check_fits(expected: dict, got: dict) -> None:
  """Raises naming the first path where ``got`` differs from ``expected``."""
  for name in list(expected) + [n for n in got if n not in expected]:
    want, have = expected.get(name), got.get(name)
    if want != have:
      raise PeftError(
        'adapter parameters do not fit this frozen tree: at '
        f'{name!r} the frozen tree needs {"nothing" if want is None else want}'
        f', the adapter parameters have {"nothing" if have is None else have}'
      )


def by_rules(rules: Sequence[Rule], *, strict: bool = True) -> Adapter:
  """Lifts per-leaf adapters to a whole parameter tree, chosen by rules.

  Args:
    rules: ordered ``(selector, spec)`` pairs; ``re.fullmatch`` of a regex
      (or a predicate ``(name, leaf) -> bool``) on each leaf name, first
      match wins, unmatched leaves stay frozen. ``spec`` is a registry string
      (``'lora(rank=8, alpha=16)'``), an ``Adapter``, or ``None`` (frozen).
    strict: a rule that matches no leaf is an error.

  Returns:
    A tree-level ``Adapter``: ``init(key, frozen) -> theta`` (sparse nested
    dict of trainable arrays), ``apply(frozen, theta) -> params`` (full tree,
    same structure as ``frozen``), ``unapply`` where every chosen method is
    invertible, and ``regularizer(frozen, theta)`` summing the per-leaf ones.

  Example:
    >>> import jax, jax.numpy as jnp, peft_jax as pj
    >>> frozen = {'dense': {'kernel': jnp.ones((4, 3)), 'bias': jnp.zeros(3)}}
    >>> adapter = pj.by_rules([('.*/kernel', 'lora(rank=2, alpha=4)')])
    >>> theta = adapter.init(jax.random.key(0), frozen)
    >>> jax.tree.map(jnp.shape, theta)
    {'dense': {'kernel': {'a': (4, 2), 'b': (2, 3)}}}
    >>> pj.count(theta)
    14
  """
  compiled = compile_rules(rules)
  chosen = [rule.adapter for rule in compiled if rule.adapter is not None]

  def plan(frozen: Params) -> dict[str, Adapter]:
    """``{leaf name: adapter}`` for the adapted leaves of ``frozen``."""
    return {
      name: rule.adapter
      for name, (rule, _) in assign(compiled, frozen, strict=strict).items()
      if rule.adapter is not None
    }

  def init(key: Array, frozen: Params) -> AdapterParams:
    flat = paths.flatten(frozen)
    return paths.nest(
      {
        name: _with_leaf_name(name, adapter.init, leaf_key(key, name), flat[name])
        for name, adapter in plan(frozen).items()
      }
    )

  def plan_with_params(frozen: Params, theta: AdapterParams) -> dict:
    expected = jax.eval_shape(init, jax.random.key(0), frozen)
    _check_fits(_shapes(expected), _shapes(theta))
    return {
      name: (adapter, paths.subtree(theta, name))
      for name, adapter in plan(frozen).items()
    }

  def map_adapted(method: str, frozen: Params, theta: AdapterParams) -> Params:
    chosen = plan_with_params(frozen, theta)

    def visit(name, w):
      if name not in chosen:
        return w
      adapter, leaf_theta = chosen[name]
      return _with_leaf_name(name, getattr(adapter, method), w, leaf_theta)

    return paths.map_named(visit, frozen)

  def regularizer(frozen: Params, theta: AdapterParams) -> Array:
    flat = paths.flatten(frozen)
    terms = [
      adapter.regularizer(flat[name], leaf_theta)
      for name, (adapter, leaf_theta) in plan_with_params(frozen, theta).items()
      if adapter.regularizer is not None
    ]
    return functools.reduce(jnp.add, terms, jnp.zeros((), jnp.float32))

  return Adapter(
    init=init,
    apply=functools.partial(map_adapted, 'apply'),
    unapply=(
      functools.partial(map_adapted, 'unapply')
      if all(a.unapply is not None for a in chosen)
      else None
    ),
    regularizer=(
      regularizer if any(a.regularizer is not None for a in chosen) else None
    ),
    mergeable=all(a.mergeable for a in chosen),
    name='by_rules([{}])'.format(
      ', '.join(
        f'({r.selector!r}, {r.adapter.name if r.adapter else None!r})' for r in compiled
      )
    ),
    plan=plan_with_params,
  )


def merge(adapter: Adapter, frozen: Params, theta: AdapterParams) -> Params:
  """The merged weights ``apply(frozen, theta)``, for plain inference.

  Raises if the method is not mergeable (activation-side methods).
  """
  if not adapter.mergeable:
    raise PeftError(f'{adapter.name or "this adapter"} is not mergeable')
  return adapter.apply(frozen, theta)


def unmerge(adapter: Adapter, merged: Params, theta: AdapterParams) -> Params:
  """Recovers the frozen weights from merged ones: ``unapply(merged, theta)``."""
  if adapter.unapply is None:
    raise PeftError(
      f'{adapter.name or "this adapter"} is not invertible: some chosen '
      'method has no unapply (e.g. full or bitfit replace the weight)'
    )
  return adapter.unapply(merged, theta)


def count(theta: AdapterParams) -> int:
  """The number of trainable scalars in ``theta`` (``buffers`` excluded)."""
  return sum(
    int(np.size(leaf))
    for name, leaf in paths.named_leaves(theta)
    if not paths.is_buffer(name)
  )


def trainable_mask(theta: AdapterParams) -> AdapterParams:
  """A bool pytree like ``theta``: False for leaves under a ``buffers`` key."""
  return paths.map_named(lambda name, leaf: not paths.is_buffer(name), theta)


def describe(
  rules: Sequence[Rule],
  params: Params,
  *,
  strict: bool = True,
  print_fn: Callable[[str], None] = print,
) -> None:
  """Prints a table of every leaf: name, shape, method, trainable count.

  Args:
    rules: as for ``by_rules``.
    params: the frozen parameter tree.
    strict: as for ``by_rules``.
    print_fn: where the table goes (``print``, ``logging.info``, ...).
  """
  compiled = compile_rules(rules)
  assigned = assign(compiled, params, strict=strict)
  rows, trainable, total = [], 0, 0
  for name, leaf in paths.named_leaves(params):
    rule = assigned.get(name, (None,))[0]
    adapter = rule.adapter if rule else None
    n = 0
    if adapter is not None:
      n = count(jax.eval_shape(adapter.init, jax.random.key(0), leaf))
    trainable, total = trainable + n, total + int(np.size(leaf))
    method = adapter.name if adapter else ('frozen (rule)' if rule else '-')
    rows.append((name, str(tuple(np.shape(leaf))), method, f'{n:,}'))
  header = ('name', 'shape', 'method', 'trainable')
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
  line = lambda r: '  '.join(c.ljust(w) for c, w in zip(r, widths, strict=True))
  lines = [line(header), line(['-' * w for w in widths]), *map(line, rows)]
  share = 100.0 * trainable / max(total, 1)
  lines.append(f'trainable {trainable:,} of {total:,} ({share:.3f}%)')
  print_fn('\n'.join(lines))
