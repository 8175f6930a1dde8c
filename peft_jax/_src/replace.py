"""Methods that train a copy of the leaf itself (full, BitFit, LN-tuning)."""

import math

import jax.numpy as jnp

from peft_jax._src.base import Adapter, Linear


def replace_leaf(dtype, check=None, kernels: bool = False) -> Adapter:
  """``w' = θ`` with ``θ`` initialised to ``w``; no buffers.

  ``θ`` is a fresh copy of the leaf (so donating it never frees the frozen
  buffer) in ``dtype``; ``apply`` returns it in the leaf's dtype.

  Args:
    dtype: the dtype of the trained copy.
    check: ``w -> None``, raising for leaves the method does not take.
    kernels: the method takes kernels: add the factored form ``y = x @ θ``.
  """

  def init(key, w):
    del key
    if check is not None:
      check(w)
    return jnp.array(w, dtype=dtype, copy=True), None

  def apply(w, params, buffers):
    del buffers
    return params.astype(w.dtype)

  def factored(x, w, params, buffers):
    return x @ apply(w, params, buffers)

  return Adapter(
    init=init,
    apply=apply,
    linear=Linear(factored) if kernels else None,
    num_params=math.prod,
  )
