r"""The one trainer: ``python -m experiments.train --config FILE[:ARG] --workdir DIR``.

``--mesh data=D,fsdp=F,tensor=T`` (or ``config.mesh``) lays the run out on
a device mesh (``peft_jax.models.partitioning``); by default every device,
of every process, is on ``data``. The frozen weights are placed by the
model's logical axes, θ and the optimizer state follow them, each process
places only its rows of each batch, and the step compiles once. A
checkpoint restores onto any mesh (the mesh is not part of the run's
identity); under ``jax.distributed`` only process 0 writes files other than
the checkpoints (which orbax writes together).

A run evaluates the model before training, trains the adapter parameters
chosen by ``config.adapters`` with a jit-compiled optax step, checkpoints
with orbax (resuming from ``DIR`` when a checkpoint is there), evaluates
again, and writes into ``DIR``:

  config.json            the run config (a different config in DIR is refused)
  describe.txt           every leaf and hook point: shape, method, trainable
  metrics.jsonl          training and evaluation metrics, one JSON per line
  tensorboard/           the same metrics for TensorBoard
  checkpoints/           orbax: adapter params and buffers, optimizer state,
                         step, RNG, schedule state, data position, config
  adapter.safetensors    the trained adapter params and buffers only (small)
  results.json           the results row (see ``results_row``)
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time
from typing import NamedTuple

import jax
import ml_collections
import optax
import tqdm
from tensorboardX import SummaryWriter

import peft_jax as pj
from experiments import selection, tasks
from experiments.configs import common
from peft_jax.models import partitioning


def is_writer() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


class MetricsWriter:
  """Appends metrics to ``metrics.jsonl`` and to TensorBoard (process 0;
  on other processes it writes nothing)."""

  def __init__(self, workdir: pathlib.Path):
    self._jsonl = self._board = None
    if is_writer():
      self._jsonl = open(workdir / 'metrics.jsonl', 'a')  # noqa: SIM115
      self._board = SummaryWriter(str(workdir / 'tensorboard'))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if self._jsonl is None:
      return
    self._jsonl.write(json.dumps({'step': step, **metrics}) + '\n')
    self._jsonl.flush()
    for name, value in metrics.items():
      self._board.add_scalar(name, value, step)

  def __enter__(self) -> 'MetricsWriter':
    return self

  def __exit__(self, *exc) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._board.close()


def claim_workdir(workdir: pathlib.Path, config) -> None:
  """Creates ``workdir`` and records the config; refuses a different run's dir."""
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / 'config.json'
  wanted = json.loads(config.to_json())
  if path.exists():
    found = json.loads(path.read_text())
    if found != wanted:
      changed = sorted(
        k for k in wanted.keys() | found.keys() if found.get(k) != wanted.get(k)
      )
      raise pj.PeftError(
        f'{workdir} holds a run with a different config (keys {", ".join(changed)} '
        'differ); use a new --workdir to keep both'
      )
  elif is_writer():
    path.write_text(json.dumps(wanted, indent=2))


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW with linear warm-up then linear decay to 0 over ``config.steps``."""
  lr = optax.schedules.join_schedules(
    [
      optax.schedules.linear_schedule(0.0, config.lr, config.warmup_steps),
      optax.schedules.linear_schedule(
        config.lr, 0.0, config.steps - config.warmup_steps
      ),
    ],
    [config.warmup_steps],
  )
  return optax.adamw(lr, weight_decay=config.weight_decay)


def environment() -> dict[str, str]:
  """Where a result was measured: device, versions, date."""
  device = jax.devices()[0]
  return {
    'device': f'{device.platform}:{device.device_kind} x{jax.device_count()}',
    'processes': str(jax.process_count()),
    'cpu_count': str(os.cpu_count()),
    'jax': jax.__version__,
    'peft_jax_python': platform.python_version(),
    'date': datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC'),
  }


def changed_count(run: 'Run', state: pj.TrainState) -> int | None:
  """Entries of the frozen tree that the trained adapter changes (``None``
  where the tree is not mergeable): ``‖θ − θ0‖₀``, measured."""
  if not run.tree.mergeable:
    return None
  merged = pj.merge(run.tree, run.frozen, state.params, state.buffers)
  pairs = zip(jax.tree.leaves(merged), jax.tree.leaves(run.frozen), strict=True)
  return sum(int(jax.numpy.count_nonzero(a != b)) for a, b in pairs)


def results_row(config, params, total, before, after, train_seconds, steps_run):
  """The one-line summary of a run that comparison tables are built from."""
  trainable = pj.count(params)
  return {
    'name': config.name,
    'method': config.method,
    'group': config.get('group', config.method),
    'adapters': [list(rule) for rule in config.adapters],
    'selection': config.get('selection') and config.selection.to_dict(),
    'trainable_params': trainable,
    'total_params': total,
    'trainable_percent': 100.0 * trainable / total,
    'steps': config.steps,
    'batch_size': config.batch_size,
    'lr': config.lr,
    **{f'before_{k}': v for k, v in before.items()},
    **{f'after_{k}': v for k, v in after.items()},
    'metric': 'score' if 'test_score' in after else 'accuracy',
    'train_seconds': train_seconds,
    'ms_per_step': 1000.0 * train_seconds / max(steps_run, 1),
    **environment(),
  }


def make_schedule(config, tree: pj.TreeAdapter) -> pj.Schedule | None:
  """``config.schedule = (name in peft_jax.schedules, kwargs)`` or None."""
  if not config.get('schedule'):
    return None
  name, kwargs = config.schedule
  if not hasattr(pj.schedules, name):
    raise pj.PeftError(f'unknown schedule {name!r}; see peft_jax.schedules')
  return getattr(pj.schedules, name)(tree, **kwargs)


class Run(NamedTuple):
  """The fixed parts of one run: what every step and evaluation uses."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  task: tasks.Task
  frozen: pj.Params  # task.frozen placed on the mesh
  rules: list  # config.adapters, after the selection's sparse rules if any
  tree: pj.TreeAdapter
  optimizer: optax.GradientTransformation
  schedule: pj.Schedule | None


def make_mesh(config, sizes: dict[str, int] | None = None) -> jax.sharding.Mesh:
  """The run's ``(data, fsdp, tensor)`` mesh: ``config.mesh`` updated by
  ``sizes`` (the command line's ``--mesh``); unset axes are 1 except
  ``data``, which takes the devices the others leave. The batch must split
  over ``data × fsdp``."""
  wanted = {**(config.get('mesh') or {}), **(sizes or {})}
  unknown = set(wanted) - set(partitioning.MESH_AXES)
  if unknown:
    raise pj.PeftError(
      f'mesh axes {sorted(unknown)} are unknown; expected '
      f'{", ".join(partitioning.MESH_AXES)}'
    )
  mesh = partitioning.make_mesh(**wanted)
  rows = mesh.shape['data'] * mesh.shape['fsdp']
  if config.batch_size % rows:
    raise pj.PeftError(
      f'batch_size={config.batch_size} does not split over data x fsdp = {rows} '
      'devices; pick a batch size or mesh where it does'
    )
  return mesh


def setup(config, workdir: pathlib.Path, mesh: jax.sharding.Mesh) -> Run:
  """Builds the task and places its weights on ``mesh``, selects entries
  (selective runs), builds the tree adapter; writes ``describe.txt``."""
  task = tasks.build(config)
  print(task.describe)
  frozen = partitioning.place(
    task.frozen, partitioning.param_shardings(task.frozen, task.param_axes, mesh)
  )
  rules = selection.rules_for(config, task)
  tree = pj.by_rules(rules)
  if is_writer():
    with open(workdir / 'describe.txt', 'w') as f:
      write = lambda t: f.write(t + '\n')
      pj.describe(rules, task.frozen, task.hooks, print_fn=write)
  schedule = make_schedule(config, tree)
  return Run(config, mesh, task, frozen, rules, tree, make_optimizer(config), schedule)


def initial_state(run: Run) -> pj.TrainState:
  """Step 0: the adapter's fresh parameters and buffers, placed next to the
  weights they adapt (``pj.adapter_shardings``), and the optimizer state.

  ``init`` runs op by op on the placed weights, then θ (adapter-sized) moves
  to its shardings: compiling the whole tree's ``init`` as one program costs
  more than it saves (LoRA on SmolLM2: 72 s against 4 s, one process on the
  2-core VM beside another job, 2026-12-01).
  """
  init_key, rng = jax.random.split(jax.random.key(run.config.seed))
  hooks = run.task.hooks
  shardings = pj.adapter_shardings(run.tree, run.frozen, hooks)
  params, buffers = jax.device_put(
    run.tree.init(init_key, run.frozen, hooks), shardings
  )
  return pj.TrainState.create(
    params,
    buffers,
    run.optimizer,
    rng,
    schedule=run.schedule,
    frozen=run.frozen,
  )


def start_or_resume(run: Run, manager, writer: MetricsWriter):
  """``(state, before)``: the latest checkpoint, else step 0 evaluated."""
  state = initial_state(run)
  if manager.latest_step() is None:
    before = run.task.evaluate(run.tree, run.frozen, state.params, state.buffers)
    writer.write(0, {f'before_{k}': v for k, v in before.items()})
  else:
    state, metadata = pj.restore_checkpoint(manager, state)
    before = metadata['before']
    print(f'resumed from step {int(state.step)} in {manager.directory}')
  print('before:', before)
  return state, before


def train_loop(run: Run, state, manager, writer: MetricsWriter, before):
  """Steps from ``state.step`` to ``config.steps``: logs, checkpoints."""
  config, task = run.config, run.task
  train_step = pj.make_train_step(
    task.loss_fn,
    run.tree,
    run.optimizer,
    factored=config.factored,
    schedule=run.schedule,
  )
  start = int(state.step)
  batch = lambda position: partitioning.process_batch(
    run.mesh, task.train_batch(position)
  )
  step_fn = (
    jax.jit(train_step, donate_argnums=0)
    .lower(state, run.frozen, batch(start))
    .compile()
  )
  memory = step_memory_mib(step_fn)
  positions = range(start, config.steps)
  bar = tqdm.tqdm(positions, initial=start, total=config.steps, disable=not is_writer())
  with bar:
    for position in bar:
      state, metrics = step_fn(state, run.frozen, batch(position))
      step = position + 1
      if step % config.log_every == 0 or step == config.steps:
        metrics = {k: float(v) for k, v in metrics.items()}
        writer.write(step, metrics)
        bar.set_postfix(loss=f'{metrics["loss"]:.4f}')
      if step % config.checkpoint_every == 0 or step == config.steps:
        metadata = {
          'data_position': step,
          'before': before,
          'config': json.loads(config.to_json()),
        }
        pj.save_checkpoint(manager, state, metadata)
  return state, memory


def step_memory_mib(compiled) -> float:
  """Device memory of one compiled train step, from XLA's buffer assignment:
  arguments + outputs + temporaries − donated (aliased) bytes, in MiB. The
  step's own peak on any backend (frozen weights included), not the
  process's resident set."""
  stats = compiled.memory_analysis()
  used = (
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    + stats.temp_size_in_bytes
    - stats.alias_size_in_bytes
  )
  return used / 2**20


def train_and_evaluate(
  config, workdir: str, mesh: dict[str, int] | None = None
) -> dict:
  """Runs (or resumes, or just reports) the experiment; returns the results
  row. ``mesh``: axis sizes over ``config.mesh`` (see ``make_mesh``)."""
  workdir = pathlib.Path(workdir)
  results_path = workdir / 'results.json'
  claim_workdir(workdir, config)
  if results_path.exists():
    print(f'{workdir} is complete; results in {results_path}')
    return json.loads(results_path.read_text())

  device_mesh = make_mesh(config, mesh)
  with jax.set_mesh(device_mesh):  # the models' activation shardings
    return run_on_mesh(config, workdir, device_mesh)


def run_on_mesh(config, workdir: pathlib.Path, mesh: jax.sharding.Mesh) -> dict:
  """``train_and_evaluate`` once the mesh is chosen."""
  run = setup(config, workdir, mesh)
  manager = pj.checkpoint_manager(str(workdir / 'checkpoints'))
  with MetricsWriter(workdir) as writer:
    state, before = start_or_resume(run, manager, writer)
    start, t0 = int(state.step), time.perf_counter()
    state, memory = train_loop(run, state, manager, writer, before)
    train_seconds = time.perf_counter() - t0
    after = run.task.evaluate(run.tree, run.frozen, state.params, state.buffers)
    writer.write(config.steps, {f'after_{k}': v for k, v in after.items()})
  print('after:', after)
  pj.save_adapter(
    str(workdir / 'adapter.safetensors'),
    state.params,
    state.buffers,
    {'adapters': selection.rule_specs(run.rules), 'name': config.name},
  )
  total = sum(int(x.size) for x in jax.tree.leaves(run.task.frozen))
  row = results_row(
    config, state.params, total, before, after, train_seconds, config.steps - start
  )
  row['changed_params'] = changed_count(run, state)
  row['step_memory_mib'] = memory
  row['mesh'] = ','.join(f'{k}={v}' for k, v in mesh.shape.items())
  if is_writer():
    (workdir / 'results.json').write_text(json.dumps(row, indent=2))
  return row


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, help='FILE.py[:key=value,...]')
  parser.add_argument('--workdir', required=True, help='output directory')
  parser.add_argument(
    '--mesh',
    default='',
    help='device mesh sizes, e.g. data=2,fsdp=4 (default: all devices on data)',
  )
  parser.add_argument(
    '--distributed',
    action='store_true',
    help='call jax.distributed.initialize() first (one process per host of a '
    'TPU pod slice or GPU cluster, found from the environment)',
  )
  args = parser.parse_args(argv)
  if args.distributed:
    jax.distributed.initialize()
  try:
    mesh = partitioning.parse_mesh(args.mesh)
    row = train_and_evaluate(common.load_config(args.config), args.workdir, mesh)
  except pj.PeftError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(json.dumps({k: row[k] for k in row if k.startswith(('after_', 'trainable'))}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
