"""The pure training step: gradients only with respect to adapter parameters.

The same function runs under ``jax.jit`` (with a data-sharded batch and
buffer donation; the default), ``jax.pmap`` or ``jax.shard_map``: with an
``axis_name`` it averages gradients and metrics over that axis.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from peft_jax._src import noise, sharding
from peft_jax._src.base import (
  AdapterParams,
  Array,
  Buffers,
  Params,
  Schedule,
  TreeAdapter,
)
from peft_jax._src.factored import adapted

# loss_fn(weights, batch, rng) -> (loss, metrics): weights is the full adapted
# tree, rng a PRNG key for dropout, metrics a dict of scalars.
LossFn = Callable[[Params, Any, Array], tuple[Array, dict[str, Array]]]


class TrainState(NamedTuple):
  """Everything a step changes.

  Attributes:
    params: the adapter's trainable parameters (what the optimizer updates).
    buffers: the adapter's non-trainable state (carried; schedules may
      rewrite it).
    opt_state: the optimizer state, over ``params`` only.
    step: the number of optimizer updates done.
    rng: the base PRNG key (dropout keys are folded from it per step).
    schedule_state: the state of a ``Schedule`` (``()`` without one).
  """

  params: AdapterParams
  buffers: Buffers
  opt_state: optax.OptState
  step: Array
  rng: Array
  schedule_state: Any = ()

  @classmethod
  def create(
    cls,
    params: AdapterParams,
    buffers: Buffers,
    optimizer: optax.GradientTransformation,
    rng: Array,
    *,
    schedule: Schedule | None = None,
    frozen: Params = None,
  ) -> 'TrainState':
    """Step 0 for ``(params, buffers) = adapter.init(key, frozen)``.

    A ``schedule`` needs the ``frozen`` tree for its ``init``. When
    ``params`` live on a device mesh (``NamedSharding``), every leaf the
    state adds that is not already on it (the step, the key, the
    optimizer's counters, the schedule's scalars) is replicated over that
    mesh, so the step compiles once for the state it returns.
    """
    schedule_state = () if schedule is None else schedule.init(frozen, params, buffers)
    step = jnp.zeros((), jnp.int32)
    state = cls(params, buffers, optimizer.init(params), step, rng, schedule_state)
    mesh = sharding.mesh_of(params)
    return state if mesh is None else sharding.replicate_off_mesh(state, mesh)


def make_train_step(
  loss_fn: LossFn,
  adapter: TreeAdapter,
  optimizer: optax.GradientTransformation,
  *,
  axis_name: str | None = None,
  factored: bool = False,
  schedule: Schedule | None = None,
) -> Callable[[TrainState, Params, Any], tuple[TrainState, dict[str, Array]]]:
  """Builds ``step(state, frozen, batch) -> (state, metrics)``, a pure function.

  The objective is ``loss_fn(weights, batch, rng) + adapter.regularizer(
  frozen, params, buffers)`` (when the adapter has a regulariser), with
  ``weights`` the adapted tree and activation adapters at their hook points
  (``peft_jax.adapted``). Its gradient is taken with respect to
  ``state.params`` only: ``frozen`` and ``state.buffers`` are ordinary,
  non-differentiated inputs. The dropout key of step ``t`` is
  ``fold_in(state.rng, t)`` (also folded with the device index under an
  ``axis_name``); stochastic adapters sample from it too: every
  ``peft_jax.Noise`` in the buffers is active inside the step only
  (``state.buffers`` keep it inactive, the evaluation form).

  Args:
    loss_fn: ``(weights, batch, rng) -> (loss, metrics)``.
    adapter: a tree-level adapter, e.g. ``by_rules(rules)``.
    optimizer: an optax transformation.
    axis_name: the mapped axis of ``pmap``/``shard_map``; gradients, loss and
      metrics are averaged over it (``_mean_gradient``: also right under
      ``shard_map``'s default ``check_vma=True``). ``None`` under ``jit``.
    factored: run adapted matmuls in their factored form (no ``w'``, no
      weight gradient).
    schedule: a ``Schedule`` run after each optimizer update (its state is
      ``state.schedule_state``; create the state with the same schedule).

  Returns:
    The pure step. Under ``jit`` donate the state:
    ``jax.jit(step, donate_argnums=0)`` (the passed state's arrays are then
    invalid: keep using the returned one). Metrics hold ``loss``
    (regulariser excluded), ``regularizer`` (if any), ``grad_norm`` and the
    loss function's own metrics.
  """
  loss_of_params = adapted(adapter, loss_fn, factored=factored)

  def objective(params, buffers, frozen, batch, rng):
    loss, metrics = loss_of_params(frozen, params, buffers, batch, rng)
    metrics = {'loss': loss, **metrics}
    if adapter.regularizer is None:
      return loss, metrics
    penalty = adapter.regularizer(frozen, params, buffers)
    return loss + penalty, {**metrics, 'regularizer': penalty}

  def step(state: TrainState, frozen: Params, batch: Any):
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    grads, metrics = jax.grad(objective, has_aux=True)(
      state.params, noise.activate(state.buffers, rng), frozen, batch, rng
    )
    if axis_name is not None:
      grads = _mean_gradient(grads, metrics['loss'], axis_name)
      metrics = jax.lax.pmean(metrics, axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics['grad_norm'] = optax.tree.norm(grads)
    step = state.step + 1
    buffers, schedule_state = state.buffers, state.schedule_state
    if schedule is not None:
      params, buffers, opt_state, schedule_state = schedule.update(
        schedule_state, frozen, params, buffers, grads, opt_state, step
      )
    new_state = TrainState(params, buffers, opt_state, step, state.rng, schedule_state)
    return new_state, metrics

  return step


def _varies(x: Array, axis_name: str) -> bool:
  """Whether ``shard_map`` (with ``check_vma=True``) types ``x`` as varying
  over ``axis_name``; never under ``pmap`` or ``check_vma=False``, which do
  not track it."""
  return axis_name in jax.typeof(x).manual_axis_type.varying


def _mean_gradient(grads: Params, loss: Array, axis_name: str) -> Params:
  """The gradient of the mean of the devices' objectives ``f_i``.

  Under ``pmap`` or ``shard_map(check_vma=False)`` each device holds its own
  ``∇f_i``: ``pmean``. Under ``shard_map(check_vma=True)`` with a loss that
  varies over the axis, JAX's autodiff has already summed the gradient of a
  replicated (invariant) parameter over the devices (the transpose of the
  implicit ``pvary`` is a ``psum``): ``Σ_i ∇f_i``, divided here by the axis
  size; ``pmean`` of it would leave the sum, ``N`` times too large. Leaves
  that still vary (parameters sharded over the axis) are ``pmean``-ed.
  """
  if not _varies(loss, axis_name):
    return jax.lax.pmean(grads, axis_name)
  size = jax.lax.axis_size(axis_name)
  return jax.tree.map(
    lambda g: jax.lax.pmean(g, axis_name) if _varies(g, axis_name) else g / size,
    grads,
  )
