"""SSL, Scaling the Subspace of the Left singular vectors (Si et al., 2024)."""

from typing import NamedTuple

from peft_jax._src import checks, scaling
from peft_jax._src.base import Adapter, Array
from peft_jax._src.registry import register


class SslParams(NamedTuple):
  """SSL's input scales: ``l_in: (d_in,)``."""

  l_in: Array


@register('ssl')
def ssl(*, param_dtype: str = 'float32') -> Adapter:
  """Learned input scaling: ``w' = diag(l_in) · w``.

  Shapes: ``w: (d_in, d_out)``, ``l_in: (d_in,)`` initialised to 1. The
  paper writes ``φ(W_p) = D1 W_p`` in its row convention (``W_p = w``); in
  the PyTorch layout ``W' = W diag(l)``, so ``h = W (l ⊙ x) + b``. It is the
  mirror image of (IA)³, needs no SVD, and starts at the identity.
  Factored form ``y = (x ⊙ l_in) @ w``. Trainable count ``d_in``
  (``SslParams``); no buffers. Mergeable; ``unapply`` divides by ``l_in``.

  Args:
    param_dtype: dtype of ``l_in``; ``w'`` keeps ``w``'s dtype.

  Returns:
    The SSL ``Adapter``.
  """
  name = 'ssl'
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)
  return scaling.input_scaling(name, dtype, SslParams)
