"""Shared machinery of the selection scorers (``peft_jax.selection``).

A scorer reads frozen weights (and data) and returns a *score tree*; ``top_p``
turns it into a *mask tree*. Both are sparse nested dicts keyed like the
frozen tree, holding only the scored leaves: ``float32`` scores and ``bool``
masks of each leaf's shape. Here: choosing the scored leaves (``choose``),
rebuilding the full weight tree around them (``weights_with``), the batch
loop with its progress bar (``run_batches``), curvature estimates by
Hessian-vector products (``hutchinson_diagonal``, ``lambda_max``), and the
masks (``top_p``, ``count``).
"""

import difflib
import fractions
import functools
import itertools
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from peft_jax._src import checks, paths
from peft_jax._src.base import Array, Params, PeftError
from peft_jax._src.rules import compile_pattern

# Which leaves are scored: a regex (``re.fullmatch`` on the leaf name), a list
# of regexes (any may match), a predicate ``(name, leaf) -> bool``, or None
# (every floating leaf).
Where = str | Sequence[str] | Callable[[str, Any], bool] | None
Flat = dict[str, Array]  # {leaf name: array}, in tree order.
ScoreTree = dict[str, Any]  # Sparse nested dict of float32 arrays.
MaskTree = dict[str, Any]  # Sparse nested dict of bool arrays.
SCOPES = ('global', 'per_leaf')


def _is_float(leaf: Any) -> bool:
  dtype = getattr(leaf, 'dtype', None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def _matchers(what: str, where: Where) -> list[tuple[str, Callable[[str, Any], bool]]]:
  """``[(label, matches)]``, one per pattern (or predicate) of ``where``."""
  if where is None:
    return [('None', lambda name, leaf: True)]
  if callable(where):
    label = getattr(where, '__name__', repr(where))
    return [(label, lambda name, leaf: bool(where(name, leaf)))]
  patterns = [where] if isinstance(where, str) else where
  if not (isinstance(patterns, Sequence) and patterns):
    raise PeftError(
      f'{what}: where={where!r} must be a regex, a non-empty list of regexes or '
      'a predicate (name, leaf) -> bool'
    )
  matchers = []
  for pattern in patterns:
    if not isinstance(pattern, str):
      raise PeftError(f'{what}: where holds {pattern!r}; expected regex strings')
    matches = compile_pattern(f'{what}: where=', pattern)
    matchers.append((repr(pattern), matches))
  return matchers


def choose(what: str, frozen: Params, where: Where) -> Flat:
  """``{name: leaf}`` of the floating leaves of ``frozen`` that ``where`` picks.

  Non-floating leaves (integer ids, step counters) are never scored: a regex
  matching one is not an error as long as it matches some floating leaf.
  Every pattern (or the predicate) must match at least one floating leaf.
  """
  leaves = list(paths.named_leaves(frozen))
  floating = [(name, leaf) for name, leaf in leaves if _is_float(leaf)]
  chosen: set[str] = set()
  for label, matches in _matchers(what, where):
    hits = [name for name, leaf in floating if matches(name, leaf)]
    if not hits:
      names = [name for name, _ in floating]
      close = difflib.get_close_matches(label.strip('\'"'), names, n=3, cutoff=0.0)
      raise PeftError(
        f'{what}: where={label} matches no floating leaf; closest names: '
        f'{", ".join(close) or "none (the tree has no floating leaf)"}'
      )
    chosen.update(hits)
  return {name: leaf for name, leaf in floating if name in chosen}


def weights_with(frozen: Params, chosen: Mapping[str, Array]) -> Params:
  """``frozen`` with the leaves named in ``chosen`` replaced (jit-safe)."""
  return paths.map_named(lambda name, w: chosen.get(name, w), frozen)


def pick(frozen: Params, names: Sequence[str]) -> Flat:
  """``{name: leaf}`` of ``frozen`` at ``names`` (inside a trace too)."""
  flat = paths.flatten(frozen)
  return {name: flat[name] for name in names}


def nest(flat: Mapping[str, Array]) -> dict[str, Any]:
  """The sparse nested tree of ``{name: array}``."""
  return paths.nest(dict(flat))


def objective(what: str, loss_fn: Callable) -> Callable:
  """``(chosen, frozen, batch, rng) -> loss``: ``loss_fn`` on the weights
  ``weights_with(frozen, chosen)``, with its output checked at trace time."""

  def fn(chosen: Flat, frozen: Params, batch: Any, rng: Array) -> Array:
    out = loss_fn(weights_with(frozen, chosen), batch, rng)
    if not (isinstance(out, tuple) and len(out) == 2):
      raise PeftError(
        f'{what}: loss_fn returned {type(out).__name__}; expected a pair '
        '(loss, metrics) as make_train_step does'
      )
    loss = out[0]
    if jnp.shape(loss) != ():
      raise PeftError(
        f'{what}: loss_fn returned a loss of shape {jnp.shape(loss)}; expected a scalar'
      )
    return loss

  return fn


def to_f32(tree: Any) -> Any:
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def zeros_f32(chosen: Flat) -> Flat:
  """A ``float32`` accumulator of zeros per chosen leaf.

  Outside a trace call it jitted (one compilation, not one per shape).
  """
  return {name: jnp.zeros(jnp.shape(w), jnp.float32) for name, w in chosen.items()}


def random_like(sample: Callable, key: Array, chosen: Flat) -> Flat:
  """``{name: float32 draws shaped like chosen[name]}`` from one call of
  ``sample(key, shape, dtype)`` over every entry (one generator in the
  compiled program, not one per leaf)."""
  shapes = [jnp.shape(w) for w in chosen.values()]
  sizes = [math.prod(shape) for shape in shapes]
  flat = sample(key, (sum(sizes),), jnp.float32)
  parts = jnp.split(flat, np.cumsum(sizes)[:-1].tolist())
  return {
    name: part.reshape(shape)
    for name, part, shape in zip(chosen, parts, shapes, strict=True)
  }


def peak(tree: Any) -> Array:
  """``max |x|`` over every entry of every leaf (float32 scalar)."""
  leaves = jax.tree.leaves(to_f32(tree))
  return functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x)) for x in leaves])


def run_batches(
  what: str,
  step: Callable[[Any, Any, np.int32], Any],
  carry: Any,
  batches: Iterable,
  *,
  num_batches: int | None,
  progress: bool,
) -> tuple[Any, int]:
  """``carry = step(carry, batch, t)`` for ``t = 0, 1, ...``, with a progress bar.

  Uses the first ``num_batches`` batches (all of them when None). ``t`` is
  passed as ``np.int32`` so a jitted ``step`` is traced once, not per batch.

  Returns:
    ``(carry, T)``, ``T`` the number of batches used.
  """
  total = None
  if num_batches is not None:
    total = checks.positive_int(what, 'num_batches', num_batches)
    batches = itertools.islice(batches, total)
  elif isinstance(batches, Sequence):
    total = len(batches)
  t = 0
  bar = tqdm.tqdm(batches, total=total, desc=what, unit='batch', disable=not progress)
  for batch in bar:
    carry = step(carry, batch, np.int32(t))
    t += 1
  if t == 0:
    raise PeftError(f'{what}: batches is empty; expected at least one batch')
  if total is not None and t < total:
    raise PeftError(f'{what}: batches ran out after {t} of num_batches={total}')
  return carry, t


def check_nonzero(what: str, largest: Array, names: Sequence[str]) -> None:
  """Raises if ``largest``, the peak accumulated ``|gradient|``, is zero."""
  if float(largest) == 0.0:
    raise PeftError(
      f'{what}: the gradient is zero on every scored leaf ({", ".join(names)}); '
      'does loss_fn use its weights argument, and does where pick leaves it uses?'
    )


def _hvp(grad_fn: Callable[[Flat], Flat], chosen: Flat, v: Flat) -> Flat:
  """``H v`` (float32), forward-over-reverse: ``jax.jvp`` of ``grad_fn``."""
  tangents = {name: v[name].astype(w.dtype) for name, w in chosen.items()}
  return to_f32(jax.jvp(grad_fn, (chosen,), (tangents,))[1])


def hutchinson_diagonal(
  grad_fn: Callable[[Flat], Flat], chosen: Flat, key: Array, samples: int
) -> Flat:
  """Hutchinson's estimate of the Hessian diagonal at ``chosen``.

  ``ĥ = (1/k) Σ_j v_j ⊙ (H v_j)`` over ``k = samples`` Rademacher vectors
  ``v_j`` (entries ±1, one per scored entry), an unbiased estimate of
  ``diag(H)``: ``E[v_i (Hv)_i] = Σ_l H_il E[v_i v_l] = H_ii``. Exact for a
  diagonal ``H``. The probes run one after another (``fori_loop``), so memory
  is that of one Hessian-vector product.

  Args:
    grad_fn: ``chosen -> ∇L(chosen)``, a flat dict of gradients.
    chosen: ``{name: w}``, the point (the scored leaves).
    key: PRNG key of the probes.
    samples: ``k``.

  Returns:
    ``{name: ĥ}``, float32 arrays shaped like ``chosen``.
  """
  names = list(chosen)

  def body(j, total):
    v = random_like(jax.random.rademacher, jax.random.fold_in(key, j), chosen)
    hv = _hvp(grad_fn, chosen, v)
    return {name: total[name] + v[name] * hv[name] for name in names}

  total = jax.lax.fori_loop(0, samples, body, zeros_f32(chosen))
  return {name: x / samples for name, x in total.items()}


def lambda_max(
  grad_fn: Callable[[Flat], Flat], chosen: Flat, key: Array, iterations: int
) -> Array:
  """``|λ_max|``, the largest-magnitude eigenvalue of the Hessian at ``chosen``.

  Power iteration ``v ← Hv / ‖Hv‖`` from a Gaussian start, ``iterations``
  Hessian-vector products, then the Rayleigh quotient ``|vᵀHv|`` (one more
  product). The error falls like ``(λ₂/λ₁)^(2·iterations)``.

  Returns:
    A float32 scalar (0 where ``H = 0``).
  """
  names = list(chosen)
  start = random_like(jax.random.normal, key, chosen)

  def normalize(v):
    norm = jnp.maximum(optax.tree.norm(v), jnp.finfo(jnp.float32).tiny)
    return jax.tree.map(lambda x: x / norm, v)

  body = lambda _, v: normalize(_hvp(grad_fn, chosen, v))
  v = jax.lax.fori_loop(0, iterations, body, normalize(start))
  hv = _hvp(grad_fn, chosen, v)
  return jnp.abs(sum(jnp.vdot(v[name], hv[name]) for name in names))


def _flat_scores(scores: Any) -> dict[str, np.ndarray]:
  if not isinstance(scores, Mapping):
    raise PeftError(
      f'top_p: scores is {type(scores).__name__}; expected a score tree (a '
      'nested dict of arrays, as the scorers of peft_jax.selection return)'
    )
  flat = {name: np.asarray(x, np.float32) for name, x in paths.named_leaves(scores)}
  if not flat:
    raise PeftError('top_p: scores is empty; expected at least one scored leaf')
  for name, x in flat.items():
    if np.isnan(x).any():
      raise PeftError(f'top_p: the scores at {name!r} hold NaN')
  return flat


def _floor_share(p: float, n: int) -> int:
  """``⌊p·n⌋``, with ``p`` read as the decimal it prints as.

  In floats ``0.29 * 100`` is ``28.999999999999996``; the fraction
  ``29/100`` gives the intended 29.
  """
  return math.floor(fractions.Fraction(str(p)) * n)


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
  """A bool mask of exactly ``k`` largest entries of ``x`` (ties arbitrary)."""
  mask = np.zeros(x.size, bool)
  if k:
    mask[np.argpartition(-x.ravel(), k - 1)[:k]] = True
  return mask.reshape(x.shape)


def top_p(scores: ScoreTree, p: float, *, scope: str = 'global') -> MaskTree:
  """The mask of the top-scoring share ``p`` of the scored entries.

  ``scope='global'`` (the SAM paper's ``‖M‖₀ = ⌊p·m⌋``): exactly
  ``k = ⌊p·m⌋`` True entries over all scored leaves together, ``m`` the
  total number of scored entries. ``scope='per_leaf'`` (the released SAM
  code): exactly ``⌊p·size⌋`` True entries in each leaf. Ties are broken
  arbitrarily, so the count is always exact. Runs on the host (numpy).

  Args:
    scores: a score tree (sparse nested dict of arrays).
    p: the share to keep, in ``(0, 1]``.
    scope: ``'global'`` or ``'per_leaf'``.

  Returns:
    A mask tree: the same keys, a bool array of each leaf's shape.

  Example:
    >>> import jax.numpy as jnp
    >>> from peft_jax import selection
    >>> scores = {'w': jnp.array([[3.0, 1.0], [4.0, 2.0]]), 'b': jnp.array([0.5, 5])}
    >>> mask = selection.top_p(scores, 0.5)
    >>> selection.count(mask), mask['b'].tolist()
    (3, [False, True])
  """
  if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
    raise PeftError(f'top_p: p={p!r} must be a share in (0, 1]')
  if scope not in SCOPES:
    raise PeftError(f'top_p: scope={scope!r} is not one of {SCOPES}')
  flat = _flat_scores(scores)
  if scope == 'per_leaf':
    masks = {name: _top_k(x, _floor_share(p, x.size)) for name, x in flat.items()}
  else:
    sizes = [x.size for x in flat.values()]
    joined = np.concatenate([x.ravel() for x in flat.values()])
    chosen = np.split(_top_k(joined, _floor_share(p, joined.size)), np.cumsum(sizes))
    masks = {
      name: m.reshape(x.shape)
      for (name, x), m in zip(flat.items(), chosen[:-1], strict=True)
    }
  if not any(m.any() for m in masks.values()):
    total = sum(x.size for x in flat.values())
    raise PeftError(
      f'top_p: p={p!r} selects no entry of {total} scored entries '
      f'(scope={scope!r}); raise p'
    )
  return nest({name: jnp.asarray(m) for name, m in masks.items()})


def count(mask: MaskTree) -> int:
  """The number of True entries of a mask tree."""
  return sum(int(np.count_nonzero(np.asarray(m))) for m in jax.tree.leaves(mask))
