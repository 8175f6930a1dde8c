"""Checkpoints: resumable training state (orbax) and small adapter files.

* ``CheckpointManager`` (orbax) keeps the ``TrainState`` — adapter
  parameters and buffers, optimizer state, step, RNG, schedule state — plus
  JSON metadata: the data position and the run config. Resuming restores all
  of it.
* ``save_adapter``/``load_adapter`` write only the adapter's ``params`` and
  ``buffers`` as one safetensors file (tensor names ``params/<path>`` and
  ``buffers/<path>``, any dtype) with JSON metadata (e.g. the rules): the
  small file to share or to merge elsewhere (from process 0, gathered).
"""

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import safetensors
from jax.experimental import multihost_utils
from safetensors import numpy as safetensors_numpy

from peft_jax._src import paths
from peft_jax._src.base import AdapterParams, Buffers, PeftError
from peft_jax._src.step import TrainState


def checkpoint_manager(
  directory: str, *, max_to_keep: int = 2
) -> ocp.CheckpointManager:
  """An orbax ``CheckpointManager`` over ``directory`` (created if missing)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save_checkpoint(
  manager: ocp.CheckpointManager, state: TrainState, metadata: dict[str, Any]
) -> None:
  """Saves ``state`` at ``state.step`` with JSON ``metadata``; waits for it.

  Args:
    manager: from ``checkpoint_manager``.
    state: the training state.
    metadata: JSON-serialisable, e.g. ``{'data_position': 120, 'config':
      {...}}``.
  """
  manager.save(
    int(state.step),
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)
    ),
  )
  manager.wait_until_finished()


def restore_checkpoint(
  manager: ocp.CheckpointManager, target: TrainState, step: int | None = None
) -> tuple[TrainState, dict[str, Any]]:
  """Restores ``(state, metadata)`` at ``step`` (default: the latest).

  Args:
    manager: from ``checkpoint_manager``.
    target: a state with the right structure (e.g. the fresh state, or
      ``jax.eval_shape`` of it); only shapes and dtypes are used.
    step: which step; ``None`` for the latest.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise PeftError(f'no checkpoint in {manager.directory}')
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), metadata=ocp.args.JsonRestore()
    ),
  )
  return TrainState(*restored.state), restored.metadata


def host_arrays(tree: Any) -> Any:
  """``tree`` with every array as a NumPy array on this process.

  An array that spans devices of other processes (a multi-host mesh) is
  all-gathered first, so under ``jax.distributed`` every process must call
  this with the same tree (a collective).
  """

  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)

  return jax.tree.map(fetch, tree)


def save_adapter(
  path: str, params: AdapterParams, buffers: Buffers, metadata: dict[str, Any]
) -> None:
  """Writes ``params`` and ``buffers`` to one safetensors file with JSON ``metadata``.

  ``metadata`` (e.g. the rules) is stored as JSON under the ``peft_jax`` key.
  An existing file is replaced atomically, so a crash never leaves a
  half-written adapter. Under ``jax.distributed`` every process calls it
  (arrays spanning processes are gathered: ``host_arrays``) and process 0
  alone writes.
  """
  params, buffers = host_arrays((params, buffers))
  if jax.process_index() != 0:
    return
  tensors = {
    f'{part}/{name}': v
    for part, tree in (('params', params), ('buffers', buffers))
    for name, v in paths.flatten(tree).items()
  }
  tmp = f'{path}.tmp'
  safetensors_numpy.save_file(tensors, tmp, metadata={'peft_jax': json.dumps(metadata)})
  os.replace(tmp, path)


def load_adapter(
  path: str, like: tuple[AdapterParams, Buffers] | None = None
) -> tuple[AdapterParams, Buffers, dict[str, Any]]:
  """Reads ``(params, buffers, metadata)`` written by ``save_adapter``.

  Args:
    path: the safetensors file.
    like: ``(params, buffers)`` of the right structure (e.g.
      ``jax.eval_shape(adapter.init, key, frozen)``) to restore the typed
      parameters of each method; without it, nested dicts of arrays.
  """
  with safetensors.safe_open(path, framework='numpy') as f:
    metadata = json.loads((f.metadata() or {}).get('peft_jax', '{}'))
    tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
  parts = {'params': {}, 'buffers': {}}
  for name, value in tensors.items():
    part, _, rest = name.partition('/')
    if part not in parts:
      raise PeftError(f'{path}: tensor {name!r} is not under params/ or buffers/')
    parts[part][rest] = value
  if like is None:
    return paths.nest(parts['params']), paths.nest(parts['buffers']), metadata
  restored = [
    fill_like(path, part, parts[part], tree)
    for part, tree in zip(('params', 'buffers'), like, strict=True)
  ]
  return *restored, metadata


def fill_like(path: str, part: str, flat: dict, like: Any) -> Any:
  """``like`` with every leaf taken from ``flat`` by name, shapes checked."""
  names = paths.flatten(like)
  missing = sorted(set(names) - set(flat)) or sorted(set(flat) - set(names))
  if missing:
    raise PeftError(
      f'{path}: the {part} do not match this adapter, e.g. at {missing[0]!r}'
    )

  def take(name, leaf):
    if np.shape(flat[name]) != np.shape(leaf):
      raise PeftError(
        f'{path}: {part}/{name} has shape {np.shape(flat[name])}; this adapter '
        f'needs {np.shape(leaf)}'
      )
    return flat[name]

  return paths.map_named(take, like)
