"""FLoRA: a low-rank update with a full r × r core (Si et al., 2024)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from peft_jax._src import checks, initializers
from peft_jax._src.base import Adapter, Array
from peft_jax._src.low_rank import adalora_scale, lora_scale, low_rank_adapter
from peft_jax._src.registry import register

# style -> (initializer of a and b, whether s = α/(r+1e-5) rather than α/r).
STYLES = {
  'loralib': (initializers.normal, True),
  'cr_mr': (initializers.kaiming_uniform, False),
}


class FloraParams(NamedTuple):
  """FLoRA's factors and core: ``a: (d_in, r)``, ``b: (r, d_out)``, ``g: (r, r)``."""

  a: Array
  b: Array
  g: Array


@register('flora')
def flora(
  rank: int = 8,
  alpha: float = 16.0,
  *,
  style: str = 'cr_mr',
  param_dtype: str = 'float32',
) -> Adapter:
  """Core-augmented low-rank update: ``w' = w + s · a @ g @ b``.

  Shapes (Flax layout): ``w: (d_in, d_out)``, ``a: (d_in, r)``,
  ``g: (r, r)``, ``b: (r, d_out)``. Spec (PyTorch layout):
  ``ΔW = s·B G A`` with ``A = aᵀ``, ``B = bᵀ`` and the full core
  ``G = gᵀ``. ``g = 0`` at init, so the adapter starts as the identity.
  Trainable count ``r · (d_in + d_out) + r²`` (``FloraParams``); no
  buffers. Mergeable and invertible.
  Factored form ``y = x @ w + s · ((x @ a) @ g) @ b``. ``factors`` gives
  ``(a, b)``. The spec documents two styles:

  * ``'cr_mr'`` (CR_MR ``flora.py``, the default): ``a, b ~ KU`` (fan-in
    ``d_in`` and ``r``, i.e. ``U(±1/√fan_in)``), ``s = α/r``.
  * ``'loralib'`` (``layers_flora.py``): ``a, b ~ N(0, 0.02²)``,
    ``s = α/(r + 1e-5)`` with ``α ≤ 0`` replaced by ``r`` (AdaLoRA-style
    scale, spec cheat-sheet).

  Args:
    rank: r, with ``0 < r <= min(d_in, d_out)``.
    alpha: α of the scale.
    style: ``'cr_mr'`` or ``'loralib'``.
    param_dtype: dtype of ``a``, ``g`` and ``b``; ``w'`` keeps ``w``'s dtype.

  Returns:
    The FLoRA ``Adapter``; its parameters are ``FloraParams``.
  """
  name = 'flora'
  init_factor, adalora_style = STYLES[
    checks.choice(name, 'style', style, tuple(STYLES))
  ]
  scale = (adalora_scale if adalora_style else lora_scale)(name, rank, alpha)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    d_in, d_out = checks.rank_fits(name, rank, w)
    key_a, key_b = jax.random.split(key)
    params = FloraParams(
      a=init_factor(key_a, (d_in, rank), dtype, rank),
      b=init_factor(key_b, (rank, d_out), dtype, rank),
      g=jnp.zeros((rank, rank), dtype),
    )
    return params, None

  return low_rank_adapter(
    init,
    scale,
    num_params=lambda shape: rank * (shape[0] + shape[1]) + rank**2,
    mix=lambda params, buffers, h: h @ params.g,
  )
