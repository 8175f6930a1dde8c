"""MoSLoRA: a low-rank update with a learnable subspace mixer (Wu et al., 2024)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from peft_jax._src import checks, initializers
from peft_jax._src.base import Adapter, Array
from peft_jax._src.low_rank import adalora_scale, low_rank_adapter
from peft_jax._src.registry import register


class MosLoraParams(NamedTuple):
  """MoSLoRA's factors and mixer: ``a: (d_in, r)``, ``b: (r, d_out)``, ``m: (r, r)``."""

  a: Array
  b: Array
  m: Array


def orthogonal(key, shape, dtype, rank):
  """A random orthogonal ``r × r`` matrix (torch ``orthogonal_``)."""
  del rank
  return jax.nn.initializers.orthogonal()(key, shape, dtype)


# mixer_init -> initializer of m: 'normal' is the spec's loralib code,
# 'kaiming'/'orthogonal' the MoSLoRA paper's options.
MIXER_INITS = {
  'normal': initializers.normal,
  'kaiming': initializers.kaiming_uniform,
  'orthogonal': orthogonal,
}


@register('moslora')
def moslora(
  rank: int = 8,
  alpha: float = 16.0,
  *,
  mixer_init: str = 'normal',
  param_dtype: str = 'float32',
) -> Adapter:
  """Mixed-subspace low-rank update: ``w' = w + s · a @ m @ b``.

  Shapes (Flax layout): ``w: (d_in, d_out)``, ``a: (d_in, r)``,
  ``m: (r, r)``, ``b: (r, d_out)``; ``s = α/(r + 1e-5)`` with ``α ≤ 0``
  replaced by ``r`` (AdaLoRA-style scale, spec cheat-sheet). Spec (PyTorch
  layout): ``ΔW = s·B M A`` with ``A = aᵀ``, ``B = bᵀ`` and the mixer
  ``M = mᵀ``. Init (spec, loralib ``layers_moslora.py``):
  ``a ~ N(0, 0.02²)``, ``m ~ N(0, 0.02²)``, ``b = 0``, so identity at init.
  The MoSLoRA paper initialises the mixer with Kaiming-uniform
  (``U(±1/√r)``) or as a random orthogonal matrix: ``mixer_init``.
  Trainable count ``r · (d_in + d_out) + r²`` (``MosLoraParams``); no
  buffers. Mergeable and invertible.
  Factored form ``y = x @ w + s · ((x @ a) @ m) @ b``. ``factors`` gives
  ``(a, b)``.

  Args:
    rank: r, with ``0 < r <= min(d_in, d_out)``.
    alpha: α of the scale.
    mixer_init: ``'normal'``, ``'kaiming'`` or ``'orthogonal'``.
    param_dtype: dtype of ``a``, ``m`` and ``b``; ``w'`` keeps ``w``'s dtype.

  Returns:
    The MoSLoRA ``Adapter``; its parameters are ``MosLoraParams``.
  """
  name = 'moslora'
  scale = adalora_scale(name, rank, alpha)
  init_m = MIXER_INITS[
    checks.choice(name, 'mixer_init', mixer_init, tuple(MIXER_INITS))
  ]
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    d_in, d_out = checks.rank_fits(name, rank, w)
    key_a, key_m = jax.random.split(key)
    params = MosLoraParams(
      a=initializers.normal(key_a, (d_in, rank), dtype, rank),
      b=jnp.zeros((rank, d_out), dtype),
      m=init_m(key_m, (rank, rank), dtype, rank),
    )
    return params, None

  return low_rank_adapter(
    init,
    scale,
    num_params=lambda shape: rank * (shape[0] + shape[1]) + rank**2,
    mix=lambda params, buffers, h: h @ params.m,
  )
