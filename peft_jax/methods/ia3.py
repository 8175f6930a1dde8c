"""(IA)³ in weight-space form (Liu et al., 2022): scale a kernel's outputs."""

from typing import NamedTuple

import jax.numpy as jnp

from peft_jax._src import checks
from peft_jax._src.base import Adapter, Array, Linear
from peft_jax._src.registry import register


class Ia3Params(NamedTuple):
  """(IA)³'s output scales: ``l_out: (d_out,)``."""

  l_out: Array


@register('ia3')
def ia3(*, param_dtype: str = 'float32') -> Adapter:
  """Learned output scaling: ``w' = w · diag(l_out)``.

  Shapes: ``w: (d_in, d_out)``, ``l_out: (d_out,)`` initialised to 1. In the
  spec's layout ``W' = diag(l) W``, i.e. ``h = l ⊙ (W x) + b``: the bias is
  not scaled (it is a separate leaf). Factored form ``y = (x @ w) ⊙ l_out``.
  Trainable count ``d_out`` (``Ia3Params``); no buffers. Identity at init;
  mergeable; ``unapply`` divides by ``l_out`` (defined while no entry of
  ``l_out`` is 0).

  Args:
    param_dtype: dtype of ``l_out``; ``w'`` keeps ``w``'s dtype.

  Returns:
    The (IA)³ ``Adapter``.
  """
  name = 'ia3'
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    del key
    return Ia3Params(l_out=jnp.ones(checks.matrix(name, w)[1], dtype)), None

  def apply(w, params, buffers):
    del buffers
    return (w * params.l_out).astype(w.dtype)

  def unapply(w, params, buffers):
    del buffers
    return (w / params.l_out).astype(w.dtype)

  def factored(x, w, params, buffers):
    del buffers
    return ((x @ w) * params.l_out).astype(jnp.result_type(x, w))

  return Adapter(
    init=init,
    apply=apply,
    unapply=unapply,
    linear=Linear(factored),
    num_params=lambda shape: shape[1],
  )
