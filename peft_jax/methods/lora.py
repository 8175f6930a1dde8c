"""LoRA (Hu et al., 2021), with the rsLoRA scale (Kalajdzievski, 2023)."""

from typing import NamedTuple

import jax

from peft_jax._src import checks, initializers
from peft_jax._src.base import Adapter, Array
from peft_jax._src.low_rank import lora_scale, low_rank_adapter
from peft_jax._src.registry import register


class LoraParams(NamedTuple):
  """LoRA's factors: ``a: (d_in, r)``, ``b: (r, d_out)``."""

  a: Array
  b: Array


@register('lora')
def lora(
  rank: int = 8,
  alpha: float = 16.0,
  *,
  rslora: bool = False,
  a_init: str = 'kaiming_uniform',
  b_init: str = 'zeros',
  param_dtype: str = 'float32',
) -> Adapter:
  """Low-rank update of a kernel: ``w' = w + s · a @ b``.

  Shapes (Flax layout): ``w: (d_in, d_out)``, ``a: (d_in, r)``,
  ``b: (r, d_out)``; ``s = α/r``, or ``α/√r`` with ``rslora=True``. In the
  spec's PyTorch layout this is ``W' = W + s·BA`` with ``A = aᵀ: (r, d_in)``
  and ``B = bᵀ: (d_out, r)``. Factored form: ``y = x @ w + s · (x @ a) @ b``.
  Trainable count ``r · (d_in + d_out)``; no buffers. Identity at init
  (``b = 0``).

  Args:
    rank: r, with ``0 < r <= min(d_in, d_out)``.
    alpha: α of the scale.
    rslora: use ``s = α/√r`` (rank-stabilised LoRA).
    a_init: ``'kaiming_uniform'`` (``U(±1/√d_in)``, the reference LoRA
      default), ``'gaussian'`` (``N(0, 1/r²)``, HF PEFT) or ``'normal'``
      (``N(0, 0.02²)``, the paper's DeBERTa runs).
    b_init: ``'zeros'`` (default) or one of the above.
    param_dtype: dtype of ``a`` and ``b``; ``w'`` keeps ``w``'s dtype.

  Returns:
    The LoRA ``Adapter``; its parameters are ``LoraParams``.
  """
  name = 'lora'
  scale = lora_scale(name, rank, alpha, rslora)
  init_a = initializers.get(name, 'a_init', a_init)
  init_b = initializers.get(name, 'b_init', b_init)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    d_in, d_out = checks.rank_fits(name, rank, w)
    key_a, key_b = jax.random.split(key)
    params = LoraParams(
      a=init_a(key_a, (d_in, rank), dtype, rank),
      b=init_b(key_b, (rank, d_out), dtype, rank),
    )
    return params, None

  return low_rank_adapter(
    init, scale, num_params=lambda shape: rank * (shape[0] + shape[1])
  )
