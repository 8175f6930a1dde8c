"""What the training-time schedules share: phases, governed leaves, moments."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src import checks, paths
from peft_jax._src.base import AdapterParams, Array, Entry, PeftError, TreeAdapter


def non_negative_int(schedule: str, name: str, value) -> int:
  """``value`` if it is an int >= 0 (bools rejected)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise PeftError(
      f'{schedule}: {name}={value!r} must be an int, got {type(value).__name__}'
    )
  if value < 0:
    raise PeftError(f'{schedule}: {name}={value} must be >= 0')
  return int(value)


def phases(
  schedule: str, total_steps, init_warmup, final_warmup
) -> tuple[int, int, int]:
  """Validated ``(T, t_i, t_f)``: warm-up, then the active phase, then the final."""
  total = checks.positive_int(schedule, 'total_steps', total_steps)
  t_i = non_negative_int(schedule, 'init_warmup', init_warmup)
  t_f = non_negative_int(schedule, 'final_warmup', final_warmup)
  if total - t_f - t_i <= 0:
    raise PeftError(
      f'{schedule}: total_steps={total} must exceed init_warmup + final_warmup '
      f'= {t_i + t_f}'
    )
  return total, t_i, t_f


def governed(
  schedule: str,
  adapter: TreeAdapter,
  frozen,
  params: AdapterParams,
  buffers,
  params_type: type,
) -> dict[str, Entry]:
  """``{leaf name: Entry}`` of the leaves whose parameters are ``params_type``.

  The type identifies the method whatever wraps it (``mpc``, ``stacked``,
  ``matrix_view``, a hand-built copy), so rules may mix methods. Under
  ``stacked`` the entry's arrays carry leading layer axes.

  Raises:
    PeftError: if ``adapter`` is not tree-level or no leaf has such parameters.
  """
  if not isinstance(adapter, TreeAdapter):
    raise PeftError(
      f'{schedule}: needs a tree-level adapter such as by_rules(...); got '
      f'{type(adapter).__name__}'
    )
  chosen = {
    name: entry
    for name, entry in adapter.plan(frozen, params, buffers).weights.items()
    if isinstance(entry.params, params_type)
  }
  if not chosen:
    raise PeftError(
      f'{schedule}: no leaf of {adapter.name} has {params_type.__name__} parameters'
    )
  return chosen


def reset_moments(opt_state, params: AdapterParams, touched: dict[str, Array]):
  """``opt_state`` with the ``touched`` entries of its per-parameter trees zeroed.

  Every subtree of ``opt_state`` with the tree structure of ``params`` is
  taken for per-parameter state: in optax, ``mu``/``nu`` of ``adam``,
  ``adamw``, ``nadam``, ``adabelief``, ``nu_max`` of ``amsgrad``, ``mu`` of
  ``lion``, ``trace`` of ``sgd(momentum=...)``, ``nu`` of ``rmsprop``. Scalars
  (Adam's ``count``) and state of other shapes (``adafactor``'s factored
  moments) are left alone. Optimizers whose params-shaped state is not a
  moment (``lookahead``'s slow weights, schedule-free's ``z``, EMA copies of
  the parameters) would have those entries zeroed too: do not combine them
  with prune/grow.

  Args:
    opt_state: any optax state.
    params: the parameters the state was built for.
    touched: ``{params leaf name: bool mask broadcastable to that leaf}``.
  """
  structure = jax.tree.structure(params)
  per_parameter = lambda node: jax.tree.structure(node) == structure

  def reset(name, x):
    if name not in touched:
      return x
    return jnp.where(touched[name], jnp.zeros_like(x), x)

  return jax.tree.map(
    lambda node: paths.map_named(reset, node) if per_parameter(node) else node,
    opt_state,
    is_leaf=per_parameter,
  )


def top_k_mask(score: Array, k: Array) -> Array:
  """A bool mask with exactly ``k`` entries set per slice: the largest ``score``.

  ``score: (*lead, ...)`` with ``lead = k.shape`` (``()`` for a plain leaf,
  ``(L,)`` under ``stacked``): slice ``i`` keeps its ``k[i]`` largest entries,
  ties going to the lower flat (row-major) index. ``k`` may be traced.
  """
  n = math.prod(k.shape)
  flat = jnp.reshape(score.astype(jnp.float32), (n, -1))
  order = jnp.argsort(-flat, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1)
  return jnp.reshape(rank < jnp.reshape(k, (n, 1)), score.shape)


def stateless_lookup(schedule: str, adapter: TreeAdapter, params_type: type):
  """``(leaves, init)`` of a schedule with no state of its own.

  ``leaves(frozen, params, buffers)`` is ``governed(...)`` for
  ``params_type``; ``init`` checks that some leaf is governed and returns
  the empty state ``()``.
  """

  def leaves(frozen, params, buffers) -> dict[str, Entry]:
    return governed(schedule, adapter, frozen, params, buffers, params_type)

  def init(frozen, params, buffers):
    leaves(frozen, params, buffers)
    return ()

  return leaves, init
