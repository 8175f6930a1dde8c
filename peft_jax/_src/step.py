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

from peft_jax._src.base import Adapter, AdapterParams, Array, Params, Schedule
from peft_jax._src.factored import factored as factored_transform
from peft_jax._src.tree import trainable_mask

# loss_fn(params, batch, rng) -> (loss, metrics): params is the full perturbed
# tree, rng a PRNG key for dropout, metrics a dict of scalars.
LossFn = Callable[[Params, Any, Array], tuple[Array, dict[str, Array]]]


class TrainState(NamedTuple):
  """Everything a step changes: adapter parameters, optimizer state, step, RNG,
  and the state of a ``Schedule`` (``()`` without one)."""

  params: AdapterParams
  opt_state: optax.OptState
  step: Array
  rng: Array
  schedule_state: Any = ()

  @classmethod
  def create(
    cls,
    params: AdapterParams,
    optimizer: optax.GradientTransformation,
    rng: Array,
    *,
    schedule: Schedule | None = None,
    frozen: Params = None,
  ) -> 'TrainState':
    """Step 0 for ``params`` (e.g. ``adapter.init(key, frozen)``).

    A ``schedule`` needs the ``frozen`` tree for its ``init``.
    """
    schedule_state = () if schedule is None else schedule.init(frozen, params)
    step = jnp.zeros((), jnp.int32)
    return cls(params, optimizer.init(params), step, rng, schedule_state)


def only_trainable(mask: AdapterParams, tree: AdapterParams) -> AdapterParams:
  """Zeros the entries of ``tree`` where ``mask`` (``trainable_mask``) is False."""
  return jax.tree.map(lambda keep, x: x if keep else jnp.zeros_like(x), mask, tree)


def make_train_step(
  loss_fn: LossFn,
  adapter: Adapter,
  optimizer: optax.GradientTransformation,
  *,
  axis_name: str | None = None,
  factored: bool = False,
  schedule: Schedule | None = None,
) -> Callable[[TrainState, Params, Any], tuple[TrainState, dict[str, Array]]]:
  """Builds ``step(state, frozen, batch) -> (state, metrics)``, a pure function.

  The objective is ``loss_fn(adapter.apply(frozen, θ), batch, rng) +
  adapter.regularizer(frozen, θ)`` (when the adapter has a regulariser); its
  gradient is taken with respect to ``θ = state.params`` only, so ``frozen``
  is an ordinary, non-differentiated input; entries of ``θ`` under a
  ``buffers`` key get zero gradients and zero updates. The dropout key of step ``t`` is
  ``fold_in(state.rng, t)`` (also folded with the device index under an
  ``axis_name``).

  Args:
    loss_fn: ``(params, batch, rng) -> (loss, metrics)``.
    adapter: a tree-level adapter, e.g. ``by_rules(rules)``.
    optimizer: an optax transformation.
    axis_name: the mapped axis of ``pmap``/``shard_map``; gradients, loss and
      metrics are averaged over it. ``None`` under ``jit``.
    factored: run ``loss_fn`` through ``peft_jax.factored`` so adapted
      matmuls use their factored form (no ``w'``, no weight gradient).
    schedule: a ``Schedule`` run after each optimizer update (its state is
      ``state.schedule_state``; create the state with the same schedule).

  Returns:
    The pure step. Under ``jit`` donate the state:
    ``jax.jit(step, donate_argnums=0)``. Metrics hold ``loss``
    (regulariser excluded), ``regularizer`` (if any), ``grad_norm`` and the
    loss function's own metrics.
  """

  if factored:
    loss_of_theta = factored_transform(adapter, loss_fn)
  else:
    loss_of_theta = lambda frozen, theta, batch, rng: loss_fn(
      adapter.apply(frozen, theta), batch, rng
    )

  def objective(theta, frozen, batch, rng):
    loss, metrics = loss_of_theta(frozen, theta, batch, rng)
    metrics = {'loss': loss, **metrics}
    if adapter.regularizer is None:
      return loss, metrics
    penalty = adapter.regularizer(frozen, theta)
    return loss + penalty, {**metrics, 'regularizer': penalty}

  def step(state: TrainState, frozen: Params, batch: Any):
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    grads, metrics = jax.grad(objective, has_aux=True)(state.params, frozen, batch, rng)
    if axis_name is not None:
      grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
    mask = trainable_mask(state.params)
    grads = only_trainable(mask, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    updates = only_trainable(mask, updates)  # Weight decay must not move buffers.
    params = optax.apply_updates(state.params, updates)
    metrics['grad_norm'] = optax.tree.norm(grads)
    step = state.step + 1
    schedule_state = state.schedule_state
    if schedule is not None:
      params, opt_state, schedule_state = schedule.update(
        schedule_state, frozen, params, grads, opt_state, step
      )
    return TrainState(params, opt_state, step, state.rng, schedule_state), metrics

  return step
