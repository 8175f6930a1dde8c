"""FlexLoRA's entropy-guided prune/grow of rank across the ``flexlora`` leaves."""

import jax
import jax.numpy as jnp

from peft_jax._src import checks, paths
from peft_jax._src.base import (
  BUFFERS,
  Adapter,
  AdapterParams,
  Array,
  Schedule,
)
from peft_jax.schedules.adalora import (
  governed,
  non_negative_int,
  phases,
  replace_subtrees,
)

PRUNE_BY = ('signed', 'abs')


def entropy(e: Array, active: Array) -> Array:
  """The normalised spectral-energy entropy of one leaf, a float32 scalar.

  ``H = −Σ p_i log(p_i + 1e-8) / log r`` with ``p_i = e_i²/Σ_j e_j²`` over
  the active slots and ``r`` their number. For ``r <= 1`` the division by
  ``log r`` is skipped (the code divides by ``log 1 = 0``); an all-zero ``e``
  has ``p = 0`` and ``H = 0`` (the code's ``0/0``).
  """
  active = active.astype(jnp.float32)
  energy = jnp.square(e.astype(jnp.float32)) * active
  total = jnp.sum(energy)
  p = energy / jnp.where(total > 0, total, 1.0)
  h = -jnp.sum(p * jnp.log(p + 1e-8))
  r = jnp.sum(active)
  return h / jnp.where(r > 1, jnp.log(jnp.maximum(r, 1.0)), 1.0)


def cubic_budget(
  step, *, budget: int, total_steps: int, init_warmup: int, final_warmup: int
) -> Array:
  """``round(b0 · (1 − p³))``, ``p = clip((t − t_i)/(T − t_f − t_i), 0, 1)`` (int32)."""
  span = total_steps - final_warmup - init_warmup
  progress = jnp.clip((jnp.asarray(step, jnp.float32) - init_warmup) / span, 0, 1)
  return jnp.round(budget * (1 - progress**3)).astype(jnp.int32)


def reset_moments(opt_state, theta: AdapterParams, touched: dict[str, Array]):
  """``opt_state`` with the ``touched`` entries of its per-parameter trees zeroed.

  Every subtree of ``opt_state`` with the tree structure of ``theta`` is
  taken for per-parameter state: in optax, ``mu``/``nu`` of ``adam``,
  ``adamw``, ``nadam``, ``adabelief``, ``nu_max`` of ``amsgrad``, ``mu`` of
  ``lion``, ``trace`` of ``sgd(momentum=...)``, ``nu`` of ``rmsprop``. Scalars
  (Adam's ``count``) and state of other shapes (``adafactor``'s factored
  moments) are left alone. Optimizers whose theta-shaped state is not a
  moment (``lookahead``'s slow weights, schedule-free's ``z``, EMA copies of
  the parameters) would have those entries zeroed too: do not combine them
  with prune/grow.

  Args:
    opt_state: any optax state.
    theta: the parameters the state was built for.
    touched: ``{theta leaf name: bool mask broadcastable to that leaf}``.
  """
  structure = jax.tree.structure(theta)
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


def prune_and_grow(theta, prune: Array, grow: Array, key: Array, prune_by: str):
  """One leaf's event: drop one active slot if ``prune``, activate one if ``grow``.

  The dropped slot is the active one with the smallest ``e`` (signed, the
  code's ``argmin``, or ``|e|``); it is masked, its values are left as they
  are. A grown slot is the first inactive one (possibly the slot just
  dropped): ``a[:, i] ~ N(0, 1)``, ``b[i] ~ N(0, 1)``, ``e_i = 0``, so
  ``w'`` is unchanged (zero-impact). Returns ``(theta, touched)``,
  ``touched: (R,)`` the dropped and grown slots.
  """
  active = theta[BUFFERS]['active']
  e = theta['e']
  slots = jnp.arange(e.shape[0])
  value = e.astype(jnp.float32)
  value = jnp.abs(value) if prune_by == 'abs' else value
  dropped = prune & (slots == jnp.argmin(jnp.where(active > 0, value, jnp.inf)))
  active = jnp.where(dropped, 0, active)
  grown = grow & (slots == jnp.argmin(active))
  active = jnp.where(grown, 1, active)
  key_a, key_b = jax.random.split(key)
  a, b = theta['a'], theta['b']
  new_a = jax.random.normal(key_a, (a.shape[0], 1), a.dtype)
  new_b = jax.random.normal(key_b, (1, b.shape[1]), b.dtype)
  theta = {
    **theta,
    'a': jnp.where(grown, new_a, a),
    'b': jnp.where(grown[:, None], new_b, b),
    'e': jnp.where(grown, jnp.zeros_like(e), e),
    BUFFERS: {**theta[BUFFERS], 'active': active},
  }
  return theta, dropped | grown


def positions(keys: Array) -> Array:
  """The position of each entry in the stable ascending order of ``keys``."""
  return jnp.argsort(jnp.argsort(keys))


def flexlora_schedule(
  adapter: Adapter,
  *,
  total_steps: int,
  init_warmup: int,
  final_warmup: int,
  interval: int,
  budget: int = 4,
  cubic: bool = False,
  prune_by: str = 'signed',
  seed: int = 0,
) -> Schedule:
  """FlexLoRA's rank reallocation over the ``flexlora`` leaves of ``adapter``.

  An event is an update ``t`` (optimizer updates done) with
  ``t_i < t < T − t_f`` and ``(t − t_i) mod Δ = 0``. At an event, with
  ``H`` the ``entropy`` of every governed leaf and ``r`` its active rank:

  * ``k = min(b, #{r > 1}, #{1 < r < R})`` with ``b = budget`` (or, with
    ``cubic``, ``cubic_budget``; no event when it is 0);
  * prune: the ``k`` leaves with ``r > 1`` and the lowest ``H`` drop their
    smallest-``e`` slot (``prune_by='signed'``, the code's ``argmin e``;
    ``'abs'`` for the paper's "energy" reading: the spec notes the ambiguity);
  * grow: the ``k`` leaves with ``1 < r < R`` (a free slot; ``r = 1`` leaves
    never grow, as in the code, whose ``H`` is ``−inf`` there) and the
    highest ``H`` activate a free slot, zero-impact (``prune_and_grow``);
    the new ``a``/``b`` values come from ``seed``, the step and the leaf.

  Both sets have ``k`` leaves, so the total active rank is conserved (a
  leaf may be in both). Ties in ``H`` go to the leaf earlier in tree order.

  Unlike the reference trainer (PR #12, spec §3.2 pitfall 4), which rebuilds
  AdamW after every event and so loses every moment, the optimizer state is
  kept: only the moments of the dropped and grown slots (their ``a``
  column, ``b`` row and ``e`` entry) are zeroed (``reset_moments``), so
  dropped slots stop drifting and grown ones start fresh. Adam's step count
  stays global, so a grown slot's first updates are not bias-corrected as a
  new optimizer's would be (up to ``(1−β1)/√(1−β2) ≈ 3×`` the learning rate
  for ``β = (0.9, 0.999)``).

  Args:
    adapter: a tree-level adapter (``by_rules``) with ``flexlora`` leaves.
    total_steps: ``T``, the number of optimizer updates of the run.
    init_warmup: ``t_i >= 0``.
    final_warmup: ``t_f >= 0``; ``T − t_f − t_i`` must be > 0.
    interval: ``Δ > 0``, updates between events.
    budget: ``b0 > 0``, leaves pruned (and grown) per event.
    cubic: decay the budget as ``round(b0 (1 − p³))`` (off by default).
    prune_by: ``'signed'`` (default, the code) or ``'abs'``.
    seed: the seed of the grown slots' random ``a`` and ``b`` values.

  Returns:
    The ``Schedule`` (its state is ``()``).
  """
  name = 'flexlora_schedule'
  total, t_i, t_f = phases(name, total_steps, init_warmup, final_warmup)
  every = checks.positive_int(name, 'interval', interval)
  b0 = checks.positive_int(name, 'budget', budget)
  cubic = checks.flag(name, 'cubic', cubic)
  checks.choice(name, 'prune_by', prune_by, PRUNE_BY)
  seed = non_negative_int(name, 'seed', seed)

  def init(frozen, theta):
    governed(name, adapter, frozen, theta, 'flexlora')
    return ()

  def event(frozen, theta, opt_state, step, k_max):
    chosen = governed(name, adapter, frozen, theta, 'flexlora')
    leaves = [leaf_theta for _, leaf_theta in chosen.values()]
    h = jnp.stack([entropy(t['e'], t[BUFFERS]['active']) for t in leaves])
    r = jnp.stack([jnp.sum(t[BUFFERS]['active']) for t in leaves])
    capacity = jnp.array([t['e'].shape[0] for t in leaves], jnp.float32)
    prunable = r > 1
    growable = prunable & (r < capacity)
    k = jnp.minimum(k_max, jnp.minimum(jnp.sum(prunable), jnp.sum(growable)))
    prune = prunable & (positions(jnp.where(prunable, h, jnp.inf)) < k)
    grow = growable & (positions(jnp.where(growable, -h, jnp.inf)) < k)
    key = jax.random.fold_in(jax.random.key(seed), step)
    updated, touched = {}, {}
    for i, (leaf, leaf_theta) in enumerate(zip(chosen, leaves, strict=True)):
      updated[leaf], slots = prune_and_grow(
        leaf_theta, prune[i], grow[i], jax.random.fold_in(key, i), prune_by
      )
      touched.update(
        {f'{leaf}/a': slots[None, :], f'{leaf}/b': slots[:, None], f'{leaf}/e': slots}
      )
    theta = replace_subtrees(theta, updated)
    return theta, reset_moments(opt_state, theta, touched)

  def update(state, frozen, theta, grads, opt_state, step):
    del grads
    if cubic:
      k_max = cubic_budget(
        step, budget=b0, total_steps=total, init_warmup=t_i, final_warmup=t_f
      )
    else:
      k_max = jnp.asarray(b0, jnp.int32)
    is_event = (
      (step > t_i) & (step < total - t_f) & ((step - t_i) % every == 0) & (k_max > 0)
    )
    theta, opt_state = jax.lax.cond(
      is_event,
      lambda t, o: event(frozen, t, o, step, k_max),
      lambda t, o: (t, o),
      theta,
      opt_state,
    )
    return theta, opt_state, state

  return Schedule(init=init, update=update)
