"""Logical axes of the models' weights and activations, mapped to a device mesh.

The models name the axes of their weights (a per-family table, e.g.
``llama.PARAM_AXES``) and of their activations (``constrain`` calls inside
the modules) with logical names; ``RULES`` maps the names to the mesh axes
``data``, ``fsdp`` and ``tensor``:

  ``batch``     -> ``('data', 'fsdp')``  activations split by example;
  ``embed``     -> ``'fsdp'``           every weight's ``d_model`` axis (FSDP:
                                        gathered per layer where used);
  ``heads``, ``kv_heads``, ``mlp``, ``vocab`` -> ``'tensor'``  Megatron tensor
                                        parallelism: q/k/v/gate/up split on
                                        ``d_out``, o/down on ``d_in``, the
                                        attention heads and FFN activations
                                        split alike;
  ``table``     -> ``('tensor', 'fsdp')``  an embedding table's rows.

A mesh with sizes ``(data, fsdp, tensor)`` then gives data parallelism
(``fsdp = tensor = 1``), FSDP (``fsdp > 1``), tensor parallelism, or any
mix. A mesh axis that is missing, of size 1, manual (inside
``shard_map``) or does not divide the array's axis is dropped, so the same
model runs on any mesh and, outside a mesh context, ``constrain`` does
nothing. Placement never changes the numbers a model computes.
"""

import math
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from peft_jax._src import paths
from peft_jax._src.base import PeftError
from peft_jax._src.quantized_array import is_quantized

MESH_AXES = ('data', 'fsdp', 'tensor')
Rules = dict[str, str | tuple[str, ...] | None]
RULES: Rules = {
  'batch': ('data', 'fsdp'),
  'embed': 'fsdp',
  'heads': 'tensor',
  'kv_heads': 'tensor',
  'mlp': 'tensor',
  'vocab': 'tensor',
  'table': ('tensor', 'fsdp'),
}
# (regex on a weight's '/'-joined path, logical names of its axes); the
# first full match wins, a leaf that matches nothing is replicated.
AxesTable = Sequence[tuple[str, tuple[str | None, ...]]]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> Mesh:
  """A ``(data, fsdp, tensor)`` mesh over the devices (of every process).

  One size may be ``-1``: what the others leave of all devices. Sizes that
  multiply to fewer than all devices take the first ones (one process
  only; e.g. ``data=1`` for one device). Axes are ``Auto``: XLA propagates
  the weights' and ``constrain``'s shardings.

  Raises:
    PeftError: if the sizes are not positive, or do not fit the devices.
  """
  sizes = {'data': data, 'fsdp': fsdp, 'tensor': tensor}
  devices = jax.devices()
  if (
    any(v == 0 or v < -1 for v in sizes.values()) or list(sizes.values()).count(-1) > 1
  ):
    raise PeftError(
      f'mesh {_text(sizes)}: sizes must be positive, at most one -1 (the rest)'
    )
  fixed = math.prod(max(v, 1) for v in sizes.values())
  if -1 in sizes.values() and len(devices) % fixed == 0:
    sizes = {k: len(devices) // fixed if v == -1 else v for k, v in sizes.items()}
    fixed = len(devices)
  fits = fixed == len(devices) or (fixed < len(devices) and jax.process_count() == 1)
  if -1 in sizes.values() or not fits:
    raise PeftError(
      f'mesh {_text(sizes)} does not fit {len(devices)} devices of '
      f'{jax.process_count()} process(es) (the sizes must multiply to the device '
      'count, or to fewer in one process)'
    )
  return jax.make_mesh(
    tuple(sizes.values()),
    MESH_AXES,
    axis_types=(AxisType.Auto,) * len(MESH_AXES),
    devices=devices[:fixed],
  )


def parse_mesh(text: str) -> dict[str, int]:
  """``'data=2,fsdp=4'`` -> ``{'data': 2, 'fsdp': 4}`` (the command line's
  ``--mesh``); one-line errors name the bad item."""
  sizes = {}
  for item in filter(None, text.split(',')):
    name, _, value = item.partition('=')
    name = name.strip()
    if name not in MESH_AXES:
      raise PeftError(f'mesh axis {name!r} is unknown; expected {", ".join(MESH_AXES)}')
    try:
      sizes[name] = int(value)
    except ValueError:
      raise PeftError(
        f'mesh size {item!r} is not an integer (e.g. data=2,fsdp=4)'
      ) from None
  return sizes


def spec(
  logical: Sequence[str | None], shape: Sequence[int], mesh, rules: Rules = RULES
) -> P:
  """The ``PartitionSpec`` of an array of ``shape`` whose axes are named
  ``logical``: each name's mesh axes under ``rules``, less those absent from
  ``mesh``, of size 1, manual, already used, or not dividing the axis."""
  usable = {
    name: size
    for name, size, kind in zip(
      mesh.axis_names, mesh.axis_sizes, mesh.axis_types, strict=True
    )
    if size > 1 and kind != AxisType.Manual
  }
  used, entries = set(), []
  for name, length in zip(logical, shape, strict=True):
    wanted = rules.get(name) if name else None
    wanted = (wanted,) if isinstance(wanted, str) else (wanted or ())
    axes = []
    for axis in wanted:
      split = usable.get(axis)
      parts = math.prod(usable[a] for a in axes)
      if split and axis not in used and length % (parts * split) == 0:
        axes.append(axis)
    used.update(axes)
    entries.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return P(*entries)


def constrain(x: jax.Array, *logical: str | None, rules: Rules = RULES) -> jax.Array:
  """``x`` with its sharding constrained to ``spec(logical, x.shape)`` on
  the mesh of the enclosing ``jax.set_mesh``; ``x`` itself outside one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  wanted = spec(logical, x.shape, mesh, rules)
  if all(entry is None for entry in wanted):
    return x
  return jax.lax.with_sharding_constraint(x, wanted)


def param_shardings(
  params, table: AxesTable, mesh: Mesh, rules: Rules = RULES
) -> object:
  """``NamedSharding``s for a weight tree (arrays or shape structs) from its
  family's ``table``. A leaf with one more axis than its entry (the layer
  axis of ``scan_layers``) keeps that axis whole. A ``QuantizedArray``'s
  codes and scales are each split by the leaf's axes where they divide (a
  ``QuantizedArray`` of shardings)."""
  compiled = [(re.compile(pattern), axes) for pattern, axes in table]

  def sharding(name: str, leaf):
    axes = next((a for p, a in compiled if p.fullmatch(name)), ())
    if len(axes) + 1 == leaf.ndim:
      axes = (None, *axes)
    if len(axes) != leaf.ndim:
      axes = (None,) * leaf.ndim
    of = lambda part: NamedSharding(mesh, spec(axes, part.shape, mesh, rules))
    return jax.tree.map(of, leaf) if is_quantized(leaf) else of(leaf)

  return paths.map_named(sharding, params)


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
  """A batch array's sharding: its first axis split as ``'batch'``."""
  return NamedSharding(mesh, spec(('batch',) + (None,) * (len(shape) - 1), shape, mesh))


def _text(sizes: dict[str, int]) -> str:
  return ','.join(f'{k}={v}' for k, v in sizes.items())


def place(tree, shardings):
  """``tree``'s arrays on ``shardings`` (a matching tree), each process
  writing only its own shards: works for meshes that span processes, where
  ``jax.device_put`` of a one-device array does not."""

  def one(x, sharding):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

  return jax.tree.map(one, tree, shardings)


def process_batch(mesh: Mesh, batch):
  """The global batch arrays for ``batch`` (``{name: (B, ...)}``, the same
  on every process), each process placing only the rows its devices hold
  (``jax.make_array_from_process_local_data``)."""

  def one(x):
    sharding = batch_sharding(mesh, x.shape)
    rows = [
      index[0].indices(x.shape[0])[:2]
      for index in sharding.addressable_devices_indices_map(x.shape).values()
    ]
    start, stop = min(r[0] for r in rows), max(r[1] for r in rows)
    return jax.make_array_from_process_local_data(sharding, x[start:stop], x.shape)

  return jax.tree.map(one, batch)
