"""TriLoRA: a low-rank update with a learned diagonal core (Feng et al., 2024)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from peft_jax._src import checks, initializers
from peft_jax._src.base import Adapter, Array
from peft_jax._src.low_rank import lora_scale, low_rank_adapter
from peft_jax._src.registry import register


class TriLoraParams(NamedTuple):
  """TriLoRA's factors and core: ``a: (d_in, r)``, ``b: (r, d_out)``, ``e: (r,)``."""

  a: Array
  b: Array
  e: Array


@register('trilora')
def trilora(
  rank: int = 8,
  alpha: float | None = None,
  *,
  param_dtype: str = 'float32',
) -> Adapter:
  """Diagonal-core low-rank update: ``w' = w + s · a @ diag(e) @ b``.

  Shapes (Flax layout): ``w: (d_in, d_out)``, ``a: (d_in, r)``, ``e: (r,)``,
  ``b: (r, d_out)``. Spec (PyTorch layout): ``ΔW = s·B diag(e) A`` with
  ``A = aᵀ``, ``B = bᵀ``. The scale follows the spec's two codes:
  ``alpha=None`` gives ``s = 1`` (loralib ``layers_trilora.py``, no scale),
  a number gives ``s = α/r`` (CR_MR ``trilora.py``). Init ``a ~ KU(d_in)``,
  ``b ~ KU(r)`` (``U(±1/√fan_in)``), ``e = 0``: identity at init. Trainable
  count ``r · (d_in + d_out + 1)`` (``TriLoraParams``); no buffers.
  Mergeable and invertible. Factored form
  ``y = x @ w + s · ((x @ a) ⊙ e) @ b``. ``factors`` gives ``(a, b)`` (the
  paper applies MPC_o to TriLoRA).

  Args:
    rank: r, with ``0 < r <= min(d_in, d_out)``.
    alpha: ``None`` (no scale) or α of ``s = α/r``.
    param_dtype: dtype of ``a``, ``e`` and ``b``; ``w'`` keeps ``w``'s dtype.

  Returns:
    The TriLoRA ``Adapter``; its parameters are ``TriLoraParams``.
  """
  name = 'trilora'
  rank = checks.positive_int(name, 'rank', rank)
  scale = 1.0 if alpha is None else lora_scale(name, rank, alpha)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    d_in, d_out = checks.rank_fits(name, rank, w)
    key_a, key_b = jax.random.split(key)
    params = TriLoraParams(
      a=initializers.kaiming_uniform(key_a, (d_in, rank), dtype, rank),
      b=initializers.kaiming_uniform(key_b, (rank, d_out), dtype, rank),
      e=jnp.zeros(rank, dtype),
    )
    return params, None

  return low_rank_adapter(
    init,
    scale,
    num_params=lambda shape: rank * (shape[0] + shape[1] + 1),
    mix=lambda params, buffers, h: h * params.e,
  )
