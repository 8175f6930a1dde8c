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

from peft_jax._src import checks, noise, paths, sharding
from peft_jax._src.base import (
  AdapterParams,
  Array,
  Buffers,
  Params,
  PeftError,
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

    Checks that every ``params`` leaf is floating and not float16 (float16
    θ needs loss scaling, which the step does not do). A ``schedule`` needs
    the ``frozen`` tree for its ``init``. When
    ``params`` live on a device mesh (``NamedSharding``), every leaf the
    state adds that is not already on it (the step, the key, the
    optimizer's counters, the schedule's scalars) is replicated over that
    mesh, so the step compiles once for the state it returns.
    """
    _check_trainable(params)
    if schedule is not None and frozen is None:
      raise PeftError(
        "TrainState.create: schedule= needs frozen= (the schedule's init reads "
        'the frozen weights); got frozen=None'
      )
    schedule_state = () if schedule is None else schedule.init(frozen, params, buffers)
    step = jnp.zeros((), jnp.int32)
    state = cls(params, buffers, optimizer.init(params), step, rng, schedule_state)
    mesh = sharding.mesh_of(params)
    return state if mesh is None else sharding.replicate_off_mesh(state, mesh)


def _check_trainable(params: AdapterParams) -> None:
  """Raises at the first θ leaf that is not floating, or is float16."""
  for name, leaf in paths.named_leaves(params):
    dtype = jnp.dtype(leaf.dtype)
    if dtype == jnp.float16:
      raise PeftError(
        f'TrainState.create: params leaf {name!r} is float16, which needs loss '
        'scaling that this step does not do; use bfloat16 or float32'
      )
    if not jnp.issubdtype(dtype, jnp.floating):
      raise PeftError(
        f'TrainState.create: params leaf {name!r} is {dtype.name}; trained '
        'parameters must be floating: use bfloat16 or float32'
      )


def make_train_step(
  loss_fn: LossFn,
  adapter: TreeAdapter,
  optimizer: optax.GradientTransformation,
  *,
  axis_name: str | None = None,
  factored: bool = False,
  schedule: Schedule | None = None,
  skip_nonfinite: bool = False,
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
    skip_nonfinite: a step whose loss, regulariser or gradient has a nan or
      ±inf entry leaves ``params``, ``buffers``, ``opt_state`` and
      ``schedule_state`` unchanged; ``step`` still advances (a data stream
      indexed by it moves on).

  Returns:
    The pure step. Under ``jit`` donate the state:
    ``jax.jit(step, donate_argnums=0)`` (the passed state's arrays are then
    invalid: keep using the returned one). Metrics hold ``loss``
    (regulariser excluded), ``regularizer`` (if any), ``grad_norm``,
    ``finite`` (a bool: the loss, regulariser and every gradient entry are
    finite; computed after the averaging over ``axis_name``, so every
    device agrees), with ``skip_nonfinite`` also ``skipped`` (int32 1 when
    the update was dropped, else 0), and the loss function's own metrics.
  """
  skip_nonfinite = checks.flag('make_train_step', 'skip_nonfinite', skip_nonfinite)
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
    metrics['finite'] = _finite(metrics)
    step = state.step + 1
    buffers, schedule_state = state.buffers, state.schedule_state
    if schedule is not None:
      params, buffers, opt_state, schedule_state = schedule.update(
        schedule_state, frozen, params, buffers, grads, opt_state, step
      )
    if skip_nonfinite:
      keep = lambda new, old: jnp.where(metrics['finite'], new, old)
      params, buffers, opt_state, schedule_state = jax.tree.map(
        keep,
        (params, buffers, opt_state, schedule_state),
        (state.params, state.buffers, state.opt_state, state.schedule_state),
      )
      metrics['skipped'] = (~metrics['finite']).astype(jnp.int32)
    new_state = TrainState(params, buffers, opt_state, step, state.rng, schedule_state)
    return new_state, metrics

  return step


def _finite(metrics: dict[str, Array]) -> Array:
  """Whether the loss, the regulariser (if any) and the gradient norm (so
  every gradient entry) are finite."""
  finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
  if 'regularizer' in metrics:
    finite &= jnp.isfinite(metrics['regularizer'])
  return finite


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
