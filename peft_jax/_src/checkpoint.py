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
import pathlib
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
import safetensors
from jax.experimental import multihost_utils
from safetensors import numpy as safetensors_numpy

from peft_jax._src import checks, files, paths
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
  handlers = {
    'state': ocp.StandardCheckpointHandler(),
    'metadata': ocp.JsonCheckpointHandler(),
  }
  return ocp.CheckpointManager(
    os.path.abspath(directory), options=options, item_handlers=handlers
  )


class DamagedCheckpoint(PeftError):
  """A checkpoint step that cannot be read back as it was saved: files
  missing, truncated or changed (checksums), or values not finite."""


def save_checkpoint(
  manager: ocp.CheckpointManager, state: TrainState, metadata: dict[str, Any]
) -> None:
  """Saves ``state`` at ``state.step`` with JSON ``metadata``; waits for it.

  Once orbax has written the step, its directory gets a manifest
  (``MANIFEST``: every file's size and CRC-32), which ``restore_checkpoint``
  compares before reading: a missing, cut or changed file is found at
  restore, not trained on.

  Args:
    manager: from ``checkpoint_manager``.
    state: the training state.
    metadata: JSON-serialisable, e.g. ``{'data_position': 120, 'config':
      {...}}``.

  Raises:
    PeftError: when an array of ``state`` holds a NaN or an infinity; nothing
      is saved, so a good checkpoint is never rotated out by a bad one.
  """
  step = int(state.step)
  bad = _first_nonfinite(_host_leaves(state))
  if bad:
    raise PeftError(f'not saving step {step}: {bad} holds non-finite values')
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)
    ),
  )
  manager.wait_until_finished()
  if jax.process_index() == 0:
    step_dir = _step_dir(manager, step)
    files.write_text_atomically(
      os.path.join(step_dir, MANIFEST), json.dumps(_manifest(step_dir))
    )
  _wait_for_process_0(f'peft_jax checkpoint {step} manifest')


MANIFEST = 'peft_jax_manifest.json'  # {relative path: [size, CRC-32]}


def restore_checkpoint(
  manager: ocp.CheckpointManager,
  target: TrainState,
  step: int | None = None,
  *,
  cast: bool = False,
  accept: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[TrainState, dict[str, Any]]:
  """Restores ``(state, metadata)`` at ``step`` (default: the latest), checked.

  Every file of the step is first compared with the manifest
  ``save_checkpoint`` wrote (a step without one, from an older version or a
  kill right after orbax finished, is read as it is); each array comes back
  with the dtype it was saved in (unless ``cast``) and must be finite.

  Args:
    manager: from ``checkpoint_manager``.
    target: a state with the right structure (e.g. the fresh state, or
      ``jax.eval_shape`` of it): its names and shapes must match the
      checkpoint's; its shardings place the restored arrays.
    step: which step; ``None`` for the latest.
    cast: convert each array to ``target``'s dtype instead.
    accept: called with the metadata before any array is read; raises (a
      ``PeftError``) to refuse the checkpoint, e.g. a different run's config.

  Raises:
    DamagedCheckpoint: files missing, cut, changed or unreadable, or arrays
      that are not finite (``restore_newest_good`` moves such a step aside).
    PeftError: no checkpoint, or a checkpoint that does not fit ``target``.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise PeftError(f'no checkpoint in {manager.directory}')
  where = f'checkpoint step {step} in {manager.directory}'
  _check_manifest(where, _step_dir(manager, step))
  metadata = _read_step(where, lambda: _restore_metadata(manager, step))
  if accept is not None:
    accept(metadata)
  stored = _read_step(where, lambda: _stored_arrays(manager, step))
  abstract = _abstract_target(where, target, stored)
  restored = _read_step(
    where,
    lambda: manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    ),
  )
  state = TrainState(*restored.state)
  bad = _first_nonfinite(_host_leaves(state))
  if bad:
    raise DamagedCheckpoint(f'{where} is damaged ({bad} holds non-finite values)')
  if cast:
    as_target = lambda x, t: x if x.dtype == t.dtype else x.astype(t.dtype)
    state = jax.tree.map(as_target, state, target)
  return state, metadata


def restore_newest_good(
  manager: ocp.CheckpointManager,
  target: TrainState,
  *,
  cast: bool = False,
  accept: Callable[[dict[str, Any]], None] | None = None,
  report: Callable[[str], None] = print,
) -> tuple[TrainState, dict[str, Any]] | None:
  """``restore_checkpoint`` of the newest step that is not damaged.

  A damaged step (``DamagedCheckpoint``) is reported in one line through
  ``report`` and moved aside into ``<directory>.damaged/`` (kept, not
  deleted); the next older step is tried.

  Returns:
    ``(state, metadata)``, or ``None`` when the directory holds no step.

  Raises:
    PeftError: when every step is damaged (the caller should not start over
      silently), or from ``accept`` and for a checkpoint that does not fit
      ``target`` (nothing is moved then).
  """
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return restore_checkpoint(manager, target, step, cast=cast, accept=accept)
    except DamagedCheckpoint as e:
      damaged.append(_move_aside(manager, step))
      report(f'{e}; moved to {damaged[-1]}')
  if damaged:
    raise PeftError(
      f'no good checkpoint in {manager.directory}: every step was damaged and '
      f'moved aside ({", ".join(damaged)}); refusing to start over silently'
    )
  return None


def _read_step(where: str, read: Callable[[], Any]) -> Any:
  """``read()``, with any failure to read files as ``DamagedCheckpoint``."""
  try:
    return read()
  except PeftError:
    raise
  except Exception as e:  # orbax and tensorstore raise many kinds
    reason = str(e).strip().split('\n')[0][:160] or type(e).__name__
    raise DamagedCheckpoint(f'{where} is damaged ({reason})') from None


def _restore_metadata(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  args = ocp.args.Composite(metadata=ocp.args.JsonRestore())
  metadata = manager.restore(step, args=args).metadata
  if not isinstance(metadata, dict):
    raise ValueError(f'its metadata is {type(metadata).__name__}, not a dict')
  return metadata


def _stored_arrays(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """``{name: array metadata (shape, dtype)}`` of the saved state."""
  tree = manager.item_metadata(step)['state']
  arrays = _named_leaves(getattr(tree, 'tree', tree))
  if not arrays:  # every state holds its step
    raise ValueError('the metadata of its arrays is missing')
  return arrays


def _named_leaves(tree: Any) -> dict[str, Any]:
  """``{'params/q/a': leaf, 'opt_state/0/mu/q/a': ...}``: the same names
  for a state and for orbax's metadata tree of it."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p, simple=True, separator='/'): x for p, x in flat}


def _abstract_target(where: str, target: TrainState, stored: dict):
  """``target`` as shape structs with the stored dtypes; raises
  ``PeftError`` naming the first array that does not fit."""
  wanted = _named_leaves(target)
  missing = sorted(set(wanted) - set(stored)) or sorted(set(stored) - set(wanted))
  if missing:
    raise PeftError(
      f'{where} does not fit this training state (e.g. at {missing[0]!r}); '
      'was it saved by another adapter or optimizer?'
    )

  def abstract(path, leaf):
    name = jax.tree_util.keystr(path, simple=True, separator='/')
    struct = ocp.utils.to_shape_dtype_struct(leaf)
    if jax.dtypes.issubdtype(struct.dtype, jax.dtypes.prng_key):
      return struct  # stored as its key data; restored as keys
    saved = stored[name]
    if tuple(saved.shape) != tuple(struct.shape):
      raise PeftError(
        f'{where} holds {name} of shape {tuple(saved.shape)}; this training '
        f'state has {tuple(struct.shape)}'
      )
    return jax.ShapeDtypeStruct(struct.shape, saved.dtype, sharding=struct.sharding)

  return jax.tree_util.tree_map_with_path(abstract, target)


def _host_leaves(state: Any) -> dict[str, np.ndarray]:
  """``{name: NumPy array}`` of ``state`` (PRNG keys as their key data)."""

  def data(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.key_data(x)
    return x

  return _named_leaves(host_arrays(jax.tree.map(data, state)))


def _wait_for_process_0(name: str) -> None:
  """Under ``jax.distributed``, every process waits here for the others
  (after process 0 wrote or moved files); alone, nothing to wait for."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(os.fspath(manager.directory), str(step))


def _file_crc32(path: str) -> int:
  crc = 0
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 24):
      crc = zlib.crc32(chunk, crc)
  return crc


def _manifest(step_dir: str) -> dict[str, list[int]]:
  """``{path relative to step_dir: [size, CRC-32]}`` of its files."""
  found = {}
  for folder, _, names in os.walk(step_dir):
    for name in names:
      path = os.path.join(folder, name)
      relative = os.path.relpath(path, step_dir)
      if relative != MANIFEST:
        found[relative] = [os.path.getsize(path), _file_crc32(path)]
  return found


def _check_manifest(where: str, step_dir: str) -> None:
  """Raises ``DamagedCheckpoint`` naming the first file of ``step_dir``
  that is missing, cut or changed since ``save_checkpoint`` listed it."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return
  listed = _read_step(where, lambda: json.loads(pathlib.Path(path).read_text()))
  for name, (size, crc) in sorted(listed.items()):
    file = os.path.join(step_dir, name)
    if not os.path.isfile(file):
      problem = 'is missing'
    elif os.path.getsize(file) != size:
      problem = f'has {os.path.getsize(file)} bytes, not the {size} saved'
    elif _file_crc32(file) != crc:
      problem = 'differs from what was saved (CRC-32)'
    else:
      continue
    raise DamagedCheckpoint(f'{where} is damaged ({name} {problem})')


def _first_nonfinite(leaves: dict[str, np.ndarray]) -> str | None:
  """The name of the first array with a NaN or infinity, or None."""
  return next((name for name, a in leaves.items() if checks.nonfinite(a)), None)


def _move_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves step ``step``'s directory into ``<directory>.damaged/`` (process
  0; every process waits for it); returns where it went."""
  directory = os.fspath(manager.directory)
  aside = os.path.join(f'{directory}.damaged', str(step))
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(aside), exist_ok=True)
    n = 1
    while os.path.exists(aside):  # an earlier damaged copy of the same step
      aside = os.path.join(f'{directory}.damaged', f'{step}.{n}')
      n += 1
    os.replace(os.path.join(directory, str(step)), aside)
  _wait_for_process_0(f'peft_jax damaged checkpoint {step}')
  manager.reload()
  return aside


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
    PeftError: for a rule that a file cannot record (``serialize_rules``), or
      a ``path`` whose directory does not exist.
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
  write = lambda tmp: safetensors_numpy.save_file(
    tensors, tmp, metadata={'peft_jax': json.dumps(record)}
  )
  files.replace_atomically(path, write)


def _version() -> str:
  try:
    return importlib.metadata.version('peft_jax')
  except importlib.metadata.PackageNotFoundError:  # run from a source tree
    return 'unknown'


def load_adapter(
  path: str,
  like: tuple[AdapterParams, Buffers] | None = None,
  *,
  rules: Sequence[Rule] | None = None,
) -> tuple[AdapterParams, Buffers, dict[str, Any]]:
  """Reads ``(params, buffers, metadata)`` written by ``save_adapter``.

  Args:
    path: the safetensors file.
    like: ``(params, buffers)`` of the right structure (e.g.
      ``jax.eval_shape(adapter.init, key, frozen)``) to restore the typed
      parameters of each method; without it, nested dicts of arrays.
    rules: the rules of the adapter the arrays will be used with; compared
      with the rules the file records (when it records them).

  Raises:
    PeftError: for a file that cannot be read, arrays that do not fit
      ``like``, or recorded rules that differ from ``rules`` (the first
      difference is named: an α=4 adapter must not run as α=64).
  """
  parts, metadata = _read(path)
  if rules is not None and 'adapters' in metadata:
    _check_same_rules(path, metadata['adapters'], serialize_rules(rules))
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
  with _safe_open(path) as f:
    text = (f.metadata() or {}).get('peft_jax', '{}')
  try:
    metadata = json.loads(text)
  except json.JSONDecodeError as e:
    raise PeftError(f'{path}: its peft_jax metadata is not JSON ({e})') from None
  version = metadata.get('format_version', FORMAT_VERSION)
  if version > FORMAT_VERSION:
    raise PeftError(
      f'{path}: format_version {version} is newer than this peft_jax reads '
      f'({FORMAT_VERSION}); upgrade peft_jax'
    )
  return metadata


def _check_same_rules(path: str, recorded: list, given: list) -> None:
  """Raises ``PeftError`` naming the first rule where ``recorded`` (the
  file's) and ``given`` (``serialize_rules`` of the caller's) differ."""
  for i, (mine, theirs) in enumerate(zip(recorded, given, strict=False)):
    if mine != theirs:
      raise PeftError(
        f'{path} was saved with rule {i} {mine}, but is used with {theirs}; '
        'load it with the rules it records (pj.load_adapter_file)'
      )
  if len(recorded) != len(given):
    raise PeftError(
      f'{path} was saved with {len(recorded)} rules, but is used with '
      f'{len(given)}; load it with the rules it records (pj.load_adapter_file)'
    )


def _safe_open(path: str):
  """``safetensors.safe_open``; an unreadable file is a ``PeftError``."""
  if not os.path.isfile(path):
    raise PeftError(f'{path} is not a file; expected an adapter file (save_adapter)')
  try:
    return safetensors.safe_open(path, framework='numpy')
  except (OSError, safetensors.SafetensorError) as e:
    raise PeftError(f'{path} is not a readable safetensors file ({e})') from None


def _read(path: str) -> tuple[dict[str, dict], dict[str, Any]]:
  """``({'params': {name: array}, 'buffers': {...}}, metadata)`` of a file."""
  metadata = read_metadata(path)
  try:
    with _safe_open(path) as f:
      tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
  except (OSError, safetensors.SafetensorError) as e:
    raise PeftError(f'{path} is damaged: its arrays cannot be read ({e})') from None
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
