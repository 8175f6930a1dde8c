"""Additive methods, ``w' = w + Δ``: apply, unapply and factored form from ``Δ``.

Most weight-space methods add an update to the frozen kernel. Given the
update (and, optionally, its product with an input), this builds the three
functions that every such method needs, with the dtype rules in one place:
``w'`` keeps ``w``'s dtype; the factored form computes in the result type of
``x`` and ``w`` (the activation dtype), branch included, and returns it.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from peft_jax._src.base import Adapter, AdapterParams, Array, Buffers, Linear

DeltaFn = Callable[[Array, AdapterParams, Buffers], Array]
DeltaProductFn = Callable[[Array, Array, AdapterParams, Buffers], Array]


def additive(
  init,
  delta: DeltaFn,
  *,
  delta_product: DeltaProductFn | None = None,
  num_params=None,
  factors=None,
) -> Adapter:
  """An ``Adapter`` for ``w' = w + delta(w, params, buffers)``.

  Args:
    init: ``(key, w) -> (params, buffers)``.
    delta: ``(w, params, buffers) -> Δ``, shaped like ``w`` (``w`` is passed
      for methods whose update depends on its shape).
    delta_product: ``(x, w, params, buffers) -> x @ Δ`` computed without
      forming ``Δ`` (e.g. LoRA's ``s · (x @ a) @ b``); the factored form is
      then ``x @ w + delta_product(...)``, the branch run with ``params``
      and ``buffers`` cast to the activation dtype (``in_dtype``: bfloat16
      activations keep the rank-r matmuls in bfloat16, as the frozen matmul;
      the gradient reaches float32 parameters through the cast). ``None``:
      no factored form.
    num_params: the trainable-count formula.
    factors: ``params -> (down, up)`` for low-rank methods.

  Returns:
    The adapter, invertible (``unapply`` subtracts ``Δ``).
  """

  def apply(w, params, buffers):
    return (w + delta(w, params, buffers)).astype(w.dtype)

  def unapply(w, params, buffers):
    return (w - delta(w, params, buffers)).astype(w.dtype)

  def factored(x, w, params, buffers):
    dtype = jnp.result_type(x, w)
    branch = delta_product(x, w, *in_dtype((params, buffers), dtype))
    return (x @ w + branch.astype(dtype)).astype(dtype)

  return Adapter(
    init=init,
    apply=apply,
    unapply=unapply,
    linear=None if delta_product is None else Linear(factored),
    num_params=num_params,
    factors=factors,
  )


def in_dtype(tree, dtype):
  """``tree`` with its floating-point leaves cast to ``dtype`` (others kept):
  an adapter's parameters and buffers for a branch computed in the
  activation dtype."""

  def cast(leaf):
    floating = hasattr(leaf, 'dtype') and jnp.issubdtype(leaf.dtype, jnp.floating)
    return leaf.astype(dtype) if floating else leaf

  return jax.tree.map(cast, tree)
