"""(IA)³ in weight-space form (Liu et al., 2022): scale a kernel's outputs or,
in HF PEFT's feed-forward form, its inputs."""

from typing import NamedTuple

from peft_jax._src import checks, scaling
from peft_jax._src.base import Adapter, Array
from peft_jax._src.registry import register


class Ia3Params(NamedTuple):
  """(IA)³'s output scales: ``l_out: (d_out,)``."""

  l_out: Array


class Ia3InputParams(NamedTuple):
  """(IA)³'s input scales (the feed-forward form): ``l_in: (d_in,)``."""

  l_in: Array


@register('ia3')
def ia3(*, feedforward: bool = False, param_dtype: str = 'float32') -> Adapter:
  """Learned output scaling ``w' = w · diag(l_out)``, or input scaling
  ``w' = diag(l_in) · w`` with ``feedforward=True``.

  Shapes: ``w: (d_in, d_out)``, scales initialised to 1; the bias (a
  separate leaf) is never scaled.

  * ``feedforward=False``: ``l_out: (d_out,)`` (``Ia3Params``). In the
    spec's layout ``W' = diag(l) W``, i.e. ``h = l ⊙ (W x) + b``. Factored
    form ``y = (x @ w) ⊙ l_out``. Trainable count ``d_out``.
  * ``feedforward=True``: ``l_in: (d_in,)`` (``Ia3InputParams``), i.e.
    ``h = W (l ⊙ x) + b``. Factored form ``y = (x ⊙ l_in) @ w``. Trainable
    count ``d_in``. The same map as ``ssl``.

  Hugging Face's ``IA3Model`` uses the input form for the modules listed in
  ``feedforward_modules`` (its ``ia3_l`` has shape ``(1, in_features)``
  there) and the output form elsewhere (``ia3_l: (out_features, 1)``), so an
  HF (IA)³ adapter is two rule sets: ``ia3(feedforward=True)`` on its
  feed-forward kernels (the paper's ``l_ff`` on ``W_2``), ``ia3()`` on the
  others (``l_k``, ``l_v``). HF's output form also scales the bias, which
  ``ia3()`` does not: the two agree on kernels without a bias.

  No buffers. Identity at init; mergeable; ``unapply`` divides by the scales
  (defined while none is 0).

  Args:
    feedforward: scale the input (``l_in``) instead of the output.
    param_dtype: dtype of the scales; ``w'`` keeps ``w``'s dtype.

  Returns:
    The (IA)³ ``Adapter``.
  """
  name = 'ia3'
  feedforward = checks.flag(name, 'feedforward', feedforward)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)
  if feedforward:
    return scaling.input_scaling(name, dtype, Ia3InputParams)
  return scaling.output_scaling(name, dtype, Ia3Params)
