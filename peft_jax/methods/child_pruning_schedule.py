"""ChildPruning's projection: every few updates, keep each leaf's top-k changes."""

import jax
import jax.numpy as jnp

from peft_jax._src import checks, paths, schedules
from peft_jax._src.base import Array, Schedule, TreeAdapter
from peft_jax._src.schedules import stateless_lookup, top_k_mask
from peft_jax.methods.child_pruning import ChildPruningParams


def project(delta: Array, k: Array) -> tuple[Array, Array]:
  """``(Δ ⊙ top-k(|Δ|), reset)``: the projection and the entries it zeroes.

  ``delta: (*lead, ...)`` with ``lead = k.shape`` (one projection per layer
  under ``stacked``); exactly ``k`` entries are kept per slice
  (``top_k_mask``, ties to the lower flat index), ``reset`` marks the rest.
  """
  keep = top_k_mask(jnp.abs(delta), k)
  return jnp.where(keep, delta, jnp.zeros_like(delta)), ~keep


def child_pruning_schedule(
  adapter: TreeAdapter,
  interval: int,
  total_steps: int | None = None,
  *,
  reset_moments: bool = True,
) -> Schedule:
  """ChildPruning's repeated projection over the ``child_pruning`` leaves.

  Governed leaves are those whose parameters are ``ChildPruningParams``,
  however the method is wrapped (``matrix_view``, a hand-built copy,
  ``stacked``: there each layer's slice is projected on its own).

  After every update ``t`` with ``t mod interval = 0``, and after update
  ``t = total_steps`` when given, each governed ``Δ`` is projected to its
  ``k = ⌊p · size⌋`` largest ``|Δ|`` (``project``): ``θ`` goes back to
  ``θ0`` everywhere else. After the projection at ``total_steps`` (the last
  update of the run) every leaf is exactly p-sparse,
  ``‖θ − θ0‖₀ ≤ k``; between projections ``Δ`` trains densely.

  With ``reset_moments`` (default) the optimizer moments of the reset
  entries are zeroed too (``peft_jax._src.schedules.reset_moments``: every
  params-shaped subtree of the optimizer state, e.g. Adam's ``mu`` and
  ``nu``): a reset entry then restarts like a fresh parameter, instead of
  being moved away from ``θ0`` again by the momentum of its old change
  (Adam's ``mu`` still points along it), which would partly undo the
  projection in the next updates whatever the new gradients say. The SAM
  code's closest mode (``sgpa``) keeps the optimizer state
  (``reset_moments=False``) and, after its ``burnin``, freezes the last
  mask instead of projecting further (not done here: for a fixed mask use
  ``sparse`` or ``diff_pruning``).

  Args:
    adapter: a tree-level adapter (``by_rules``) with ``child_pruning``
      leaves.
    interval: ``Δt > 0``, updates between projections (the SAM code's
      ``gstep``).
    total_steps: ``T > 0``, the run's last update, projected whatever
      ``interval``; ``None``: only the periodic projections (the leaves are
      then p-sparse only right after one).
    reset_moments: zero the optimizer moments of the reset entries.

  Returns:
    The ``Schedule`` (its state is ``()``).
  """
  name = 'child_pruning_schedule'
  every = checks.positive_int(name, 'interval', interval)
  last = (
    None
    if total_steps is None
    else checks.positive_int(name, 'total_steps', total_steps)
  )
  reset = checks.flag(name, 'reset_moments', reset_moments)

  leaves, init = stateless_lookup(name, adapter, ChildPruningParams)

  def projection(frozen, params, buffers, opt_state):
    new_params, touched = {}, {}
    for leaf, entry in leaves(frozen, params, buffers).items():
      delta, zeroed = project(entry.params.delta, entry.buffers.k)
      new_params[leaf] = entry.params._replace(delta=delta)
      touched[f'{leaf}/delta'] = zeroed
    params = paths.replace(params, new_params)
    if reset:
      opt_state = schedules.reset_moments(opt_state, params, touched)
    return params, opt_state

  def update(state, frozen, params, buffers, grads, opt_state, step):
    del grads
    event = step % every == 0
    if last is not None:
      event = event | (step == last)
    params, opt_state = jax.lax.cond(
      event,
      lambda p, o: projection(frozen, p, buffers, o),
      lambda p, o: (p, o),
      params,
      opt_state,
    )
    return params, buffers, opt_state, state

  return Schedule(init=init, update=update)
