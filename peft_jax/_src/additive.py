"""Additive methods, ``w' = w + Δ``: apply, unapply and factored form from ``Δ``.

Most weight-space methods add an update to the frozen kernel. Given the
update (and, optionally, its product with an input), this builds the three
functions that every such method needs, with the dtype rules in one place:
``w'`` keeps ``w``'s dtype, the factored output has ``x``'s and ``w``'s
result type.
"""

from collections.abc import Callable

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
      then ``x @ w + delta_product(...)``. ``None``: no factored form.
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
    y = x @ w + delta_product(x, w, params, buffers)
    return y.astype(jnp.result_type(x, w))

  return Adapter(
    init=init,
    apply=apply,
    unapply=unapply,
    linear=None if delta_product is None else Linear(factored),
    num_params=num_params,
    factors=factors,
  )
