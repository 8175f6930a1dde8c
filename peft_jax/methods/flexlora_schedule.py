"""FlexLoRA's entropy-guided prune/grow of rank across the ``flexlora`` leaves."""

import functools
import math

import jax
import jax.numpy as jnp

from peft_jax._src import checks, paths
from peft_jax._src.base import Array, Entry, Schedule, TreeAdapter
from peft_jax._src.schedules import governed, non_negative_int, phases, reset_moments
from peft_jax.methods.flexlora import FlexLoraBuffers, FlexLoraParams

PRUNE_BY = ('signed', 'abs')


def entropy(e: Array, active: Array) -> Array:
  """The normalised spectral-energy entropy of one matrix, a float32 scalar.

  ``H = −Σ p_i log(p_i + 1e-8) / log r`` with ``p_i = e_i²/Σ_j e_j²`` over
  the active slots and ``r`` their number. For ``r <= 1`` the division by
  ``log r`` is skipped (the code divides by ``log 1 = 0``); an all-zero ``e``
  has ``p = 0`` and ``H = 0`` (the code's ``0/0``).

  Args:
    e: ``(R,)``, the slots' singular values.
    active: ``(R,)`` bool.
  """
  mask = active.astype(jnp.float32)
  energy = jnp.square(e.astype(jnp.float32)) * mask
  total = jnp.sum(energy)
  p = energy / jnp.where(total > 0, total, 1.0)
  h = -jnp.sum(p * jnp.log(p + 1e-8))
  r = jnp.sum(mask)
  return h / jnp.where(r > 1, jnp.log(jnp.maximum(r, 1.0)), 1.0)


def cubic_budget(
  step, *, budget: int, total_steps: int, init_warmup: int, final_warmup: int
) -> Array:
  """``round(b0 · (1 − p³))``, ``p = clip((t − t_i)/(T − t_f − t_i), 0, 1)`` (int32)."""
  span = total_steps - final_warmup - init_warmup
  progress = jnp.clip((jnp.asarray(step, jnp.float32) - init_warmup) / span, 0, 1)
  return jnp.round(budget * (1 - progress**3)).astype(jnp.int32)


def prune_and_grow(
  params: FlexLoraParams,
  active: Array,
  prune: Array,
  grow: Array,
  key: Array,
  prune_by: str,
) -> tuple[FlexLoraParams, Array, Array]:
  """One matrix's event: drop one active slot if ``prune``, activate one if ``grow``.

  The dropped slot is the active one with the smallest ``e`` (signed, the
  code's ``argmin``, or ``|e|``); it is masked, its values are left as they
  are. A grown slot is the first inactive one (possibly the slot just
  dropped): ``a[:, i] ~ N(0, 1)``, ``b[i] ~ N(0, 1)``, ``e_i = 0``, so
  ``w'`` is unchanged (zero-impact).

  Args:
    params: one matrix's ``a: (d_in, R)``, ``b: (R, d_out)``, ``e: (R,)``.
    active: ``(R,)`` bool.
    prune: a bool scalar.
    grow: a bool scalar.
    key: the PRNG key of the grown slot's values.
    prune_by: ``'signed'`` or ``'abs'``.

  Returns:
    ``(params, active, touched)``, ``touched: (R,)`` bool, the dropped and
    grown slots.
  """
  e = params.e
  slots = jnp.arange(e.shape[0])
  value = e.astype(jnp.float32)
  value = jnp.abs(value) if prune_by == 'abs' else value
  dropped = prune & (slots == jnp.argmin(jnp.where(active, value, jnp.inf)))
  active = active & ~dropped
  grown = grow & (slots == jnp.argmin(active))
  active = active | grown
  key_a, key_b = jax.random.split(key)
  a, b = params.a, params.b
  new_a = jax.random.normal(key_a, (a.shape[0], 1), a.dtype)
  new_b = jax.random.normal(key_b, (1, b.shape[1]), b.dtype)
  params = FlexLoraParams(
    a=jnp.where(grown, new_a, a),
    b=jnp.where(grown[:, None], new_b, b),
    e=jnp.where(grown, jnp.zeros_like(e), e),
  )
  return params, active, dropped | grown


def matrices(entry: Entry) -> tuple[FlexLoraParams, Array]:
  """One leaf's parameters and active mask with its layer axes flattened.

  Returns ``(params, active)`` with ``a: (n, d_in, R)``, ``b: (n, R, d_out)``,
  ``e: (n, R)``, ``active: (n, R)``; ``n = 1`` for a plain leaf, the number
  of layers under ``stacked``.
  """
  active = entry.buffers.active
  lead = active.ndim - 1
  n = math.prod(active.shape[:lead])
  params = jax.tree.map(lambda x: jnp.reshape(x, (n, *x.shape[lead:])), entry.params)
  return params, jnp.reshape(active, (n, active.shape[-1]))


def positions(keys: Array) -> Array:
  """The position of each entry in the stable ascending order of ``keys``."""
  return jnp.argsort(jnp.argsort(keys))


def event_budget(
  step, budget: int, cubic: bool, timeline: tuple[int, int, int], interval: int
) -> Array:
  """``k_max`` at update ``t = step``: the event's budget, 0 when no event (int32).

  ``b0 = budget`` (``cubic_budget`` with ``cubic``) when ``t_i < t < T − t_f``
  and ``(t − t_i) mod Δ = 0``, 0 otherwise; ``timeline = (T, t_i, t_f)``,
  ``Δ = interval``.
  """
  total, t_i, t_f = timeline
  if cubic:
    k_max = cubic_budget(
      step, budget=budget, total_steps=total, init_warmup=t_i, final_warmup=t_f
    )
  else:
    k_max = jnp.asarray(budget, jnp.int32)
  on_event = (step > t_i) & (step < total - t_f) & ((step - t_i) % interval == 0)
  return jnp.where(on_event, k_max, 0)


def choose(
  flat: dict[str, tuple[FlexLoraParams, Array]], k_max: Array
) -> tuple[Array, Array]:
  """``(prune, grow)``: ``(n,)`` bool masks over all ``n`` governed matrices.

  ``flat`` maps each leaf to its ``matrices``, taken in order. With ``H``
  the ``entropy``, ``r`` the active rank and ``R`` the slots of each matrix,
  ``k = min(k_max, #{r > 1}, #{1 < r < R})``; ``prune`` marks the ``k``
  matrices with ``r > 1`` and the lowest ``H``, ``grow`` the ``k`` with
  ``1 < r < R`` and the highest ``H``, ties to the earlier matrix.
  """
  h = jnp.concatenate([jax.vmap(entropy)(p.e, m) for p, m in flat.values()])
  r = jnp.concatenate([jnp.sum(m, axis=-1) for _, m in flat.values()])
  capacity = jnp.concatenate(
    [jnp.full(m.shape[0], m.shape[1]) for _, m in flat.values()]
  )
  prunable = r > 1
  growable = prunable & (r < capacity)
  k = jnp.minimum(k_max, jnp.minimum(jnp.sum(prunable), jnp.sum(growable)))
  prune = prunable & (positions(jnp.where(prunable, h, jnp.inf)) < k)
  grow = growable & (positions(jnp.where(growable, -h, jnp.inf)) < k)
  return prune, grow


def leaf_events(
  chosen: dict[str, Entry],
  flat: dict[str, tuple[FlexLoraParams, Array]],
  prune: Array,
  grow: Array,
  key: Array,
  prune_by: str,
) -> tuple[dict, dict, dict]:
  """``prune_and_grow`` on every governed matrix, back in each leaf's layout.

  Matrix ``i`` (in the order of ``flat``, as ``prune``/``grow: (n,)``) draws
  its grown values from ``fold_in(key, i)``. Returns ``(params, buffers,
  touched)``: ``{leaf: FlexLoraParams}``, ``{leaf: FlexLoraBuffers}`` and
  ``{'leaf/a' | 'leaf/b' | 'leaf/e': bool mask}`` of the dropped and grown
  slots, broadcastable to ``a``, ``b``, ``e`` (for ``reset_moments``).
  """
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(prune.size))
  one_matrix = jax.vmap(functools.partial(prune_and_grow, prune_by=prune_by))
  new_params, new_buffers, touched = {}, {}, {}
  start = 0
  for leaf, (leaf_params, leaf_active) in flat.items():
    span = slice(start, start + leaf_active.shape[0])
    start = span.stop
    out, active, slots = one_matrix(
      leaf_params, leaf_active, prune[span], grow[span], keys[span]
    )
    entry = chosen[leaf]
    new_params[leaf] = jax.tree.map(
      lambda x, like: jnp.reshape(x, like.shape), out, entry.params
    )
    shape = entry.buffers.active.shape
    new_buffers[leaf] = FlexLoraBuffers(active=jnp.reshape(active, shape))
    slots = jnp.reshape(slots, shape)
    touched[f'{leaf}/a'] = slots[..., None, :]
    touched[f'{leaf}/b'] = slots[..., :, None]
    touched[f'{leaf}/e'] = slots
  return new_params, new_buffers, touched


def flexlora_schedule(
  adapter: TreeAdapter,
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
  """FlexLoRA's rank reallocation over the ``flexlora`` matrices of ``adapter``.

  Governed leaves are those whose parameters are ``FlexLoraParams``, however
  the method is wrapped (``mpc``, ``matrix_view``, a hand-built copy,
  ``stacked``: there each layer's slice is one matrix and takes part in the
  events on its own, as a separate leaf would). Matrices are ordered by leaf
  in tree order, then by layer.

  An event is an update ``t`` (optimizer updates done) with
  ``t_i < t < T − t_f`` and ``(t − t_i) mod Δ = 0``. At an event, with
  ``H`` the ``entropy`` of every governed matrix and ``r`` its active rank:

  * ``k = min(b, #{r > 1}, #{1 < r < R})`` with ``b = budget`` (or, with
    ``cubic``, ``cubic_budget``; no event when it is 0);
  * prune: the ``k`` matrices with ``r > 1`` and the lowest ``H`` drop their
    smallest-``e`` slot (``prune_by='signed'``, the code's ``argmin e``;
    ``'abs'`` for the paper's "energy" reading: the spec notes the ambiguity);
  * grow: the ``k`` matrices with ``1 < r < R`` (a free slot; ``r = 1``
    matrices never grow, as in the code, whose ``H`` is ``−inf`` there) and
    the highest ``H`` activate a free slot, zero-impact (``prune_and_grow``);
    the new ``a``/``b`` values of matrix ``i`` come from
    ``fold_in(fold_in(key(seed), t), i)``.

  Both sets have ``k`` matrices, so the total active rank is conserved (a
  matrix may be in both). Ties in ``H`` go to the matrix earlier in order.
  The active masks are the leaves' ``FlexLoraBuffers``.

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
    budget: ``b0 > 0``, matrices pruned (and grown) per event.
    cubic: decay the budget as ``round(b0 (1 − p³))`` (off by default).
    prune_by: ``'signed'`` (default, the code) or ``'abs'``.
    seed: the seed of the grown slots' random ``a`` and ``b`` values.

  Returns:
    The ``Schedule`` (its state is ``()``).
  """
  name = 'flexlora_schedule'
  timeline = phases(name, total_steps, init_warmup, final_warmup)
  every = checks.positive_int(name, 'interval', interval)
  b0 = checks.positive_int(name, 'budget', budget)
  cubic = checks.flag(name, 'cubic', cubic)
  checks.choice(name, 'prune_by', prune_by, PRUNE_BY)
  seed = non_negative_int(name, 'seed', seed)

  def leaves(frozen, params, buffers):
    """The governed leaves, ``{leaf name: Entry}``."""
    return governed(name, adapter, frozen, params, buffers, FlexLoraParams)

  def init(frozen, params, buffers):
    leaves(frozen, params, buffers)
    return ()

  def event(frozen, params, buffers, opt_state, step, k_max):
    chosen = leaves(frozen, params, buffers)
    flat = {leaf: matrices(entry) for leaf, entry in chosen.items()}
    prune, grow = choose(flat, k_max)
    key = jax.random.fold_in(jax.random.key(seed), step)
    new_params, new_buffers, touched = leaf_events(
      chosen, flat, prune, grow, key, prune_by
    )
    params = paths.replace(params, new_params)
    buffers = paths.replace(buffers, new_buffers)
    return params, buffers, reset_moments(opt_state, params, touched)

  def update(state, frozen, params, buffers, grads, opt_state, step):
    del grads
    k_max = event_budget(step, b0, cubic, timeline, every)
    params, buffers, opt_state = jax.lax.cond(
      k_max > 0,
      lambda p, b, o: event(frozen, p, b, o, step, k_max),
      lambda p, b, o: (p, b, o),
      params,
      buffers,
      opt_state,
    )
    return params, buffers, opt_state, state

  return Schedule(init=init, update=update)
