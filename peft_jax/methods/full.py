"""Full fine-tuning of the matched leaves: the baseline every method is against."""

from peft_jax._src import checks
from peft_jax._src.base import Adapter
from peft_jax._src.registry import register
from peft_jax._src.replace import replace_leaf


@register('full')
def full(*, param_dtype: str = 'float32') -> Adapter:
  """Trains the leaf itself: ``w' = θ``, with ``θ`` initialised to ``w``.

  Any shape; ``θ`` is an array shaped like ``w``, no buffers. Factored form
  for kernels ``w: (d_in, d_out)``: ``y = x @ θ``. Trainable count
  ``size(w)``. Mergeable; not invertible (``w`` is not kept).

  Args:
    param_dtype: dtype of the trained copy (float32 master weights by
      default, also for bf16 leaves).
  """
  dtype = checks.float_dtype('full', 'param_dtype', param_dtype)
  return replace_leaf(dtype, kernels=True)
