"""Quantizing a model's frozen weights, and running them dequantized at each use.

``quantize(frozen, 'nf4')`` stores the selected leaves as ``QuantizedArray``
(``quantized_array``). ``adapted`` dequantizes a quantized kernel where the
model uses it: inside the matmul ``x @ w`` of that layer
(``dequantized_linear``: formed after ``x``, not kept for the backward pass,
formed again there after the output's cotangent, as QLoRA does), and for any
other use (a gather, a norm of ``w`` in DoRA's factored form) under
``jax.checkpoint`` with a policy that saves everything but the dequantized
weight (``recomputed``). So neither the forward pass nor the residuals kept
for the backward pass hold a full-precision copy of the model. Adapter
methods' ``init``/``apply`` see ``values(w)``, the dequantized leaf.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src import paths
from peft_jax._src.base import Params, PeftError
from peft_jax._src.quantized_array import (
  DEQUANTIZED,
  QuantizedArray,
  dequantize,
  is_quantized,
  quantize_array,
)
from peft_jax._src.rules import compile_pattern


def values(w: Any) -> Any:
  """``w`` as an array: dequantized if it is a ``QuantizedArray``."""
  return dequantize(w) if is_quantized(w) else w


def dequantize_tree(tree: Params) -> Params:
  """``tree`` with every ``QuantizedArray`` leaf dequantized (``tree`` may
  itself be one): plain arrays, e.g. to export or to compare weights."""
  return jax.tree.map(values, tree, is_leaf=is_quantized)


def quantize(
  frozen: Params,
  kind: str,
  *,
  group_size: int = 64,
  select: str | Callable[[str, Any], bool] = r'(.*/)?kernel',
) -> Params:
  """``frozen`` with the selected float leaves stored quantized (QLoRA-style).

  Args:
    frozen: the model's weights (a Linen params dict or an NNX state).
    kind: ``int8``, ``int4`` or ``nf4`` (see the module docstring).
    group_size: entries per scale along each leaf's input axis (``-2``).
    select: a regex (``re.fullmatch`` on leaf names) or a predicate
      ``(name, leaf) -> bool``; by default every kernel (what QLoRA
      quantizes: the linear layers, not embeddings or norms).

  Returns:
    The same tree with ``QuantizedArray`` leaves where selected (leaves
    of fewer than 2 dimensions are never quantized).

  Raises:
    PeftError: an unknown kind, nothing selected, or a selected leaf whose
      input axis ``group_size`` does not divide (naming the leaf).
  """
  chosen = select if callable(select) else compile_pattern('quantize: select=', select)
  taken = []

  def visit(name, leaf):
    if is_quantized(leaf) or np.ndim(leaf) < 2 or not chosen(name, leaf):
      return leaf
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf
    taken.append(name)
    try:
      return quantize_array(leaf, kind, group_size=group_size)
    except PeftError as e:
      raise PeftError(f'{name}: {e}') from None

  out = paths.map_named(visit, frozen)
  if not taken:
    raise PeftError(
      f'quantize: select={select!r} matches no float leaf of 2+ dimensions'
    )
  return out


def _after(x: jax.Array, q: QuantizedArray) -> QuantizedArray:
  """``q`` tied to ``x`` so that ``dequantize(q)`` runs after ``x`` exists
  and is not merged with another dequantization of ``q``.

  ``lax.optimization_barrier`` says so. XLA:CPU removes barriers before
  scheduling and common-subexpression elimination (measured: it merged the
  backward pass's dequantization into the forward's and kept every layer's
  ``w``), so on the CPU backend the scales also get an exact zero that
  depends on ``x`` (``0 · isnan(x₀)``). Not elsewhere: where ``x`` is split
  over devices, reading ``x₀`` costs a collective per matmul (measured on 8
  CPU devices: 16 all-reduces instead of 1 for a tiny Llama's gradient).
  """
  x, q = jax.lax.optimization_barrier((x, q))
  if jax.default_backend() != 'cpu':
    return q
  zero = 0.0 * jnp.isnan(jnp.ravel(x)[0]).astype(jnp.float32)
  scales = (q.scales.astype(jnp.float32) + zero).astype(q.scales.dtype)
  return dataclasses.replace(q, scales=scales)


def dequantized_linear(
  fn: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, q: QuantizedArray
) -> jax.Array:
  """``fn(x, dequantize(q))`` for ``fn`` linear in ``x`` (a matmul), with ``w``
  formed only at this use: the forward pass dequantizes once ``x`` exists,
  the backward pass keeps ``q`` (not ``w``) and dequantizes again once the
  output cotangent exists (``_after`` orders both), so the scheduler cannot
  hold every layer's ``w`` at once. ``q`` gets no gradient.
  """

  @jax.custom_vjp
  def run(x, q):
    return fn(x, dequantize(_after(x, q)))

  def forward(x, q):
    return run(x, q), (q, jax.ShapeDtypeStruct(x.shape, x.dtype))

  def backward(residuals, cotangent):
    q, x_type = residuals
    w = dequantize(_after(cotangent, q))
    (dx,) = jax.linear_transpose(lambda x: fn(x, w), x_type)(cotangent)
    return dx, None

  run.defvjp(forward, backward)
  return run(x, q)


def recomputed(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` under ``jax.checkpoint`` saving everything but dequantized weights:
  the backward pass recomputes ``dequantize`` instead of keeping ``w``."""
  policy = jax.checkpoint_policies.save_anything_except_these_names(DEQUANTIZED)
  return jax.checkpoint(fn, policy=policy)


def stored_bytes(tree: Params) -> int:
  """Bytes of ``tree`` as stored (quantized leaves count codes and scales)."""
  leaves = jax.tree.leaves(tree, is_leaf=is_quantized)
  return sum(x.nbytes if is_quantized(x) else int(np.asarray(x).nbytes) for x in leaves)
