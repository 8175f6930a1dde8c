"""Diagonal scalings of a kernel, shared by (IA)³ and SSL.

``w: (d_in, d_out)``; the scale vector is the one field of the method's
params NamedTuple, initialised to 1 (identity). Both forms are mergeable,
invertible while no scale is 0, and have a factored form that never builds
``w'``.
"""

from typing import NamedTuple

import jax.numpy as jnp

from peft_jax._src import checks
from peft_jax._src.base import Adapter, Linear


def input_scaling(
  name: str, dtype: jnp.dtype, params_type: type[NamedTuple]
) -> Adapter:
  """``w' = diag(l) · w``, ``l: (d_in,)``; factored ``y = (x ⊙ l) @ w``."""

  def init(key, w):
    del key
    return params_type(jnp.ones(checks.matrix(name, w)[0], dtype)), None

  def apply(w, params, buffers):
    del buffers
    return (params[0][:, None] * w).astype(w.dtype)

  def unapply(w, params, buffers):
    del buffers
    return (w / params[0][:, None]).astype(w.dtype)

  def factored(x, w, params, buffers):
    del buffers
    return ((x * params[0]) @ w).astype(jnp.result_type(x, w))

  return Adapter(
    init=init,
    apply=apply,
    unapply=unapply,
    linear=Linear(factored),
    num_params=lambda shape: shape[0],
  )


def output_scaling(
  name: str, dtype: jnp.dtype, params_type: type[NamedTuple]
) -> Adapter:
  """``w' = w · diag(l)``, ``l: (d_out,)``; factored ``y = (x @ w) ⊙ l``."""

  def init(key, w):
    del key
    return params_type(jnp.ones(checks.matrix(name, w)[1], dtype)), None

  def apply(w, params, buffers):
    del buffers
    return (w * params[0]).astype(w.dtype)

  def unapply(w, params, buffers):
    del buffers
    return (w / params[0]).astype(w.dtype)

  def factored(x, w, params, buffers):
    del buffers
    return ((x @ w) * params[0]).astype(jnp.result_type(x, w))

  return Adapter(
    init=init,
    apply=apply,
    unapply=unapply,
    linear=Linear(factored),
    num_params=lambda shape: shape[1],
  )
