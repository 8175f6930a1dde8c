"""Checkpoints: resumable training state (orbax) and small adapter files.

* ``CheckpointManager`` (orbax) keeps the ``TrainState`` — adapter
  parameters and buffers, optimizer state, step, RNG, schedule state — plus
  JSON metadata: the data position and the run config. Resuming restores all
  of it.
* ``save_adapter``/``load_adapter`` write only the adapter's ``params`` and
  ``buffers`` as one safetensors file (tensor names ``params/<path>`` and
  ``buffers/<path>``, any dtype) with JSON metadata: the small file to share
  or to merge elsewhere (from process 0, gathered). ``load_adapter_file``
  reads it back with the adapter its rules describe.

The JSON metadata of an adapter file (under the safetensors key
``peft_jax``) holds ``format_version`` and ``peft_jax_version``, ``adapters``
(the rules, ``serialize_rules``) when they were given, and what the caller
adds; ``peft_jax.from_pretrained`` and the trainer use ``base_model`` (an HF
folder, a ``.gguf`` file or a shipped name, ``'smollm2'``/``'minilm'``),
``tokenizer`` (the same kinds of reference), ``head`` (a new task head:
``{'kind': 'sequence_classification', 'num_labels', 'pooling', 'seed'}``),
``labels`` (class names in logit order), ``quantize`` (the kind of
``peft_jax.quantize`` the frozen kernels were stored in), ``max_length``,
``task`` and ``prompt``.
"""

import importlib.metadata
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
import safetensors
from jax.experimental import multihost_utils
from safetensors import numpy as safetensors_numpy

from peft_jax._src import paths
from peft_jax._src.base import AdapterParams, Buffers, Params, PeftError, TreeAdapter
from peft_jax._src.rules import Rule, deserialize_rules, serialize_rules
from peft_jax._src.step import TrainState
from peft_jax._src.tree import by_rules

FORMAT_VERSION = 1  # of adapter files; raise it when their layout changes


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
  path: str,
  params: AdapterParams,
  buffers: Buffers,
  metadata: Mapping[str, Any] | None = None,
  *,
  rules: Sequence[Rule] | None = None,
) -> None:
  """Writes ``params`` and ``buffers`` to one safetensors file with JSON metadata.

  The metadata (see the module docstring) is ``metadata`` plus
  ``format_version``, ``peft_jax_version`` and, with ``rules``, the rules as
  ``adapters``, so ``load_adapter_file`` rebuilds the adapter. An existing
  file is replaced atomically, so a crash never leaves a half-written
  adapter. Under ``jax.distributed`` every process calls it (arrays spanning
  processes are gathered: ``host_arrays``) and process 0 alone writes.

  Args:
    path: the file to write.
    params: the adapter's trainable parameters.
    buffers: its buffers.
    metadata: JSON-serialisable entries to record, e.g. ``{'base_model':
      'minilm', 'labels': ['rotten', 'fresh']}``.
    rules: the rules the adapter was built with (``by_rules(rules)``).

  Raises:
    PeftError: for a rule that a file cannot record (``serialize_rules``).
  """
  record = {
    **(metadata or {}),
    'format_version': FORMAT_VERSION,
    'peft_jax_version': _version(),
  }
  if rules is not None:
    record['adapters'] = serialize_rules(rules)
  params, buffers = host_arrays((params, buffers))
  if jax.process_index() != 0:
    return
  tensors = {
    f'{part}/{name}': v
    for part, tree in (('params', params), ('buffers', buffers))
    for name, v in paths.flatten(tree).items()
  }
  tmp = f'{path}.tmp'
  safetensors_numpy.save_file(tensors, tmp, metadata={'peft_jax': json.dumps(record)})
  os.replace(tmp, path)


def _version() -> str:
  try:
    return importlib.metadata.version('peft_jax')
  except importlib.metadata.PackageNotFoundError:  # run from a source tree
    return 'unknown'


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
  parts, metadata = _read(path)
  if like is None:
    return paths.nest(parts['params']), paths.nest(parts['buffers']), metadata
  return *_restore(path, parts, like), metadata


class LoadedAdapter(NamedTuple):
  """An adapter file made ready to use (``load_adapter_file``).

  Attributes:
    adapter: ``by_rules`` of the rules the file records.
    params: its trainable parameters, typed per method.
    buffers: its buffers.
    metadata: the file's JSON metadata.
  """

  adapter: TreeAdapter
  params: AdapterParams
  buffers: Buffers
  metadata: dict[str, Any]


def load_adapter_file(
  path: str, frozen: Params, hooks: Mapping[str, Any] | None = None
) -> LoadedAdapter:
  """Reads an adapter file and rebuilds its adapter from the rules it records.

  ``load_adapter(path, like)`` needs the adapter already built; this builds
  it from the file's ``adapters`` metadata (written by ``save_adapter(...,
  rules=...)``).

  Args:
    path: the safetensors file.
    frozen: the weights the adapter was trained on (arrays or
      ``jax.ShapeDtypeStruct``s).
    hooks: the model's hook points (``peft_jax.hook_points``), where the rules
      select activation adapters.

  Returns:
    A ``LoadedAdapter``: ``adapted(loaded.adapter, fn)(frozen, loaded.params,
    loaded.buffers, ...)`` runs the model as it was saved.

  Raises:
    PeftError: for a file that records no rules, rules that do not fit
      ``frozen``/``hooks``, or arrays that do not fit the adapter.
  """
  parts, metadata = _read(path)
  if 'adapters' not in metadata:
    raise PeftError(
      f"{path}: its metadata records no rules ('adapters'); save it with "
      'pj.save_adapter(..., rules=rules), or read its arrays with '
      'pj.load_adapter(path, like)'
    )
  try:
    adapter = by_rules(deserialize_rules(metadata['adapters']))
    like = jax.eval_shape(adapter.init, jax.random.key(0), frozen, hooks)
  except PeftError as e:
    raise PeftError(f'{path}: {e}') from None
  params, buffers = jax.device_put(_restore(path, parts, like))
  return LoadedAdapter(adapter, params, buffers, metadata)


def read_metadata(path: str) -> dict[str, Any]:
  """The JSON metadata of an adapter file, without reading its arrays."""
  if not os.path.isfile(path):
    raise PeftError(f'{path} is not a file; expected an adapter file (save_adapter)')
  with safetensors.safe_open(path, framework='numpy') as f:
    metadata = json.loads((f.metadata() or {}).get('peft_jax', '{}'))
  version = metadata.get('format_version', FORMAT_VERSION)
  if version > FORMAT_VERSION:
    raise PeftError(
      f'{path}: format_version {version} is newer than this peft_jax reads '
      f'({FORMAT_VERSION}); upgrade peft_jax'
    )
  return metadata


def _read(path: str) -> tuple[dict[str, dict], dict[str, Any]]:
  """``({'params': {name: array}, 'buffers': {...}}, metadata)`` of a file."""
  metadata = read_metadata(path)
  with safetensors.safe_open(path, framework='numpy') as f:
    tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
  parts = {'params': {}, 'buffers': {}}
  for name, value in tensors.items():
    part, _, rest = name.partition('/')
    if part not in parts:
      raise PeftError(f'{path}: tensor {name!r} is not under params/ or buffers/')
    parts[part][rest] = value
  return parts, metadata


def _restore(path: str, parts: dict[str, dict], like) -> tuple[AdapterParams, Buffers]:
  """``like``'s ``(params, buffers)`` with the file's arrays (``fill_like``)."""
  params, buffers = (
    fill_like(path, part, parts[part], tree)
    for part, tree in zip(('params', 'buffers'), like, strict=True)
  )
  return params, buffers


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
