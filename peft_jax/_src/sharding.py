"""Shardings of θ, buffers and optimizer state that follow the frozen weights'.

An adapted leaf ``w`` placed with ``NamedSharding(mesh, spec)`` gives each of
its θ (and buffer) leaves the entries of ``spec`` for the axes they share
with ``w``: LoRA's ``a: (d_in, r)`` follows ``w``'s ``d_in`` axis and ``b:
(r, d_out)`` its ``d_out`` axis, DoRA's ``m: (d_out,)`` the ``d_out`` axis,
``full``/``sparse`` copies all of ``spec``, ``stacked(...)`` adds the layer
axis. Which θ axis is which ``w`` axis is found by initialising the adapter
abstractly on a probe of ``w`` whose axes have distinct prime lengths (so a
square kernel's ``d_in`` and ``d_out`` cannot be confused), then checked
against the real shapes: an axis whose length differs from the ``w`` axis it
matched, or a method that refuses the probe's shape (OFT's blocks, LoKr's
factors), is left unsharded. Hook-point parameters and ``'@shared'`` ones are
replicated. Any placement is numerically the same model; these follow the
weights so a sharded step keeps θ next to its kernel's shards.
"""

from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from peft_jax._src import paths
from peft_jax._src.base import Params, PeftError, TreeAdapter

# Lengths of a probe's axes: primes no adapter dimension (ranks, blocks,
# prompt lengths) comes near.
PROBE_LENGTHS = (1009, 1013, 1019, 1021, 1031, 1033)


def adapter_shardings(
  adapter: TreeAdapter, frozen: Params, hooks: Any = None
) -> tuple[Any, Any]:
  """``NamedSharding``s for ``adapter.init(key, frozen, hooks)``'s ``(params,
  buffers)``, following ``frozen``'s (module docstring).

  Args:
    adapter: a tree adapter (``by_rules``).
    frozen: the model's weights as arrays or ``jax.ShapeDtypeStruct``s, at
      least one placed with a ``NamedSharding`` (which gives the mesh).
    hooks: the model's hook points, for hook-point adapters.

  Returns:
    ``(params_shardings, buffers_shardings)``, trees shaped like ``init``'s.
    Initialise θ already placed with
    ``jax.jit(adapter.init, out_shardings=...)``.

  Raises:
    PeftError: if no frozen leaf has a ``NamedSharding``.
  """
  mesh = _mesh(frozen)
  specs = {name: _spec(leaf) for name, leaf in paths.named_leaves(frozen)}
  abstract = _abstract(frozen)
  real = _init_shapes(adapter, abstract, hooks)
  axes = _probed_axes(adapter, abstract, hooks, real)

  def sharding(name: str, leaf: Any) -> NamedSharding:
    owner, of_axes = axes.get(name, (None, ()))
    spec = specs.get(owner, P())
    entries = [
      spec[axis] if axis is not None and axis < len(spec) else None for axis in of_axes
    ]
    return NamedSharding(mesh, P(*entries) if entries else P())

  return tuple(paths.map_named(sharding, tree) for tree in real)


def optimizer_shardings(
  optimizer: optax.GradientTransformation, params: Any, params_shardings: Any
) -> Any:
  """Shardings of ``optimizer.init(params)``: every copy of the parameter tree
  (Adam's moments, ...) as ``params_shardings``, the rest (counters)
  replicated on the same mesh.

  Args:
    optimizer: an optax transformation.
    params: θ as arrays or ``jax.ShapeDtypeStruct``s.
    params_shardings: ``adapter_shardings(...)[0]``.
  """
  mesh = _mesh(params_shardings)
  state = jax.eval_shape(optimizer.init, params)
  return optax.tree_utils.tree_map_params(
    optimizer,
    lambda _, sharding: sharding,
    state,
    params_shardings,
    transform_non_params=lambda _: NamedSharding(mesh, P()),
  )


def mesh_of(tree: Any) -> Mesh | None:
  """The mesh of the first leaf placed with (or being) a ``NamedSharding``;
  None if there is none."""
  for leaf in jax.tree.leaves(tree):
    sharding = (
      leaf if isinstance(leaf, NamedSharding) else getattr(leaf, 'sharding', None)
    )
    if isinstance(sharding, NamedSharding):
      return sharding.mesh
  return None


def replicate_off_mesh(tree: Any, mesh: Mesh) -> Any:
  """``tree`` with every array not on ``mesh`` replicated over it (typed
  PRNG keys through their key data: ``device_put`` cannot place a key on
  devices of other processes)."""
  replicated = NamedSharding(mesh, P())

  def place(x):
    sharding = getattr(x, 'sharding', None)
    if not isinstance(x, jax.Array) or (
      isinstance(sharding, NamedSharding) and sharding.mesh == mesh
    ):
      return x
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = jax.device_put(jax.random.key_data(x), replicated)
      key = jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
      # As the step returns keys (a wrapped key is typed differently by jit).
      return jax.jit(lambda k: k, out_shardings=replicated)(key)
    return jax.device_put(x, replicated)

  return jax.tree.map(place, tree)


def _mesh(tree: Any) -> Mesh:
  """``mesh_of(tree)``, or a one-line error when no leaf is on a mesh."""
  mesh = mesh_of(tree)
  if mesh is None:
    raise PeftError(
      'adapter_shardings: no frozen leaf is placed with a NamedSharding; place '
      'the weights on a mesh first (jax.device_put(frozen, shardings)).'
    )
  return mesh


def _spec(leaf: Any) -> P:
  sharding = getattr(leaf, 'sharding', None)
  return sharding.spec if isinstance(sharding, NamedSharding) else P()


def _abstract(frozen: Params) -> Params:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen)


def _init_shapes(adapter: TreeAdapter, frozen: Params, hooks: Any) -> tuple[Any, Any]:
  """``(params, buffers)`` of ``init`` as shape structs."""
  return jax.eval_shape(
    lambda key, w: adapter.init(key, w, hooks), jax.random.key(0), frozen
  )


def _probed_axes(
  adapter: TreeAdapter, frozen: Params, hooks: Any, real: tuple[Any, Any]
) -> dict[str, tuple[str, tuple[int | None, ...]]]:
  """``{θ or buffer leaf name: (its frozen leaf, for each of its axes the
  frozen axis it follows or None)}``: all leaves probed at once, one by one
  where the adapter refuses that."""
  names = [name for name, _ in paths.named_leaves(frozen)]
  real_flat = {
    name: leaf.shape for tree in real for name, leaf in paths.named_leaves(tree)
  }
  found: dict[str, tuple[str, tuple[int | None, ...]]] = {}
  try:
    batches = [names]
    probed = [_init_shapes(adapter, _probe(frozen, names), hooks)]
  except (PeftError, ValueError, TypeError):
    batches, probed = [], []
    for name in names:
      try:
        probed.append(_init_shapes(adapter, _probe(frozen, [name]), hooks))
        batches.append([name])
      except (PeftError, ValueError, TypeError):
        continue  # This leaf's θ stays replicated.
  flat_frozen = dict(paths.named_leaves(frozen))
  for batch, trees in zip(batches, probed, strict=True):
    for tree in trees:
      for name, leaf in paths.named_leaves(tree):
        owner = _owner(name, batch)
        if owner is None or name not in real_flat:
          continue
        shape = flat_frozen[owner].shape
        axes = tuple(
          _axis(length, real_length, shape)
          for length, real_length in zip(leaf.shape, real_flat[name], strict=False)
        )
        if len(leaf.shape) == len(real_flat[name]):
          found[name] = (owner, axes)
  return found


def _probe(frozen: Params, names: list[str]) -> Params:
  """``frozen`` with the leaves ``names`` given prime axis lengths."""
  chosen = set(names)

  def probe(name, leaf):
    if name not in chosen or leaf.ndim > len(PROBE_LENGTHS):
      return leaf
    return jax.ShapeDtypeStruct(PROBE_LENGTHS[: leaf.ndim], leaf.dtype)

  return paths.map_named(probe, frozen)


def _owner(name: str, frozen_names: list[str]) -> str | None:
  """The frozen leaf whose θ ``name`` is (``'k'`` for ``'k/a'`` or ``'k'``)."""
  for frozen_name in frozen_names:
    if name == frozen_name or name.startswith(frozen_name + paths.SEPARATOR):
      return frozen_name
  return None


def _axis(length: int, real_length: int, shape: tuple[int, ...]) -> int | None:
  """The frozen axis a θ axis of probe ``length`` follows, if the real
  lengths agree."""
  if length not in PROBE_LENGTHS:
    return None
  axis = PROBE_LENGTHS.index(length)
  return axis if axis < len(shape) and shape[axis] == real_length else None
