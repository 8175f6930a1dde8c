"""Many adapters of one structure over one frozen tree, trained as one program.

Adapters are pure functions of their own θ, so N of them over the same frozen
weights are a leading axis on θ, the buffers and the optimizer state
(``stack_trees``): ``make_many_train_step`` is ``make_train_step`` under
``jax.vmap`` with the frozen tree passed once, unbatched, and the batch
either shared by all N or one per adapter. Seeds differ through each state's
``init`` key and ``rng``; learning rates and weight decays through
``adamw_per_adapter``, whose hyper-parameters live in the optimizer state;
LoRA ranks through ``rank_masked`` (one rank ``R``, each adapter's own
``r ≤ R`` in its buffers). ``shard_adapters`` splits the N axis over a device
mesh: adapters are independent, so the step runs without communication.
"""

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from peft_jax._src import checks, paths
from peft_jax._src.base import Params, PeftError, Schedule, TreeAdapter
from peft_jax._src.step import LossFn, TrainState, make_train_step

T = TypeVar('T')


def stack_trees(trees: Sequence[T]) -> T:
  """One tree whose every leaf is the ``len(trees)`` leaves stacked on a new
  leading axis: N adapters' ``(params, buffers)``, or N batches for
  ``make_many_train_step(..., shared_batch=False)`` (states:
  ``stack_states``).

  Raises:
    PeftError: for no trees, or trees that differ in structure, shape or
      dtype (the first difference is named).
  """
  if not trees:
    raise PeftError('stack_trees: no trees given; expected one per adapter')
  first = trees[0]
  structure = jax.tree.structure(first)
  for i, tree in enumerate(trees[1:], 1):
    if jax.tree.structure(tree) != structure:
      raise PeftError(
        f'stack_trees: tree {i} has another structure than tree 0; expected '
        'adapters built by the same rules (pad ranks to a common one)'
      )
    pairs = zip(paths.named_leaves(first), paths.named_leaves(tree), strict=True)
    for (name, a), (_, b) in pairs:
      if (np.shape(a), a.dtype) != (np.shape(b), b.dtype):
        raise PeftError(
          f'stack_trees: tree {i} has {name} of shape {np.shape(b)} {b.dtype}; '
          f'tree 0 has {np.shape(a)} {a.dtype}'
        )
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def stack_states(states: Sequence[TrainState]) -> TrainState:
  """N ``TrainState``s as the state of ``make_many_train_step``: every field
  stacked (``stack_trees``) but ``step``, which all N share (so a checkpoint of
  them is at one step).

  Raises:
    PeftError: as ``stack_trees``, or for states at different steps.
  """
  steps = {int(state.step) for state in states}
  if len(steps) > 1:
    raise PeftError(
      f'stack_states: the states are at steps {sorted(steps)}; expected one'
    )
  return stack_trees(states)._replace(step=states[0].step)


def take_adapter(tree: T, index: int) -> T:
  """Adapter ``index`` of a stacked tree: every leaf's row ``index`` (of a
  ``stack_states`` state: every field's but the shared ``step``)."""
  row = lambda subtree: jax.tree.map(lambda leaf: leaf[index], subtree)
  if isinstance(tree, TrainState):
    return row(tree._replace(step=None))._replace(step=tree.step)
  return row(tree)


def adamw_per_adapter(
  learning_rate: float,
  weight_decay: float = 0.0,
  shape: Callable[[jax.Array], jax.Array] | None = None,
  *,
  mask: Any = None,
  **adam_kwargs,
) -> optax.GradientTransformation:
  """AdamW with ``learning_rate · shape(t)`` and decoupled ``weight_decay``,
  both values held in the optimizer state, so stacked states of different
  values share one ``update``:

    u_t = −η · shape(t) · (m̂_t / (√v̂_t + ε) + λ · θ_{t−1})

  the update of ``optax.adamw(lambda t: η · shape(t), weight_decay=λ)``
  (computed as ``shape(t)`` then ``η``: equal up to float rounding).

  Args:
    learning_rate: η, the peak learning rate.
    weight_decay: λ.
    shape: the schedule's shape in ``[0, 1]`` by update count (warm-up,
      decay), shared by every adapter; ``None`` for a constant 1.
    mask: where the decay acts, as ``optax.adamw``'s ``mask`` (a tree of
      bools or a function of the parameters, e.g.
      ``peft_jax.hf_decay_mask``); ``None``: every parameter.
    **adam_kwargs: ``optax.scale_by_adam``'s (``b1``, ``b2``, ``eps``, ...).
  """
  return optax.chain(
    optax.scale_by_adam(**adam_kwargs),
    optax.inject_hyperparams(optax.add_decayed_weights, static_args=('mask',))(
      weight_decay=weight_decay, mask=mask
    ),
    optax.scale_by_schedule(shape or (lambda count: jnp.ones((), jnp.float32))),
    optax.inject_hyperparams(optax.scale)(step_size=-learning_rate),
  )


def make_many_train_step(
  loss_fn: LossFn,
  adapter: TreeAdapter,
  optimizer: optax.GradientTransformation,
  *,
  shared_batch: bool = True,
  factored: bool = False,
  schedule: Schedule | None = None,
  skip_nonfinite: bool = False,
  adapters_per_pass: int | None = None,
) -> Callable[[TrainState, Params, Any], tuple[TrainState, dict[str, jax.Array]]]:
  """``step(states, frozen, batch) -> (states, metrics)`` for N states
  stacked by ``stack_states``.

  Adapter ``i`` takes exactly the step ``make_train_step`` gives it alone
  (``jax.vmap`` over the states' leading axis, ``step`` shared; the frozen
  tree is not batched, so it is not copied N times), and every metric has a
  leading N axis.

  Args:
    loss_fn: ``(weights, batch, rng) -> (loss, metrics)``.
    adapter: the tree adapter all N share (same rules).
    optimizer: the update all N share; per-adapter learning rates and
      weight decays must live in the state (``adamw_per_adapter``).
    shared_batch: every adapter trains on the same batch; else ``batch`` has
      a leading N axis, one batch per adapter (its own data order).
    factored, schedule, skip_nonfinite: as ``make_train_step``'s.
    adapters_per_pass: ``None``: all N in one vmapped pass, which needs
      about N times one step's activation memory and gains speed only where
      one adapter's step leaves the device idle (a GPU on a small model; a
      saturated CPU gains nothing: ``benchmarks/many_adapters.py``). ``K``:
      passes of K adapters inside the same program (``jax.lax.map`` with
      ``batch_size=K``; ``K = 1``: one after another), about K times one
      step's activations, still one compile and one call per step.
  """
  step = make_train_step(
    loss_fn,
    adapter,
    optimizer,
    factored=factored,
    schedule=schedule,
    skip_nonfinite=skip_nonfinite,
  )
  if adapters_per_pass is None:
    states_axes = TrainState(0, 0, 0, None, 0, 0)  # step: shared by all N
    return jax.vmap(
      step,
      in_axes=(states_axes, None, None if shared_batch else 0),
      out_axes=(states_axes, 0),
    )
  per_pass = checks.positive_int(
    'make_many_train_step', 'adapters_per_pass', adapters_per_pass
  )

  def in_passes(states, frozen, batch):
    def one(own):
      state, own_batch = own
      state = state._replace(step=states.step)
      return step(state, frozen, batch if shared_batch else own_batch)

    own = (states._replace(step=None), None if shared_batch else batch)
    new, metrics = jax.lax.map(one, own, batch_size=per_pass)
    return new._replace(step=new.step[0]), metrics

  return in_passes


def shard_adapters(tree: T, mesh: Mesh, axis: str = 'adapters') -> T:
  """``tree`` placed on ``mesh`` with its leading N axis split over ``axis``.

  ``tree`` is stacked: a ``stack_states`` state (its shared ``step`` is
  replicated) or N per-adapter batches. Every other leaf ``x: (N, ...)`` gets
  ``NamedSharding(mesh, P(axis))``: each of the ``D`` devices along ``axis``
  holds ``N/D`` adapters' θ, buffers and optimizer state. Replicate the
  frozen tree on the same mesh (``jax.device_put(frozen,
  NamedSharding(mesh, P()))``): the jitted ``make_many_train_step`` then
  runs ``N/D`` adapters per device with no communication, and returns
  states placed as these. Numerically the same as the unsharded run.

  Raises:
    PeftError: if ``axis`` is not a mesh axis or N is not a multiple of its
      size.
  """
  if axis not in mesh.shape:
    raise PeftError(
      f'shard_adapters: axis {axis!r} is not an axis of the mesh; its axes are '
      f'{tuple(mesh.shape)}'
    )
  state = tree if isinstance(tree, TrainState) else None
  stacked = tree if state is None else state._replace(step=None)
  sizes = {leaf.shape[0] if leaf.ndim else 0 for leaf in jax.tree.leaves(stacked)}
  if len(sizes) != 1 or min(sizes) % mesh.shape[axis] or not min(sizes):
    raise PeftError(
      f'shard_adapters: leading axes of sizes {sorted(sizes)}; expected one N, '
      f'a multiple of mesh axis {axis!r} of size {mesh.shape[axis]}'
    )
  placed = jax.device_put(stacked, NamedSharding(mesh, P(axis)))
  if state is None:
    return placed
  return placed._replace(step=jax.device_put(state.step, NamedSharding(mesh, P())))
