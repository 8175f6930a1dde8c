"""Full fine-tuning of the matched leaves: the baseline every method is against."""

import math

import jax.numpy as jnp

from peft_jax._src import checks
from peft_jax._src.base import Adapter
from peft_jax._src.registry import register


def replace_leaf(dtype) -> tuple:
  """``init`` and ``apply`` that make the whole leaf trainable.

  ``theta`` is a fresh copy of the leaf (so donating it never frees the
  frozen buffer) in ``dtype``; ``apply`` returns it in the leaf's dtype.
  """

  def init(key, w):
    del key
    return jnp.array(w, dtype=dtype, copy=True)

  def apply(w, theta):
    return theta.astype(w.dtype)

  return init, apply


@register('full')
def full(*, param_dtype: str = 'float32') -> Adapter:
  """Trains the leaf itself: ``w' = θ``, with ``θ`` initialised to ``w``.

  Any shape. Factored form for kernels ``w: (d_in, d_out)``: ``y = x @ θ``.
  Trainable count ``size(w)``. Mergeable; not invertible (``w`` is not kept).

  Args:
    param_dtype: dtype of the trained copy (float32 master weights by
      default, also for bf16 leaves).
  """
  init, apply = replace_leaf(checks.float_dtype('full', 'param_dtype', param_dtype))
  return Adapter(
    init=init,
    apply=apply,
    factored=lambda x, w, theta: x @ apply(w, theta),
    num_params=math.prod,
  )
