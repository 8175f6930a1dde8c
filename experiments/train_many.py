"""Several adapters of one method trained as one program (``seeds``, ``lrs``).

A config with ``seeds=S`` (seeds ``seed .. seed+S-1``) and/or ``lrs=[...]``
trains the ``N = S · len(lrs)`` adapters (every seed at every learning rate)
with ``pj.make_many_train_step``: θ, buffers and the optimizer state carry a
leading N axis, the frozen weights are shared, and adapter ``i`` reads its
own seed's batches. Each adapter takes the step it would take alone
(``train.train_and_evaluate`` with that seed and ``lr``), with AdamW's peak
rate held per adapter (``pj.adamw_per_adapter``).

Everything per seed comes from the task built with that seed: its batch
order and its new weights (a classifier head). The frozen tree of seed
``seed`` is the one shared; a leaf another seed's task builds differently
must be one the rules train whole (``full()``, so its frozen value is never
read), and that seed's adapter starts from its own value; otherwise the run
is refused. Selective methods pick other entries per seed and cannot group
(``common.check_config``).

``DIR`` holds what a single run's does (one ``checkpoints/`` of all N), with
``results.json`` a list of N rows, one per adapter (``experiments.compare``
reads them as N runs), and ``adapters/<label>.safetensors``, where
``label`` is ``seed=S,lr=L``.
"""

import json
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import peft_jax as pj
from experiments import tasks, train
from peft_jax._src import files, paths
from peft_jax.models import partitioning


def group_size(config) -> int:
  """``N``: the adapters a config trains together (1: a single run)."""
  return config.get('seeds', 1) * max(1, len(config.get('lrs') or []))


class Member(NamedTuple):
  """One adapter of the group: its config, task and own frozen leaves."""

  label: str  # 'seed=1,lr=0.002'
  config: ml_collections.ConfigDict  # the group's, with its seed, lr, name, group
  task: tasks.Task  # built with its seed (frozen dropped: see own_leaves)
  own_leaves: dict[str, jax.Array]  # leaves its task builds unlike member 0's


def member_configs(config) -> list[tuple[str, ml_collections.ConfigDict]]:
  """``(label, config)`` per adapter, seed-major: each a single-run config
  (``seeds=1``, ``lrs=[]``) with its ``seed`` and ``lr``; its ``group`` names
  the learning rate when there are several, so seeds are averaged per rate."""
  lrs = [float(lr) for lr in config.get('lrs') or [config.lr]]
  group = config.get('group', config.method)
  members = []
  for seed in range(config.seed, config.seed + config.get('seeds', 1)):
    for lr in lrs:
      label = f'seed={seed},lr={lr:g}'
      member = ml_collections.ConfigDict(config.to_dict())
      member.update(seed=seed, lr=lr, seeds=1, lrs=[], name=f'{config.name}[{label}]')
      member.group = f'{group} lr={lr:g}' if len(lrs) > 1 else group
      members.append((label, member))
  return members


def differing_leaves(frozen: pj.Params, shared: pj.Params) -> dict[str, object]:
  """``{name: leaf}`` of ``frozen``'s leaves that differ from ``shared``'s."""
  theirs, ours = paths.flatten(frozen), paths.flatten(shared)
  same = lambda a, b: all(
    np.array_equal(x, y)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )
  return {name: leaf for name, leaf in theirs.items() if not same(leaf, ours[name])}


def check_own_leaves(members: list[Member], plan: pj.Plan) -> None:
  """Refuses a leaf that differs between seeds and is not trained whole.

  Raises:
    PeftError: naming the leaf and its method (or that none adapts it):
      training over member 0's value would change that seed's adapter.
  """
  for member in members:
    for name in member.own_leaves:
      entry = plan.weights.get(name)
      method = entry.adapter.name if entry else 'no method'
      if not method.startswith('full('):
        raise pj.PeftError(
          f'{name} differs between seeds and is adapted by {method}, not '
          'trained whole (full()); train these seeds apart (seeds=1, seed=...)'
        )


def build_members(config) -> list[Member]:
  """Every adapter's config and task (built with its seed); only member 0's
  task keeps its frozen tree, the others their ``own_leaves``."""
  members = []
  for label, member_config in member_configs(config):
    task = tasks.build(member_config)
    own = {}
    if members:
      own = differing_leaves(task.frozen, members[0].task.frozen)
      task = task._replace(frozen=None)
    members.append(Member(label, member_config, task, own))
  return members


def member_optimizer(config, member: Member) -> optax.GradientTransformation:
  """AdamW at the member's peak rate on the run's schedule shape, the rate
  and decay held in the optimizer state (one update serves all N)."""
  shape = train.lr_schedule(config, 1.0)
  return pj.adamw_per_adapter(
    member.config.lr, config.weight_decay, shape, mask=train.decay_mask(config)
  )


def member_run(run: train.Run, member: Member) -> train.Run:
  """The group's run as the member's own: its config, task and frozen tree
  (the shared one with its own leaves in place: what its task built)."""
  frozen = paths.map_named(lambda name, w: member.own_leaves.get(name, w), run.frozen)
  return run._replace(config=member.config, task=member.task, frozen=frozen)


def member_state(run: train.Run, member: Member, config) -> pj.TrainState:
  """The member's step-0 state (``train.initial_state`` of its
  ``member_run``, with its optimizer)."""
  optimizer = member_optimizer(config, member)
  return train.initial_state(member_run(run, member)._replace(optimizer=optimizer))


def with_leading_axis(sharding):
  """``sharding`` of one adapter's leaf, for that leaf stacked on a leading
  (unsharded) N axis."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding
  spec = jax.sharding.PartitionSpec(None, *sharding.spec)
  return jax.sharding.NamedSharding(sharding.mesh, spec)


def initial_states(run: train.Run, members: list[Member]) -> pj.TrainState:
  """Every member's step-0 state, stacked (``pj.stack_states``) and placed
  as member 0's, on a leading N axis. Checks that each leaf differing
  between seeds is trained whole (``check_own_leaves``)."""
  states = [member_state(run, member, run.config) for member in members]
  first = states[0]
  check_own_leaves(members, run.tree.plan(run.frozen, first.params, first.buffers))
  stacked = pj.stack_states(states)
  fields = stacked._replace(step=None)
  placed = jax.tree.map(
    lambda x, one: jax.device_put(x, with_leading_axis(one.sharding)),
    fields,
    first._replace(step=None),
  )
  return placed._replace(step=stacked.step)


def interleaved(batches: list[dict]) -> dict:
  """N batches ``{name: (B, ...)}`` as one ``{name: (B·N, ...)}`` whose row
  ``b·N + i`` is batch ``i``'s row ``b``: placed on the mesh like one batch,
  each device holds whole rows ``b`` of every member."""
  return jax.tree.map(
    lambda *xs: np.stack(xs, axis=1).reshape(-1, *xs[0].shape[1:]), *batches
  )


def per_member(flat, n: int):
  """``interleaved``'s inverse inside the step: ``(B·N, ...) -> (N, B, ...)``."""
  return jax.tree.map(
    lambda x: jnp.moveaxis(x.reshape(-1, n, *x.shape[1:]), 1, 0), flat
  )


def adapters_per_pass(config) -> int | None:
  """``config.adapters_per_pass``, where 0 (the default) means one adapter
  per pass on a CPU and all N in one vmapped pass elsewhere. On the 2-core
  CPU, 8 MiniLM LoRA adapters ran 1.22× the throughput of one-adapter steps
  in passes of one at 1.05× the peak memory, and 0.73× in one pass at 4.6×
  (``benchmarks/results/many_adapters.md``); accelerators are unmeasured."""
  per_pass = config.get('adapters_per_pass') or 0
  if per_pass:
    return per_pass
  return 1 if jax.default_backend() == 'cpu' else None


def group_program(run: train.Run, members: list[Member]) -> train.Program:
  """``make_many_train_step`` on the members' own batches."""
  config, n = run.config, len(members)
  many = pj.make_many_train_step(
    run.task.loss_fn,
    run.tree,
    run.optimizer,
    shared_batch=False,
    factored=config.factored,
    schedule=run.schedule,
    skip_nonfinite=config.get('nonfinite', 'stop') == 'skip',
    adapters_per_pass=adapters_per_pass(config),
  )
  step = lambda states, frozen, flat: many(states, frozen, per_member(flat, n))
  batch = lambda position: partitioning.process_batch(
    run.mesh, interleaved([m.task.train_batch(position) for m in members])
  )
  evaluate_all = lambda states: evaluate(run, members, states)
  return train.Program(step, batch, evaluate_all, tuple(m.label for m in members))


def evaluate(run: train.Run, members: list[Member], states) -> list[dict]:
  """Every member's evaluation (its own task's splits)."""
  evaluations = []
  for i, member in enumerate(members):
    state = pj.take_adapter(states, i)
    evaluations.append(
      member.task.evaluate(run.tree, run.frozen, state.params, state.buffers)
    )
  return evaluations


def start_or_resume(run: train.Run, members, manager, writer: train.MetricsWriter):
  """``(states, metadata)``: the newest good checkpoint of the group, else
  step 0 evaluated (``train.start_or_resume``'s rules)."""
  states = initial_states(run, members)
  accept = train.same_run_only(manager, run.config)
  restored = pj.restore_newest_good(manager, states, accept=accept)
  if restored is None:
    writer.keep_until(-1)
    before = evaluate(run, members, states)
    labels = tuple(m.label for m in members)
    writer.write(0, train.logged_evaluation(before, 'before', labels))
    metadata = {'before': before, 'skipped_steps': [0] * len(members)}
  else:
    states, metadata = restored
    writer.keep_until(int(states.step))
    print(f'resumed from step {int(states.step)} in {manager.directory}')
  return states, metadata


def run_on_mesh(config, workdir: pathlib.Path, mesh) -> list[dict]:
  """``train.run_on_mesh`` for the group: trains the N adapters together,
  evaluates each, writes each adapter's file and the N results rows."""
  members = build_members(config)
  run = train.setup(config, workdir, mesh, task=members[0].task)
  run = run._replace(optimizer=member_optimizer(config, members[0]))
  manager = pj.checkpoint_manager(str(workdir / 'checkpoints'))
  program = group_program(run, members)
  with train.MetricsWriter(workdir) as writer:
    states, resumed = start_or_resume(run, members, manager, writer)
    start = int(states.step)
    states, loop = train.train_loop(run, states, manager, writer, resumed, program)
    after = evaluate(run, members, states)
    writer.write(config.steps, train.logged_evaluation(after, 'after', program.labels))
  (workdir / 'adapters').mkdir(exist_ok=True)
  rows = []
  for i, member in enumerate(members):
    state, own = pj.take_adapter(states, i), member_run(run, member)
    train.save_run_adapter(
      workdir / 'adapters' / f'{member.label}.safetensors', own, state
    )
    rows.append(
      member_row(own, state, resumed, after[i], loop, i, config.steps - start)
    )
  if train.is_writer():
    files.write_text_atomically(workdir / 'results.json', json.dumps(rows, indent=2))
  return rows


def member_row(own: train.Run, state, resumed, after, loop, i, steps_run) -> dict:
  """Member ``i``'s results row (``train.run_row`` of its ``member_run``
  ``own``). The group's step serves its N adapters: ``train_seconds`` (so
  ``ms_per_step``) is the group's over N, ``step_memory_mib`` and
  ``compile_seconds`` are the whole program's, and ``adapters_in_program``
  is N."""
  n = len(resumed['before'])
  share = loop._replace(
    train_seconds=loop.train_seconds / n,
    skipped_steps=loop.skipped_steps[i],
    evaluations=train.adapter_evaluations(loop.evaluations, i),
  )
  row = train.run_row(own, state, resumed['before'][i], after, share, steps_run)
  row['adapters_in_program'] = n
  return row
