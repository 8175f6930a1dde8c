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
again, and writes into ``DIR``. With ``eval_every = E > 0`` it also
evaluates every E steps; the results row then adds the evaluation with the
best validation metric (``best_evaluation``), the periodic ones and the
final one, so a table can report the test metric at the step a held-out
split picks, as GLUE papers do, without choosing on the test split.

  .lock                  held by the running trainer (its PID): one per DIR
  config.json            the run config (a different config in DIR is refused;
                         LOGISTICS fields may change on a resume)
  describe.txt           every leaf and hook point: shape, method, trainable
  metrics.jsonl          training and evaluation metrics, one JSON per line
                         (before_*, eval_* every eval_every steps, after_*)
  tensorboard/           the same metrics for TensorBoard
  checkpoints/           orbax: adapter params and buffers, optimizer state,
                         step, RNG, schedule state, data position, config;
                         each step with a manifest of its files (CRC-32s)
  checkpoints.damaged/   steps found damaged at a resume, moved aside
  adapter.safetensors    the trained adapter params and buffers only (small)
  results.json           the results row (see ``results_row``)

Files are replaced atomically (a kill leaves the old file or the new one);
a kill loses at most ``checkpoint_every`` steps or ``checkpoint_minutes``.
A step with a non-finite loss or gradient stops the run (``nonfinite=stop``,
the default; nothing non-finite is ever saved) or is skipped
(``nonfinite=skip``).
"""

import argparse
import contextlib
import datetime
import fcntl
import json
import math
import os
import pathlib
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter

import peft_jax as pj
from experiments import selection, tasks
from experiments.configs import common
from peft_jax import analysis
from peft_jax._src import files, paths
from peft_jax.models import partitioning


def is_writer() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


class MetricsWriter:
  """Appends metrics to ``metrics.jsonl`` and to TensorBoard (process 0;
  on other processes it writes nothing).

  ``metrics.jsonl`` is append-only; a run that resumes from step ``t``
  first keeps only the lines of steps up to ``t`` (``keep_until``): a torn
  last line of a killed run and the lines of steps it redoes go. Its new
  TensorBoard event file starts with ``purge_step = t + 1``, so TensorBoard
  hides what the killed run wrote past ``t`` instead of plotting the redone
  steps twice.
  """

  def __init__(self, workdir: pathlib.Path):
    self._jsonl = self._board = None
    self._workdir = workdir
    self._path = workdir / 'metrics.jsonl'

  def keep_until(self, step: int) -> None:
    """Drops the lines after step ``step`` (and unreadable ones), then opens
    the file for appending, and TensorBoard's from step ``step + 1``."""
    if not is_writer():
      return
    board_dir = str(self._workdir / 'tensorboard')
    self._board = SummaryWriter(board_dir, purge_step=step + 1)
    lines = self._path.read_text().splitlines() if self._path.exists() else []
    kept = [x for x in lines if _step_of(x) is not None and _step_of(x) <= step]
    if kept != lines:
      files.write_text_atomically(self._path, ''.join(f'{x}\n' for x in kept))
    self._jsonl = open(self._path, 'a')  # noqa: SIM115

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if self._board is None:
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
    if self._board is not None:
      self._board.close()


def _step_of(line: str) -> int | None:
  """The step of a ``metrics.jsonl`` line, or None for a torn line."""
  try:
    return int(json.loads(line)['step'])
  except (ValueError, KeyError, TypeError):
    return None


def config_json(config) -> dict:
  """The config as JSON (what config.json and the checkpoints record)."""
  try:
    return json.loads(config.to_json())
  except TypeError as e:
    raise pj.PeftError(
      f'the config holds a value JSON cannot record ({e}'.split('. ')[0] + '); '
      'use strings (regex selectors, method specs), numbers, lists and dicts'
    ) from None


# Config fields a resumed run may change: when and what it records, not what
# it computes.
LOGISTICS = ('checkpoint_every', 'checkpoint_minutes', 'log_every')
# Fields added to the configs after runs were recorded without them, and the
# value those runs had in effect.
ADDED_FIELDS = {
  'nonfinite': 'stop',
  'seeds': 1,
  'lrs': [],
  'adapters_per_pass': 0,
  'eval_every': 0,
}


def differing_keys(found: dict, wanted: dict) -> str:
  """``'lr, steps'``: the top-level keys where two configs (as JSON) differ,
  ``LOGISTICS`` aside, a missing ``ADDED_FIELDS`` key read as its value;
  ``''`` for the same run."""
  found, wanted = ({**ADDED_FIELDS, **config} for config in (found, wanted))
  keys = (wanted.keys() | found.keys()) - set(LOGISTICS)
  return ', '.join(sorted(k for k in keys if found.get(k) != wanted.get(k)))


def read_json(path: pathlib.Path, *, move_damaged: bool = True) -> dict | list | None:
  """The JSON object in ``path`` (or list: the rows of several adapters), or
  None when it is missing. A file that is neither (damaged by hand, or by a
  crash of an older version) is
  renamed ``<name>.damaged`` (kept) and reported, unless not
  ``move_damaged``, and None is returned."""
  if not path.exists():
    return None
  try:
    found = json.loads(path.read_text())
    if isinstance(found, dict | list):
      return found
  except (ValueError, UnicodeDecodeError):
    pass
  if not move_damaged:
    return None
  aside = path.with_name(path.name + '.damaged')
  if is_writer():
    path.replace(aside)
  print(f'{path} is not a JSON object; moved to {aside}, it will be written again')
  return None


def check_workdir(workdir: pathlib.Path, config) -> None:
  """Refuses a ``workdir`` that is a file or holds a different run (its
  ``config.json``); reads only."""
  if workdir.exists() and not workdir.is_dir():
    raise pj.PeftError(f'--workdir {str(workdir)!r} is a file, not a directory')
  wanted = config_json(config)  # a config JSON cannot record fails here
  path = workdir / 'config.json'
  found = read_json(path, move_damaged=False) if workdir.is_dir() else None
  changed = found and differing_keys(found, wanted)
  if changed:
    raise pj.PeftError(
      f'{workdir} holds a run with a different config (keys {changed} differ); '
      'use a new --workdir to keep both'
    )


@contextlib.contextmanager
def workdir_lock(workdir: pathlib.Path):
  """Holds ``workdir/.lock`` exclusively (``flock``; the kernel releases it
  when the process ends, however it ends). A second trainer on the same
  ``workdir`` gets a ``PeftError`` naming the holder's PID. Process 0 locks;
  the other processes of a distributed run share its lock."""
  if not is_writer():
    yield
    return
  workdir.mkdir(parents=True, exist_ok=True)
  with open(workdir / '.lock', 'a+') as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      lock.seek(0)
      holder = lock.read().strip() or 'unknown'
      raise pj.PeftError(
        f'{workdir} is in use by another trainer (PID {holder}); wait for it '
        'to finish or use another --workdir'
      ) from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    yield


def claim_workdir(workdir: pathlib.Path, config) -> None:
  """Records the config in ``workdir/config.json`` (once ``check_workdir``
  passed and the lock is held), unless it is there; a damaged one is moved
  aside and written again (the checkpoints' own config still guards the
  run's identity)."""
  path = workdir / 'config.json'
  if is_writer() and read_json(path) is None:
    files.write_text_atomically(path, json.dumps(config_json(config), indent=2))


def lr_schedule(config, peak: float) -> optax.Schedule:
  """Linear warm-up from 0 to ``peak`` over ``config.warmup_steps``, then
  linear decay to 0 at ``config.steps``."""
  return optax.schedules.join_schedules(
    [
      optax.schedules.linear_schedule(0.0, peak, config.warmup_steps),
      optax.schedules.linear_schedule(peak, 0.0, config.steps - config.warmup_steps),
    ],
    [config.warmup_steps],
  )


def decay_mask(config):
  """Where AdamW's weight decay acts, by ``config.weight_decay_mask``: every
  trained parameter (``'all'``, the default: ``None``), or all but biases
  and normalisation layers (``'hf_trainer'``: ``pj.hf_decay_mask``)."""
  mask = config.get('weight_decay_mask', 'all')
  return pj.hf_decay_mask if mask == 'hf_trainer' else None


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW on ``lr_schedule(config, config.lr)``, decaying ``decay_mask(config)``."""
  return optax.adamw(
    lr_schedule(config, config.lr),
    weight_decay=config.weight_decay,
    mask=decay_mask(config),
  )


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


# The new head every classifier task trains in full: left out of the update
# rank, which describes what a method does to the pretrained encoder.
HEAD_LEAF = re.compile(r'(^|/)(classifier|pooler)(/|$)')


def update_counts(run: 'Run', state: pj.TrainState) -> dict[str, int | None]:
  """The guide's (Lialin et al.) counts beside the trainable one, measured on
  the merged model (``None`` where the tree is not mergeable):

  * ``changed_params``: ``‖θ − θ0‖₀``, entries of the frozen tree the
    trained adapter changes (the head included);
  * ``update_rank``: the largest rank of ``ΔW = W' − W`` over the changed
    kernels and embeddings (leaves of 2 or more axes, ranked per last-two-axes
    matrix, ``peft_jax.analysis.update_rank``), the task's new head
    (``HEAD_LEAF``) left out; 0 when the method changes no matrix (BitFit).
  """
  if not run.tree.mergeable:
    return {'changed_params': None, 'update_rank': None}
  merged = pj.merge(run.tree, run.frozen, state.params, state.buffers)
  merged, frozen = pj.dequantize((merged, run.frozen))  # quantized: their values
  changed, rank = 0, 0
  merged = paths.flatten(merged)
  for path, old in paths.flatten(frozen).items():
    new, old = np.asarray(merged[path], np.float32), np.asarray(old, np.float32)
    changed += int(np.count_nonzero(new != old))
    if new.ndim >= 2 and (new != old).any() and not HEAD_LEAF.search(path):
      rank = max(rank, analysis.update_rank(new, old))
  return {'changed_params': changed, 'update_rank': rank}


def results_row(config, params, total, before, after, loop: 'LoopStats', steps_run):
  """The one-line summary of a run that comparison tables are built from.

  ``task``, ``model``, ``dataset``, ``steps``, ``batch_size`` and
  ``eval_limit`` (None: every example) say which runs are comparable
  (``experiments.compare``); ``<before|after>_<split>_examples`` count the
  examples each evaluation metric is over. ``train_seconds`` is the wall time
  of the ``steps_run`` steps this process ran (after a resume: those after
  the checkpoint), each step's batch, dispatch and wait for its loss; it
  leaves out the step's compile (``compile_seconds``), logging,
  checkpoints and evaluations. ``ms_per_step`` is its mean, None when this
  process ran no step (resumed from the last step's checkpoint). With
  periodic evaluations (``loop.evaluations``, this adapter's) the row also
  has ``best_step`` and ``best_<split>_<metric>`` (``best_evaluation``).
  """
  trainable = pj.count(params)
  metric = 'score' if 'test_score' in after else 'accuracy'
  best = (
    best_evaluation(loop.evaluations, config.steps, after, metric)
    if loop.evaluations
    else {}
  )
  return {
    'name': config.name,
    'task': config.task,
    **model_and_dataset(config),
    'method': config.method,
    'group': config.get('group', config.method),
    'seed': config.seed,
    'adapters': [list(rule) for rule in config.adapters],
    'selection': config.get('selection') and config.selection.to_dict(),
    'trainable_params': trainable,
    'total_params': total,
    'trainable_percent': 100.0 * trainable / total,
    'steps': config.steps,
    'batch_size': config.batch_size,
    'eval_limit': config.data.get('eval_limit'),
    'lr': config.lr,
    **{f'before_{k}': v for k, v in before.items()},
    **{f'after_{k}': v for k, v in after.items()},
    **best,
    'metric': metric,
    'train_seconds': loop.train_seconds,
    'ms_per_step': 1000.0 * loop.train_seconds / steps_run if steps_run else None,
    'compile_seconds': loop.compile_seconds,
    'step_memory_mib': loop.step_memory_mib,
    'skipped_steps': loop.skipped_steps,
    **environment(),
  }


def best_evaluation(
  periodic: list[tuple[int, dict]], steps: int, final: dict, metric: str
) -> dict:
  """``{'best_step': t, 'best_<split>_<metric>': ...}``: of the periodic
  evaluations ``(step, metrics)`` and the ``final`` one at ``steps``, the
  one with the highest ``validation_<metric>`` (every headline metric grows
  with quality; a NaN never wins; the earliest wins a tie).

  Raises:
    PeftError: when the evaluations have no validation split to choose by.
  """
  key = f'validation_{metric}'
  candidates = [*periodic, (steps, final)]
  if any(key not in metrics for _, metrics in candidates):
    raise pj.PeftError(
      f'eval_every picks the evaluation with the best {key}, and this task '
      'has no validation split (data.heldout=0?)'
    )
  score = lambda c: -math.inf if math.isnan(c[1][key]) else c[1][key]
  step, metrics = max(candidates, key=score)  # max keeps the first of equals
  return {'best_step': step, **{f'best_{k}': v for k, v in metrics.items()}}


def model_and_dataset(config) -> dict[str, str]:
  """The run's ``model`` (checkpoint name, or its directory's) and ``dataset``
  (data set or GLUE task) by name, for grouping results rows."""
  model, data = config.model, config.data
  return {
    'model': model.get('checkpoint') or pathlib.Path(model.checkpoint_dir).name,
    'dataset': data.get('name') or data.task,
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


def setup(
  config, workdir: pathlib.Path, mesh: jax.sharding.Mesh, task: tasks.Task | None = None
) -> Run:
  """Builds the task (unless given) and places its weights on ``mesh``,
  selects entries (selective runs), builds the tree adapter; writes
  ``describe.txt``."""
  task = task or tasks.build(config)
  print(task.describe)
  frozen = partitioning.place(
    task.frozen, partitioning.param_shardings(task.frozen, task.param_axes, mesh)
  )
  rules = selection.rules_for(config, task)
  pj.serialize_rules(rules)  # an unsavable rule fails now, not after training
  tree = pj.by_rules(rules)
  if is_writer():
    lines = []
    pj.describe(rules, task.frozen, task.hooks, print_fn=lines.append)
    files.write_text_atomically(workdir / 'describe.txt', '\n'.join(lines) + '\n')
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


def same_run_only(manager, config) -> Callable[[dict], None]:
  """``accept`` of ``pj.restore_newest_good``: refuses a checkpoint whose
  recorded config differs from ``config`` (``differing_keys``)."""
  wanted = config_json(config)

  def accept(metadata):
    changed = metadata.get('config') and differing_keys(metadata['config'], wanted)
    if changed:
      raise pj.PeftError(
        f'{manager.directory} holds checkpoints of a run with a different '
        f'config (keys {changed} differ); use a new --workdir to keep both'
      )

  return accept


def start_or_resume(run: Run, manager, writer: MetricsWriter):
  """``(state, metadata)``: the newest good checkpoint (damaged steps are
  moved aside: ``pj.restore_newest_good``) and its metadata, else step 0
  evaluated. A checkpoint of a different config is refused."""
  state = initial_state(run)
  restored = pj.restore_newest_good(
    manager, state, accept=same_run_only(manager, run.config)
  )
  if restored is None:
    writer.keep_until(-1)
    before = run.task.evaluate(run.tree, run.frozen, state.params, state.buffers)
    writer.write(0, logged_evaluation([before], 'before', ()))
    metadata = {'before': before, 'skipped_steps': 0}
  else:
    state, metadata = restored
    writer.keep_until(int(state.step))
    print(f'resumed from step {int(state.step)} in {manager.directory}')
  print('before:', metadata['before'])
  return state, metadata


class LoopStats(NamedTuple):
  """What ``train_loop`` measured (see ``results_row``)."""

  step_memory_mib: float  # step_memory_mib of the compiled step
  compile_seconds: float  # lowering and compiling the step
  train_seconds: float  # the steps: batch, dispatch, wait for the loss
  # steps skipped for non-finite values (nonfinite='skip'); per adapter for several
  skipped_steps: int | list[int]
  # The periodic evaluations (eval_every): ``{'step': t, 'metrics': [one
  # dict per adapter]}``; ``adapter_evaluations`` takes one adapter's.
  evaluations: Sequence = ()


def adapter_evaluations(evaluations: list[dict], i: int) -> list[tuple[int, dict]]:
  """Adapter ``i``'s ``(step, metrics)`` of ``LoopStats.evaluations``."""
  return [(e['step'], e['metrics'][i]) for e in evaluations]


def logged_evaluation(evaluations: list[dict], prefix: str, labels) -> dict:
  """The scalars to log of one evaluation of each adapter: ``{'<prefix>_<k>':
  v}`` for one adapter, ``{'<label>/<prefix>_<k>': v}`` for several."""
  if not labels:
    return {f'{prefix}_{k}': v for k, v in evaluations[0].items()}
  stacked = {f'{prefix}_{k}': [e[k] for e in evaluations] for k in evaluations[0]}
  return scalars(stacked, labels)


def checkpoint_due(config, step: int, seconds_since_save: float) -> bool:
  """Whether to checkpoint after ``step``: every ``checkpoint_every`` steps,
  at the last step, and once ``checkpoint_minutes`` passed since the last
  save (process 0's clock decides for every process)."""
  minutes = config.get('checkpoint_minutes') or float('inf')
  due = (
    step % config.checkpoint_every == 0
    or step == config.steps
    or seconds_since_save >= 60 * minutes
  )
  if jax.process_count() > 1:
    due = bool(multihost_utils.broadcast_one_to_all(np.bool_(due)))
  return due


class Program(NamedTuple):
  """What ``train_loop`` runs: one adapter, or several trained together
  (``experiments.train_many``), whose metrics then carry a leading axis."""

  step: Callable  # (state, frozen, batch) -> (state, metrics)
  batch: Callable[[int], Any]  # data position -> the placed batch
  evaluate: Callable[[Any], list[dict]]  # state -> each adapter's metrics
  labels: tuple[str, ...] = ()  # the adapters' labels; () for one adapter


def single_program(run: Run) -> Program:
  """One adapter: ``make_train_step`` on the task's batches."""
  config, task = run.config, run.task
  step = pj.make_train_step(
    task.loss_fn,
    run.tree,
    run.optimizer,
    factored=config.factored,
    schedule=run.schedule,
    skip_nonfinite=config.get('nonfinite', 'stop') == 'skip',
  )
  batch = lambda position: partitioning.process_batch(
    run.mesh, task.train_batch(position)
  )
  evaluate = lambda state: [
    task.evaluate(run.tree, run.frozen, state.params, state.buffers)
  ]
  return Program(step, batch, evaluate)


def scalars(metrics: dict, labels: tuple[str, ...]) -> dict[str, float]:
  """Logged metrics: ``{name: float}``, or per adapter ``{'label/name': float}``."""
  if not labels:
    return {k: float(v) for k, v in metrics.items()}
  rows = {k: np.asarray(v).reshape(len(labels)) for k, v in metrics.items()}
  return {
    f'{label}/{k}': float(v[i])
    for i, label in enumerate(labels)
    for k, v in rows.items()
  }


def train_loop(
  run: Run,
  state,
  manager,
  writer: MetricsWriter,
  resumed: dict,
  program: Program | None = None,
):
  """Steps from ``state.step`` to ``config.steps`` of ``program`` (default:
  ``single_program``): logs, evaluates every ``eval_every`` steps before the
  last (the evaluations so far travel in each checkpoint's metadata),
  checkpoints.

  A step with a non-finite loss or gradient (of any adapter) stops the run
  with a one-line ``PeftError`` naming it and the last good checkpoint
  (nothing is saved after it), or with ``config.nonfinite = 'skip'`` leaves
  that adapter's state as it was and is counted.

  Returns:
    ``(state, LoopStats)``: the trained state, and the step's memory and
    compile time, the steps' time and the skipped steps (a list per adapter
    for several).
  """
  config = run.config
  program = program or single_program(run)
  skip = config.get('nonfinite', 'stop') == 'skip'
  start = int(state.step)
  example = program.batch(start)
  compile_start = time.perf_counter()
  step_fn = jax.jit(program.step, donate_argnums=0).lower(state, run.frozen, example)
  step_fn = step_fn.compile()
  compile_seconds = time.perf_counter() - compile_start
  train_seconds = 0.0
  skipped = np.asarray(resumed['skipped_steps'])
  evaluations = list(resumed.get('evaluations', []))
  eval_every = config.get('eval_every', 0)
  last_good = start if manager.latest_step() is not None else None
  saved_at = time.monotonic()
  positions = range(start, config.steps)
  with tasks.progress(positions, initial=start, total=config.steps) as bar:
    for position in bar:
      step_start = time.perf_counter()
      state, metrics = step_fn(state, run.frozen, program.batch(position))
      # Wait for the step: dispatch returns at once, so without this the bar
      # (and train_seconds) saw near-free steps, then a log step waiting for
      # all of them.
      jax.block_until_ready(metrics['loss'])
      bad = ~np.asarray(metrics.pop('finite')).reshape(-1)
      train_seconds += time.perf_counter() - step_start
      step = position + 1
      if bad.any() and not skip:
        first = int(np.argmax(bad))
        which = f' of adapter {program.labels[first]}' if program.labels else ''
        loss = np.asarray(metrics['loss']).reshape(-1)[first]
        raise pj.PeftError(
          f'step {step} has a non-finite loss or gradient{which} (loss '
          f'{float(loss)}); stopped without saving it, '
          f'{last_checkpoint(manager, last_good)}; lower lr, or pass '
          'nonfinite=skip to skip such steps'
        )
      skipped = skipped + np.asarray(metrics.pop('skipped', 0))
      if step % config.log_every == 0 or step == config.steps:
        logged = scalars({**metrics, 'skipped_steps': skipped}, program.labels)
        writer.write(step, logged)
        bar.set_postfix(loss=f'{float(np.mean(metrics["loss"])):.4f}')
      if eval_every and step % eval_every == 0 and step < config.steps:
        evaluated = program.evaluate(state)
        writer.write(step, logged_evaluation(evaluated, 'eval', program.labels))
        evaluations.append({'step': step, 'metrics': evaluated})
      if checkpoint_due(config, step, time.monotonic() - saved_at):
        metadata = {
          'data_position': step,
          'before': resumed['before'],
          'skipped_steps': skipped.tolist(),
          'evaluations': evaluations,
          'config': config_json(config),
        }
        try:
          pj.save_checkpoint(manager, state, metadata)
        except pj.PeftError as e:
          raise pj.PeftError(f'{e}; {last_checkpoint(manager, last_good)}') from None
        last_good, saved_at = step, time.monotonic()
  stats = LoopStats(
    step_memory_mib(step_fn),
    compile_seconds,
    train_seconds,
    skipped.tolist(),
    evaluations,
  )
  return state, stats


def last_checkpoint(manager, step: int | None) -> str:
  """``'the last good checkpoint is step 40 in DIR'`` (or that none is)."""
  if step is None:
    return f'no checkpoint was saved in {manager.directory}'
  return f'the last good checkpoint is step {step} in {manager.directory}'


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
) -> dict | list[dict]:
  """Runs (or resumes, or just reports) the experiment; returns the results
  row, or with ``seeds``/``lrs`` the rows of its adapters
  (``experiments.train_many``). ``mesh``: axis sizes over ``config.mesh``
  (see ``make_mesh``).

  Everything that can be checked without the model is checked before
  anything is written (``common.check_config``, ``make_mesh``,
  ``check_workdir``); then the workdir is locked for this run
  (``workdir_lock``).
  """
  common.check_config(config)
  device_mesh = make_mesh(config, mesh)
  workdir = pathlib.Path(workdir)
  check_workdir(workdir, config)
  with workdir_lock(workdir):
    claim_workdir(workdir, config)
    row = read_json(workdir / 'results.json')
    if row is not None:
      print(f'{workdir} is complete; results in {workdir / "results.json"}')
      return row
    with jax.set_mesh(device_mesh):  # the models' activation shardings
      from experiments import train_many  # here: it imports this module

      if train_many.group_size(config) > 1:
        return train_many.run_on_mesh(config, workdir, device_mesh)
      return run_on_mesh(config, workdir, device_mesh)


def run_on_mesh(config, workdir: pathlib.Path, mesh: jax.sharding.Mesh) -> dict:
  """``train_and_evaluate`` once the mesh is chosen."""
  run = setup(config, workdir, mesh)
  manager = pj.checkpoint_manager(str(workdir / 'checkpoints'))
  with MetricsWriter(workdir) as writer:
    state, resumed = start_or_resume(run, manager, writer)
    start = int(state.step)
    state, loop = train_loop(run, state, manager, writer, resumed)
    after = run.task.evaluate(run.tree, run.frozen, state.params, state.buffers)
    writer.write(config.steps, logged_evaluation([after], 'after', ()))
  print('after:', after)
  save_run_adapter(workdir / 'adapter.safetensors', run, state)
  loop = loop._replace(evaluations=adapter_evaluations(loop.evaluations, 0))
  row = run_row(run, state, resumed['before'], after, loop, config.steps - start)
  if is_writer():
    files.write_text_atomically(workdir / 'results.json', json.dumps(row, indent=2))
  return row


def save_run_adapter(path: pathlib.Path, run: Run, state: pj.TrainState) -> None:
  """The trained adapter's file (``pj.save_adapter``): params, buffers, the
  rules, and the task's metadata named after the run."""
  pj.save_adapter(
    str(path),
    state.params,
    state.buffers,
    {**run.task.adapter_metadata, 'name': run.config.name},
    rules=run.rules,
  )


def run_row(run: Run, state, before, after, loop: LoopStats, steps_run: int) -> dict:
  """``results_row`` of the trained ``state``, with the entries it changes
  and its update rank (``update_counts``) and the mesh it ran on."""
  leaves = jax.tree.leaves(run.frozen, is_leaf=pj.is_quantized)
  total = sum(int(x.size) for x in leaves)  # a quantized leaf's logical size
  row = results_row(run.config, state.params, total, before, after, loop, steps_run)
  row.update(update_counts(run, state))
  row['mesh'] = ','.join(f'{k}={v}' for k, v in run.mesh.shape.items())
  return row


class OneLineParser(argparse.ArgumentParser):
  """argparse whose errors are ``PeftError``s: one line from ``main``."""

  def error(self, message):
    raise pj.PeftError(f'{message} (see --help)')


def config_help(argv: list[str]) -> str:
  """The ``--help`` epilog: with ``--config FILE[:ARG]``, the config
  module's docstring and the config's fields, each with its value and its
  meaning (``common.FIELDS``); without, how to get them."""
  before = OneLineParser(add_help=False)
  before.add_argument('--config')
  spec = before.parse_known_args(argv)[0].config
  if not spec:
    return "--config FILE[:ARG] --help lists that config's arguments and fields."
  doc = common.load_module(spec.partition(':')[0]).__doc__ or ''
  fields = common.describe_fields(common.load_config(spec))
  return (
    f'{doc.strip()}\n\nConfig fields as get_config sets them for {spec} '
    f"(the arguments after ':' are how to change them):\n{fields}"
  )


def make_parser(epilog: str | None = None) -> OneLineParser:
  """The command line's parser; ``epilog`` ends its ``--help``."""
  parser = OneLineParser(
    description=__doc__.split('\n')[0],
    epilog=epilog,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument(
    '--config',
    required=True,
    help='FILE.py[:key=value,...]: the config module and the arguments of '
    'its get_config (--config FILE --help lists them)',
  )
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
  return parser


def main(argv=None) -> int:
  """Trains as the command line says; returns the exit status (2 after a
  one-line ``error: ...`` for a bad argument)."""
  argv = sys.argv[1:] if argv is None else argv
  wants_help = {'-h', '--help'} & set(argv)
  try:
    args = make_parser(config_help(argv) if wants_help else None).parse_args(argv)
    if args.distributed:
      jax.distributed.initialize()
    mesh = partitioning.parse_mesh(args.mesh)
    row = train_and_evaluate(common.load_config(args.config), args.workdir, mesh)
  except pj.PeftError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  several = isinstance(row, list)  # a group's rows: name each
  shown = ('after_', 'best_', 'trainable')
  shown = ('name', *shown) if several else shown
  for one in row if several else [row]:
    print(json.dumps({k: one[k] for k in one if k.startswith(shown)}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
