"""SSB, Scaling the Subspace of Both singular-vector sides (Si et al., 2024)."""

from typing import NamedTuple

import jax.numpy as jnp

from peft_jax._src import checks
from peft_jax._src.base import Adapter, Array, Linear
from peft_jax._src.registry import register


class SsbParams(NamedTuple):
  """SSB's scales: ``l_in: (d_in,)``, ``l_out: (d_out,)``."""

  l_in: Array
  l_out: Array


@register('ssb')
def ssb(*, param_dtype: str = 'float32') -> Adapter:
  """Learned input and output scaling: ``w' = diag(l_in) · w · diag(l_out)``.

  Shapes: ``w: (d_in, d_out)``, ``l_in: (d_in,)``, ``l_out: (d_out,)``, both
  initialised to 1. The paper writes ``φ(W_p) = D1 W_p D2``; in the PyTorch
  layout ``W' = diag(l_o) W diag(l_i)``, so ``h = l_o ⊙ (W (l_i ⊙ x)) + b``
  (loralib ``layers_SSB.py``). No SVD; identity at init. Factored form
  ``y = ((x ⊙ l_in) @ w) ⊙ l_out``. Trainable count ``d_in + d_out``
  (``SsbParams``); no buffers. Mergeable; ``unapply`` divides by both scales.

  Args:
    param_dtype: dtype of ``l_in`` and ``l_out``; ``w'`` keeps ``w``'s dtype.

  Returns:
    The SSB ``Adapter``.
  """
  name = 'ssb'
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    del key
    d_in, d_out = checks.matrix(name, w)
    return SsbParams(l_in=jnp.ones(d_in, dtype), l_out=jnp.ones(d_out, dtype)), None

  def apply(w, params, buffers):
    del buffers
    return (params.l_in[:, None] * w * params.l_out).astype(w.dtype)

  def unapply(w, params, buffers):
    del buffers
    return (w / params.l_in[:, None] / params.l_out).astype(w.dtype)

  def factored(x, w, params, buffers):
    del buffers
    y = ((x * params.l_in) @ w) * params.l_out
    return y.astype(jnp.result_type(x, w))

  return Adapter(
    init=init,
    apply=apply,
    unapply=unapply,
    linear=Linear(factored),
    num_params=lambda shape: shape[0] + shape[1],
  )
