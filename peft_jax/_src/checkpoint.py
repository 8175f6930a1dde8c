"""Checkpoints: resumable training state (orbax) and small adapter files.

* ``CheckpointManager`` (orbax) keeps the ``TrainState`` — adapter
  parameters, optimizer state, step, RNG — plus JSON metadata: the data
  position and the run config. Resuming restores all of it.
* ``save_adapter``/``load_adapter`` write only ``theta`` as one safetensors
  file (names are the ``/``-joined leaf paths) with the method spec in its
  metadata: the small file to share or to merge elsewhere.
"""

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import safetensors
from safetensors import numpy as safetensors_numpy

from peft_jax._src import paths
from peft_jax._src.base import AdapterParams, PeftError
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


def save_adapter(path: str, theta: AdapterParams, metadata: dict[str, Any]) -> None:
  """Writes ``theta`` to one safetensors file with JSON ``metadata``.

  Tensor names are the ``/``-joined paths of ``theta``; ``metadata`` (e.g.
  the rules) is stored as JSON under the ``peft_jax`` key. An existing file
  is replaced atomically, so a crash never leaves a half-written adapter.
  """
  tensors = {k: np.asarray(v) for k, v in paths.flatten(theta).items()}
  tmp = f'{path}.tmp'
  safetensors_numpy.save_file(tensors, tmp, metadata={'peft_jax': json.dumps(metadata)})
  os.replace(tmp, path)


def load_adapter(path: str) -> tuple[AdapterParams, dict[str, Any]]:
  """Reads ``(theta, metadata)`` written by ``save_adapter``."""
  with safetensors.safe_open(path, framework='numpy') as f:
    metadata = json.loads((f.metadata() or {}).get('peft_jax', '{}'))
    tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
  return paths.nest(tensors), metadata
