"""SSB, Scaling the Subspace of Both singular-vector sides (Si et al., 2024)."""

import jax.numpy as jnp

from peft_jax._src import checks
from peft_jax._src.base import Adapter
from peft_jax._src.registry import register


@register('ssb')
def ssb(*, param_dtype: str = 'float32') -> Adapter:
  """Learned input and output scaling: ``w' = diag(l_in) · w · diag(l_out)``.

  Shapes: ``w: (d_in, d_out)``, ``l_in: (d_in,)``, ``l_out: (d_out,)``, both
  initialised to 1. The paper writes ``φ(W_p) = D1 W_p D2``; in the PyTorch
  layout ``W' = diag(l_o) W diag(l_i)``, so ``h = l_o ⊙ (W (l_i ⊙ x)) + b``
  (loralib ``layers_SSB.py``). No SVD; identity at init. Factored form
  ``y = ((x ⊙ l_in) @ w) ⊙ l_out``. Trainable count ``d_in + d_out``.
  Mergeable; ``unapply`` divides by both scales.

  Args:
    param_dtype: dtype of ``l_in`` and ``l_out``.
  """
  name = 'ssb'
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    del key
    d_in, d_out = checks.matrix(name, w)
    return {'l_in': jnp.ones(d_in, dtype), 'l_out': jnp.ones(d_out, dtype)}

  def apply(w, theta):
    return (theta['l_in'][:, None] * w * theta['l_out']).astype(w.dtype)

  def unapply(w, theta):
    return (w / theta['l_in'][:, None] / theta['l_out']).astype(w.dtype)

  def factored(x, w, theta):
    y = ((x * theta['l_in']) @ w) * theta['l_out']
    return y.astype(jnp.result_type(x, w))

  return Adapter(
    init=init,
    apply=apply,
    factored=factored,
    unapply=unapply,
    num_params=lambda shape: shape[0] + shape[1],
  )
