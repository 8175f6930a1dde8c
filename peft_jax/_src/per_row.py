"""Serving many adapters in one batch: ``adapted_per_row(adapter, fn)``.

Each row of a batch names one of N adapters of the same rules, stacked on a
leading axis by ``stack_trees``, or ``-1`` for the base model. The rows run
``adapted(adapter, fn, factored=True)`` under ``jax.vmap``: each row's θ is
gathered by its id (``jnp.take``), the frozen tree is not batched (one copy,
and ``x @ w`` of all rows is one matmul), and ``x @ a`` with a per-row ``a``
is a batched matmul. No merged weight is formed for a method with a factored
form. For LoRA, with ``a: (N, d_in, r)`` and ``b: (N, r, d_out)``, row ``b``
computes

  y_b = x_b @ w + s · (x_b @ a[id_b]) @ b[id_b],   x_b: (..., d_in).

A base row (id ``-1``) runs zero parameters with adapter 0's buffers, which
is the frozen model only where the method is the identity at zero
parameters, ``apply(w, 0, buffers) == w`` (LoRA: ``s · (x @ 0) @ 0 = 0``
exactly; not PiSSA or MiLoRA, which subtract an initial copy, nor DoRA or
(IA)³). So a call with a ``-1`` row first checks that equality exactly, on
the concrete weights, for every adapted leaf (about one pass over them), and
refuses the row where it fails or cannot be checked.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src import paths, quantization
from peft_jax._src.base import AdapterParams, Buffers, Params, PeftError, TreeAdapter
from peft_jax._src.factored import adapted

BASE = -1  # The id of a row that runs the base model.


def _leading_sizes(tree: Any, what: str, axis: str) -> set[int]:
  """The sizes of the leading axis (of ``axis``) of ``tree``'s leaves."""
  sizes = set()
  for name, leaf in paths.named_leaves(tree):
    if np.ndim(leaf) == 0:
      raise PeftError(
        f'{what} leaf {name!r} is a scalar; expected a leading axis of {axis}'
      )
    sizes.add(np.shape(leaf)[0])
  return sizes


def _one_size(sizes: set[int], what: str, expected: str) -> int:
  if len(sizes) != 1:
    raise PeftError(f'{what} have leading axes of sizes {sorted(sizes)}; {expected}')
  return sizes.pop()


def _num_adapters(params: AdapterParams, buffers: Buffers) -> int:
  """N, the stacked adapters' leading axis."""
  sizes = _leading_sizes(params, 'params', 'adapters')
  sizes |= _leading_sizes(buffers, 'buffers', 'adapters')
  return _one_size(
    sizes, 'params and buffers', 'expected N adapters stacked by pj.stack_trees'
  )


def _check_ids(adapter_ids: Any, num_adapters: int, num_rows: int) -> np.ndarray:
  """``adapter_ids`` as a NumPy ``(B,)`` int array in ``[-1, N)``."""
  if isinstance(adapter_ids, jax.core.Tracer):
    raise PeftError(
      'adapter_ids is traced; expected concrete ids (the call compiles its own '
      'program: call it outside jax.jit, or close over the ids)'
    )
  ids = np.asarray(adapter_ids)
  if ids.shape != (num_rows,):
    raise PeftError(
      f'adapter_ids has shape {ids.shape}; expected ({num_rows},), one id per row'
    )
  if not np.issubdtype(ids.dtype, np.integer):
    raise PeftError(f'adapter_ids has dtype {ids.dtype}; expected integer ids')
  bad = np.flatnonzero((ids < BASE) | (ids >= num_adapters))
  if bad.size:
    raise PeftError(
      f'adapter_ids[{bad[0]}] is {ids[bad[0]]}; expected an id in [-1, '
      f'{num_adapters}): one of the {num_adapters} stacked adapters, or -1 for '
      'the base model'
    )
  return ids.astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _unchanged_at_zero(
  adapter: TreeAdapter, frozen: Params, zeros: AdapterParams, buffers: Buffers
) -> dict[str, jax.Array]:
  """``{name: apply(w, 0, buffers) == w}`` (exactly) for every adapted leaf."""
  flat = paths.flatten(frozen)

  def unchanged(name, entry):
    w = quantization.values(flat[name])
    return jnp.array_equal(entry.adapter.apply(w, entry.params, entry.buffers), w)

  plan = adapter.plan(frozen, zeros, buffers)
  return {name: unchanged(name, entry) for name, entry in plan.weights.items()}


def _check_base_rows(
  adapter: TreeAdapter, frozen: Params, params: AdapterParams, buffers: Buffers
) -> None:
  """Raises unless zero parameters with adapter 0's buffers leave every
  adapted weight exactly unchanged (so a ``-1`` row is the base model)."""
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves([frozen, buffers])):
    raise PeftError(
      'adapter_ids holds -1 (the base model) but the weights are traced, so '
      'that zero parameters leave them unchanged cannot be checked; call '
      'outside jax.jit (the call compiles its own program)'
    )
  zeros = jax.tree.map(lambda leaf: jnp.zeros_like(leaf[0]), params)
  first = jax.tree.map(lambda leaf: leaf[0], buffers)
  plan = adapter.plan(frozen, zeros, first)
  method = lambda entry: entry.adapter.name or 'its method'
  if plan.hooks:
    name, entry = next(iter(plan.hooks.items()))
    raise PeftError(
      f'{name}: {method(entry)} adapts activations, which is not checked to be '
      'the identity at zero parameters; adapter_ids -1 (the base model) needs '
      'weight-space methods only'
    )
  for name, entry in plan.weights.items():
    if entry.adapter.apply is None:
      raise PeftError(
        f'{name}: {method(entry)} has no weight-space form to check that zero '
        'parameters leave the weight unchanged; adapter_ids -1 (the base '
        'model) needs one'
      )
  for name, same in _unchanged_at_zero(adapter, frozen, zeros, first).items():
    if not same:
      raise PeftError(
        f'{name}: {method(plan.weights[name])} is not the identity at zero '
        'parameters (apply(w, 0, buffers) != w), so adapter_ids -1 (the base '
        'model) cannot run with it; use ids >= 0, or a method such as lora'
      )


def _rows(
  adapter: TreeAdapter,
  fn: Callable[..., Any],
  frozen: Params,
  params: AdapterParams,
  buffers: Buffers,
  ids: jax.Array,
  *args,
) -> Any:
  """Row ``b`` of ``args`` through ``fn`` with adapter ``ids[b]`` (zero
  parameters and adapter 0's buffers for ``-1``), all rows under one vmap."""
  base = ids == BASE
  pick = lambda leaf: jnp.take(leaf, jnp.where(base, 0, ids), axis=0)
  zero_base = lambda leaf: jnp.where(
    base.reshape(-1, *(1,) * (leaf.ndim - 1)), 0, pick(leaf)
  )
  row_params = jax.tree.map(zero_base, params)
  one = adapted(adapter, fn, factored=True)

  def row(theta, state, *row_args):
    out = one(frozen, theta, state, *jax.tree.map(lambda x: x[None], row_args))
    return jax.tree.map(lambda y: y[0], out)

  return jax.vmap(row)(row_params, jax.tree.map(pick, buffers), *args)


def adapted_per_row(adapter: TreeAdapter, fn: Callable[..., Any]) -> Callable[..., Any]:
  """Transforms ``fn(weights, *args)`` into
  ``g(frozen, params, buffers, adapter_ids, *args)``, one adapter per row.

  ``params`` and ``buffers`` are N adapters of ``adapter``'s rules stacked by
  ``stack_trees`` (leading axis N), ``adapter_ids: (B,)`` ints in
  ``[-1, N)``, and every array of ``args`` has B rows on axis 0. Row ``b``
  is ``fn`` on adapter ``adapter_ids[b]``'s weights (``-1``: the frozen
  ones), on row ``b`` of ``args`` with a batch axis of 1, with that axis of
  its output dropped: for LoRA,
  ``y_b = x_b @ w + s · (x_b @ a[id_b]) @ b[id_b]``, through the factored
  path (``adapted(..., factored=True)``) with the frozen tree shared by all
  rows. Equal, up to float rounding, to row ``b`` run alone on its own
  merged weights (``merge``). Decoding works too:
  ``fn = lambda w, ids: llama.generate(model, w, ids, n)`` answers each
  prompt with its own adapter in one ``generate`` call.

  ``g`` compiles its program once per input shapes and checks its inputs
  first, so ``adapter_ids`` must be concrete (call ``g`` outside
  ``jax.jit``). A call with a ``-1`` row also checks, on the concrete
  weights, that zero parameters with adapter 0's buffers leave every adapted
  leaf exactly unchanged (true of LoRA; not of PiSSA, MiLoRA, DoRA, (IA)³),
  and refuses the row where that fails or cannot be checked (activation
  adapters, methods with no weight-space form, traced weights).

  Args:
    adapter: a tree-level adapter from ``by_rules``, shared by the N.
    fn: a function whose first argument is the full weight tree and whose
      outputs have a leading batch axis, e.g.
      ``lambda w, x: model.apply({'params': w}, x)``.

  Returns:
    ``g(frozen, params, buffers, adapter_ids, *args)``, whose outputs have
    a leading axis of B rows.

  Raises:
    PeftError: (from ``g``) for ``adapter_ids`` of the wrong shape or dtype,
      out of range or traced; params and buffers not stacked on one N;
      args of different row counts; a ``-1`` row that is not the base model.
  """
  if not isinstance(adapter, TreeAdapter):
    raise PeftError(
      'adapted_per_row() needs a tree-level adapter from by_rules(...); got '
      f'{type(adapter).__name__}'
    )
  run = jax.jit(functools.partial(_rows, adapter, fn))

  def g(frozen: Params, params: AdapterParams, buffers: Buffers, adapter_ids, *args):
    rows = _one_size(
      _leading_sizes(args, 'args', 'rows'), 'args', 'expected B rows on axis 0 of each'
    )
    ids = _check_ids(adapter_ids, _num_adapters(params, buffers), rows)
    if (ids == BASE).any():
      _check_base_rows(adapter, frozen, params, buffers)
    return run(frozen, params, buffers, jnp.asarray(ids), *args)

  return g
