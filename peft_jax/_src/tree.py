"""Whole-model adapters: ``by_rules`` lifts per-leaf and per-point adapters.

``by_rules(rules).init(key, frozen, hooks)`` returns ``(params, buffers)``,
two *sparse* nested dicts keyed like the frozen tree (weight-space entries at
leaf names, activation entries at hook-point names), each entry the typed
parameters of its method (``{'encoder': {'query': {'kernel': LoraParams(a,
b)}}}``): checkpoints stay small and optax only sees trainable arrays, with
no masks. ``apply(frozen, params, buffers)`` returns the full perturbed
weight tree, ready for ``model.apply({'params': ...}, x)``; activation
adapters act when the model runs through ``peft_jax.adapted``.
"""

import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src import checks, paths, quantization, registry, shared
from peft_jax._src.base import (
  ActivationAdapter,
  Adapter,
  AdapterParams,
  Array,
  Buffers,
  Entry,
  Params,
  PeftError,
  Plan,
  TreeAdapter,
)
from peft_jax._src.hooks import HookPoint
from peft_jax._src.paths import leaf_key
from peft_jax._src.rules import Rule, assign, compile_rules

REDUCTIONS = ('sum', 'mean')


def with_name(name: str, fn: Callable, *args):
  """Calls ``fn(*args)``, prefixing the entry name to any PeftError."""
  try:
    return fn(*args)
  except PeftError as e:
    raise PeftError(f'{name}: {e}') from None


def entries(tree: Mapping | None) -> dict[str, object]:
  """``{name: node}`` of a sparse tree: every node that is not a dict.

  Method parameters are typed (NamedTuples or arrays), so the walk stops at
  each adapted leaf or hook point.
  """
  found = {}

  def walk(node, prefix):
    for key, child in node.items():
      name = f'{prefix}{key}'
      if isinstance(child, Mapping):
        walk(child, name + paths.SEPARATOR)
      else:
        found[name] = child

  walk(tree or {}, '')
  return found


def _init_stacked(init: Callable, key: Array, value, stack: tuple[int, ...]):
  """``init(key, value)``, vmapped over one fresh key per layer of ``stack``."""
  if not stack:
    return init(key, value)
  keys = jax.random.split(key, stack[0])
  return jax.vmap(lambda k: _init_stacked(init, k, value, stack[1:]))(keys)


def _check_typed(name: str, adapter, params) -> None:
  if isinstance(params, Mapping):
    raise PeftError(
      f'{name}: {adapter.name or "a hand-built adapter"} returned its parameters '
      'as a dict; method parameters must be typed (a NamedTuple or an array)'
    )


def _shapes(tree) -> dict[str, tuple]:
  return {
    name: (tuple(np.shape(x)), np.dtype(x.dtype).name)
    for name, x in paths.named_leaves(tree)
  }


def _check_fits(what: str, expected, got) -> None:
  """Raises naming the first path where ``got`` differs from ``expected``."""
  expected, got = _shapes(expected), _shapes(got)
  for name in list(expected) + [n for n in got if n not in expected]:
    want, have = expected.get(name), got.get(name)
    if want is not None and have is not None and want[0] == have[0]:
      continue
    describe = lambda v: 'nothing' if v is None else f'{v[0]} {v[1]}'
    raise PeftError(
      f'adapter {what} do not fit this frozen tree: at {name!r} the frozen '
      f'tree needs {describe(want)}, the adapter {what} have {describe(have)}'
    )


def by_rules(
  rules: Sequence[Rule], *, strict: bool = True, regularizer: str = 'mean'
) -> TreeAdapter:
  """Lifts adapters to a whole model, chosen by rules.

  Args:
    rules: ordered ``(selector, spec)`` pairs; ``re.fullmatch`` of a regex
      (or a predicate ``(name, leaf) -> bool``) on each name, first match
      wins, unmatched names stay frozen. ``spec`` is a registry string
      (``'lora(rank=8, alpha=16)'``), an adapter, or ``None`` (frozen).
      Weight-space specs match leaf names; activation specs match hook-point
      names (predicates see ``(name, None)`` for hook points).
    strict: a rule that matches nothing is an error.
    regularizer: how the penalty terms of the adapted leaves combine:
      ``'mean'`` (default; one term per matrix, a stacked leaf giving one
      per layer) reproduces the reference code of AdaLoRA and of the
      subspace-tuning paper (``compute_orth_regu``), ``'sum'`` the papers'
      formulas (``γ Σ_leaves R``).

  Returns:
    A ``TreeAdapter``.

  Example:
    >>> import jax, jax.numpy as jnp, peft_jax as pj
    >>> frozen = {'dense': {'kernel': jnp.ones((4, 3)), 'bias': jnp.zeros(3)}}
    >>> adapter = pj.by_rules([('.*/kernel', 'lora(rank=2, alpha=4)')])
    >>> params, buffers = adapter.init(jax.random.key(0), frozen)
    >>> jax.tree.map(jnp.shape, params)
    {'dense': {'kernel': LoraParams(a=(4, 2), b=(2, 3))}}
    >>> pj.count(params)
    14
  """
  compiled = compile_rules(rules)
  if regularizer not in REDUCTIONS:
    raise PeftError(f"by_rules: regularizer={regularizer!r} is not 'sum' or 'mean'")
  chosen = [rule.adapter for rule in compiled if rule.adapter is not None]
  leaf_methods = [a for a in chosen if isinstance(a, Adapter)]
  has_hooks = any(isinstance(a, ActivationAdapter) for a in chosen)
  plan = functools.partial(_plan, compiled)
  invertible = all(a.unapply is not None for a in leaf_methods) and not has_hooks
  regularized = any(a.regularizer is not None for a in leaf_methods)
  return TreeAdapter(
    init=functools.partial(_init, compiled, strict),
    apply=functools.partial(_map_weights, plan, _apply_entry),
    unapply=functools.partial(_map_weights, plan, _unapply_entry)
    if invertible
    else None,
    regularizer=functools.partial(_regularize, plan, regularizer)
    if regularized
    else None,
    plan=plan,
    mergeable=all(a.mergeable for a in leaf_methods) and not has_hooks,
    name='by_rules([{}])'.format(
      ', '.join(
        f'({r.selector!r}, {r.adapter.name if r.adapter else None!r})' for r in compiled
      )
    ),
  )


def _weight_adapters(compiled, frozen: Params) -> dict[str, Adapter]:
  """``{leaf name: adapter}`` of the adapted leaves of ``frozen``."""
  weights, _ = assign(compiled, frozen, strict=False)
  return {n: r.adapter for n, r in weights.items() if r.adapter is not None}


def _method(adapter: Adapter) -> str:
  return registry.brief(adapter.name) if adapter.name else 'a hand-built adapter'


def _check_leaf(name: str, adapter: Adapter, w) -> None:
  """An adapted leaf, as its method sees it, must be floating and, when its
  values are at hand (not traced), finite: one reduction per leaf."""
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise PeftError(
      f'{name}: {_method(adapter)} cannot adapt a leaf of dtype '
      f'{np.dtype(w.dtype).name}; adapters change floating weights (expected a '
      'float dtype)'
    )
  if not checks.concrete(w):
    return
  with jax.ensure_compile_time_eval():  # Eager even if init is being traced.
    bad = checks.nonfinite(w)
  if bad:
    raise PeftError(
      f'{name}: the frozen leaf has {bad} non-finite entries (nan or ±inf) of '
      f'{np.size(w)}; {_method(adapter)} expected finite weights'
    )


def _init_weights(key: Array, leaves: Mapping, chosen: Mapping[str, Adapter]) -> dict:
  """``{leaf name: (params, buffers)}`` of the chosen leaves of the flat
  ``leaves``, each checked by ``_check_leaf`` first: ``init`` passes its
  frozen leaves, ``plan`` traced ones (so only their dtypes are checked)."""
  out = {}
  for name, adapter in chosen.items():
    w = quantization.values(leaves[name])
    _check_leaf(name, adapter, w)
    out[name] = with_name(name, adapter.init, leaf_key(key, name), w)
    _check_typed(name, adapter, out[name][0])
  return out


def _init(
  compiled, strict: bool, key: Array, frozen: Params, hooks: Mapping | None = None
) -> tuple[AdapterParams, Buffers]:
  """``TreeAdapter.init``: every matched leaf and hook point, in sparse trees."""
  weights, points = assign(compiled, frozen, hooks, strict=strict)
  pick = lambda rules: {n: r.adapter for n, r in rules.items() if r.adapter}
  made = _init_weights(key, paths.flatten(frozen), pick(weights))
  for name, adapter in pick(points).items():
    point = hooks[name]
    made[name] = with_name(
      name, _init_stacked, adapter.init, leaf_key(key, name), point.value, point.stack
    )
    _check_typed(name, adapter, made[name][0])
  _check_disjoint(frozen, made)
  values = {name: hooks[name].value for name in points}
  for name, params in shared.init(key, compiled, points, values).items():
    made[name] = (params, None)
  params = paths.nest({n: p for n, (p, _) in made.items()})
  buffers = paths.nest({n: b for n, (_, b) in made.items() if jax.tree.leaves(b)})
  return params, buffers


def _plan(compiled, frozen: Params, params: AdapterParams, buffers: Buffers) -> Plan:
  """``TreeAdapter.plan``: the weight entries checked against ``frozen``, then
  every other entry as a hook point the rules select."""
  weights = _weight_adapters(compiled, frozen)
  given_params, given_buffers = entries(params), entries(buffers)
  flat = paths.flatten(frozen)
  expected = jax.eval_shape(
    functools.partial(_init_weights, chosen=weights),
    jax.random.key(0),
    {n: flat[n] for n in weights},
  )
  subset = lambda tree: {n: tree[n] for n in tree if n in weights}
  _check_fits(
    'parameters', {n: p for n, (p, _) in expected.items()}, subset(given_params)
  )
  _check_fits(
    'buffers',
    {n: b for n, (_, b) in expected.items() if jax.tree.leaves(b)},
    subset(given_buffers),
  )
  weight_plan = {
    name: Entry(adapter, given_params[name], given_buffers.get(name))
    for name, adapter in weights.items()
  }
  shared.check_used(given_params, compiled)
  hook_names = {
    n: None for n in given_params if n not in weights and not shared.is_shared(n)
  }
  points = assign(compiled, frozen, hook_names, strict=False)[1]
  hook_plan = {}
  for name in hook_names:
    rule = points.get(name)
    if rule is None or rule.adapter is None:
      raise PeftError(
        f'adapter parameters hold an entry at {name!r}, which is neither an '
        'adapted leaf of this frozen tree nor a hook point these rules select'
      )
    params = shared.derived(rule, name, given_params[name], given_params, compiled)
    hook_plan[name] = Entry(rule.adapter, params, given_buffers.get(name))
  return Plan(weight_plan, hook_plan)


def _map_weights(plan: Callable, fn: Callable, frozen: Params, params, buffers):
  """``frozen`` with ``fn(entry, w)`` at every adapted leaf."""
  chosen = plan(frozen, params, buffers).weights

  def visit(name, w):
    if name not in chosen:
      return w
    return with_name(name, fn, chosen[name], quantization.values(w))

  return paths.map_named(visit, frozen)


def _apply_entry(entry: Entry, w):
  if entry.adapter.apply is None:
    raise PeftError(
      f'{entry.adapter.name or "this method"} has no weight-space form; run '
      'the model through peft_jax.adapted(adapter, fn)'
    )
  return entry.adapter.apply(w, entry.params, entry.buffers)


def _unapply_entry(entry: Entry, w):
  """``unapply`` of one leaf; with values at hand, raises where it turned
  finite merged entries non-finite (one reduction)."""
  frozen = entry.adapter.unapply(w, entry.params, entry.buffers)
  if not (checks.concrete(w) and checks.concrete(frozen)):
    return frozen
  bad = int(jnp.sum(~jnp.isfinite(frozen) & jnp.isfinite(w)))
  if bad:
    raise PeftError(
      f'cannot unmerge: undoing {_method(entry.adapter)} gives {bad} non-finite '
      'entries where the merged weight is finite (expected an invertible '
      'update; e.g. its scale has zeros)'
    )
  return frozen


def _regularize(plan: Callable, reduction: str, frozen: Params, params, buffers):
  """The sum, or the mean, of the penalty terms of every adapted matrix."""
  flat = paths.flatten(frozen)
  terms = [
    jnp.ravel(
      e.adapter.regularizer(quantization.values(flat[name]), e.params, e.buffers)
    )
    for name, e in plan(frozen, params, buffers).weights.items()
    if e.adapter.regularizer is not None
  ]
  total = functools.reduce(jnp.add, [jnp.sum(t) for t in terms], jnp.zeros(()))
  if reduction == 'sum':
    return total
  return total / max(sum(t.size for t in terms), 1)


def _check_disjoint(frozen: Params, made: Mapping[str, object]) -> None:
  """Hook-point names must not collide with leaf names or their prefixes."""
  leaves = set(paths.flatten(frozen))
  prefixes = {
    paths.SEPARATOR.join(n.split(paths.SEPARATOR)[:i])
    for n in leaves | set(made)
    for i in range(1, n.count(paths.SEPARATOR) + 1)
  }
  for name in made:
    if name in prefixes:
      raise PeftError(
        f'{name!r} is both an adapted name and a prefix of another name; rename '
        'the hook point or the module'
      )


def merge(adapter: TreeAdapter, frozen: Params, params, buffers=None) -> Params:
  """The merged weights ``apply(frozen, params, buffers)``, for plain inference.

  Raises if a chosen method has no weight-space form or acts on activations.
  """
  if not adapter.mergeable:
    raise PeftError(
      f'not mergeable: {_modules(adapter.plan(frozen, params, buffers))} stay as '
      'modules; run the model through peft_jax.adapted'
    )
  return adapter.apply(frozen, params, buffers)


def _modules(plan: Plan) -> str:
  """What ``merge`` cannot fold, by method: ``'prefix_tuning at 2 hook points
  (a, b); parallel_adapter at 1 leaf (c)'``."""
  found: dict[tuple[str, str], list[str]] = {}
  for kind, chosen in (('hook point', plan.hooks), ('leaf', plan.weights)):
    for name, entry in chosen.items():
      if kind == 'leaf' and entry.adapter.mergeable:
        continue
      method = (entry.adapter.name or 'a hand-built adapter').split('(')[0]
      found.setdefault((method, kind), []).append(name)
  parts = []
  for (method, kind), names in found.items():
    shown = ', '.join(names[:2]) + (', ...' if len(names) > 2 else '')
    label = kind if len(names) == 1 else {'leaf': 'leaves'}.get(kind, kind + 's')
    parts.append(f'{method} at {len(names)} {label} ({shown})')
  return '; '.join(parts)


def unmerge(adapter: TreeAdapter, merged: Params, params, buffers=None) -> Params:
  """Recovers the frozen weights from merged ones: ``unapply(merged, ...)``.

  With values at hand (not traced), raises at the first leaf where undoing
  the update turns finite merged entries non-finite (an (IA)³ scale of 0
  cannot be divided out) instead of returning them (``_unapply_entry``).
  """
  if adapter.unapply is None:
    raise PeftError(
      f'{adapter.name} is not invertible: some chosen method has no unapply '
      '(e.g. full or bitfit replace the weight)'
    )
  return adapter.unapply(merged, params, buffers)


def count(params: AdapterParams) -> int:
  """The number of trainable scalars in ``params``."""
  return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))


def describe(
  rules: Sequence[Rule],
  params: Params,
  hooks: Mapping[str, HookPoint] | None = None,
  *,
  strict: bool = True,
  print_fn: Callable[[str], None] = print,
) -> None:
  """Prints a table of every leaf and hook point with the guide's three counts.

  Columns: name, shape, method, ``trainable`` (the method's parameters),
  ``changed`` (entries of the leaf its update can change) and ``rank`` (the
  rank of that update, per layer for stacked leaves). ``changed`` and
  ``rank`` are measured, not declared: the method is initialised on the
  leaf, its parameters are replaced by random normal values and
  ``Δ = apply(w, θ) − w`` is inspected (so LoRA shows ``d_in·d_out`` changed
  at rank ``r``, ``sparse`` shows ``k`` changed). Activation adapters and
  methods with no weight-space form show ``-``. Methods are shown by their
  spec without default arguments (``lora(rank=2)``); ``adapter.name`` holds
  the full canonical spec.

  Args:
    rules: as for ``by_rules``.
    params: the frozen parameter tree.
    hooks: the model's hook points (``peft_jax.hook_points``), if any.
    strict: as for ``by_rules``.
    print_fn: where the table goes (``print``, ``logging.info``, ...).
  """
  compiled = compile_rules(rules)
  weights, points = assign(compiled, params, hooks, strict=strict)
  rows, trainable, changed, total = [], 0, 0, 0
  named = [(n, leaf, weights, None) for n, leaf in paths.named_leaves(params)]
  named += [(n, p.value, points, p) for n, p in (hooks or {}).items()]
  for name, value, assigned, point in named:
    rule = assigned.get(name)
    adapter = rule.adapter if rule else None
    n, counts = 0, ('0', '-')
    if adapter is not None and point is None:
      w = quantization.values(value)
      n = count(jax.eval_shape(adapter.init, jax.random.key(0), w)[0])
      counts = _update_counts(adapter, leaf_key(jax.random.key(0), name), w)
    elif adapter is not None:
      init = functools.partial(_init_stacked, adapter.init, stack=point.stack)
      n, counts = count(jax.eval_shape(init, jax.random.key(0), value)[0]), ('-', '-')
    if point is None:
      total += int(np.size(value))
    trainable += n
    changed += int(counts[0].replace(',', '')) if counts[0] != '-' else 0
    shape = tuple(np.shape(value)) if point is None else _point_shape(point)
    if adapter is not None:
      method = registry.brief(adapter.name) if adapter.name else 'hand-built'
    else:
      method = 'frozen (rule)' if rule else '-'
    rows.append((name, str(shape), method, f'{n:,}', *counts))
  values = {name: hooks[name].value for name in points}
  copies = jax.eval_shape(
    lambda key: shared.init(key, compiled, points, values), jax.random.key(0)
  )
  by_key = {v: compiled[i] for i, v in shared.keys(compiled).items()}
  for name, params in copies.items():
    adapter = by_key[name.split(paths.SEPARATOR, 1)[1]].adapter
    method = registry.brief(adapter.name) if adapter.name else 'hand-built'
    rows.append((name, '(shared)', method, f'{count(params):,}', '-', '-'))
    trainable += count(params)
  print_fn(_table(rows, trainable, changed, total))


def _update_counts(adapter: Adapter, key: Array, w: Array) -> tuple[str, str]:
  """``(changed, rank)`` of ``apply(w, θ) − w`` for random normal ``θ``."""
  if adapter.apply is None:
    return '-', '-'
  params, buffers = with_name('describe', adapter.init, key, w)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.fold_in(key, 1), max(1, len(leaves)))
  randomized = jax.tree.unflatten(
    treedef,
    [
      jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=False)
    ],
  )
  after = adapter.apply(w, randomized, buffers)
  delta = np.asarray(after, np.float64) - np.asarray(w, np.float64)
  if delta.ndim < 2:
    return f'{np.count_nonzero(delta):,}', '-'
  layers = 1 if adapter.linear is None or adapter.linear.per_layer is None else 2
  in_axes = 1 if adapter.linear is None else adapter.linear.in_axes
  lead = layers - 1
  matrices = delta.reshape(
    *delta.shape[:lead], int(np.prod(delta.shape[lead : lead + in_axes])), -1
  )
  rank = int(np.max(np.linalg.matrix_rank(matrices.astype(np.float32))))
  return f'{np.count_nonzero(delta):,}', str(rank)


def _table(rows: list, trainable: int, changed: int, total: int) -> str:
  header = ('name', 'shape', 'method', 'trainable', 'changed', 'rank')
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  line = lambda r: '  '.join(c.ljust(w) for c, w in zip(r, widths, strict=True))
  lines = [line(header), line(['-' * w for w in widths]), *map(line, rows)]
  share = lambda n: 100.0 * n / max(total, 1)
  lines.append(
    f'trainable {trainable:,} of {total:,} frozen ({share(trainable):.3f}%); '
    f'changed {changed:,} ({share(changed):.3f}%)'
  )
  return '\n'.join(lines)


def _point_shape(point: HookPoint) -> str:
  """``'hook ×12 ((2, 5, 16), (2, 5))'``: layers sharing it, value shapes."""
  leaves, _ = jax.tree.flatten(point.value)  # A NamedTuple value prints as a tuple.
  shapes = [tuple(x.shape) for x in leaves]
  shapes = shapes[0] if not isinstance(point.value, tuple) else tuple(shapes)
  layers = 'x'.join(map(str, point.stack))
  return f'hook {"×" + layers + " " if layers else ""}{shapes}'
