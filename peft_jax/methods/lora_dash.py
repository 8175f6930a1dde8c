"""LoRA-Dash (Si et al., ICLR 2025): LoRA plus a dash along chosen directions."""

from typing import NamedTuple

import jax.numpy as jnp

from peft_jax._src import checks, initializers
from peft_jax._src.additive import additive
from peft_jax._src.base import Adapter, Array, PeftError
from peft_jax._src.low_rank import factors, lora_scale
from peft_jax._src.registry import register


class LoraDashParams(NamedTuple):
  """LoRA-Dash's factors and dash: ``a: (d_in, r)``, ``b: (r, d_out)``, ``d: (n,)``.

  ``lora_dash_schedule`` governs every leaf whose parameters have this type.
  """

  a: Array
  b: Array
  d: Array


class LoraDashBuffers(NamedTuple):
  """The dash directions of the frozen ``w``: ``v: (d_in, n)``, ``u: (d_out, n)``.

  Zero until ``lora_dash_schedule`` stores them (float32).
  """

  v: Array
  u: Array


@register('lora_dash')
def lora_dash(
  rank: int = 8,
  alpha: float = 16.0,
  *,
  n_directions: int = 8,
  a_init: str = 'kaiming_uniform',
  param_dtype: str = 'float32',
) -> Adapter:
  """LoRA plus scaled singular directions: ``w' = w + s · a @ b + v · diag(d) · uᵀ``.

  Shapes (Flax layout): ``w: (d_in, d_out)``, params
  ``LoraDashParams(a: (d_in, r), b: (r, d_out), d: (n,))`` (``d`` has no
  scale), ``s = α/r``; buffers ``LoraDashBuffers(v: (d_in, n), u: (d_out,
  n))``, the input- and output-side singular vectors ``V_I``, ``U_I`` of the
  frozen ``w`` along the ``n`` directions ``I`` that ``lora_dash_schedule``
  selects after the pre-launch phase. Spec (PyTorch layout):
  ``W' = W + s·BA + U_I diag(d) V_Iᵀ`` with ``A = aᵀ``, ``B = bᵀ``.

  Init: ``a`` by ``a_init`` (``U(±1/√d_in)``), ``b = 0``, ``d = 0`` and
  ``u = v = 0``: the dash term is zero, and so is the gradient of ``d``,
  until the schedule stores the directions (plain LoRA in pre-launch, no
  gradient mask needed). Identity at init. Trainable count
  ``r · (d_in + d_out) + n``. Mergeable and invertible. Factored form
  ``y = x @ w + s · (x @ a) @ b + ((x @ v) ⊙ d) @ uᵀ``. ``factors`` gives
  ``(a, b)``.

  Args:
    rank: r, with ``0 < r <= min(d_in, d_out)``.
    alpha: α of the LoRA scale.
    n_directions: n (the spec's ``s_d = 8``), ``0 < n <= min(d_in, d_out)``.
    a_init: ``'kaiming_uniform'`` (default), ``'gaussian'`` or ``'normal'``,
      as for ``lora``.
    param_dtype: dtype of ``a``, ``b`` and ``d`` (the bases stay float32).

  Returns:
    The LoRA-Dash ``Adapter``; train it with ``lora_dash_schedule``.
  """
  name = 'lora_dash'
  scale = lora_scale(name, rank, alpha)
  n = checks.positive_int(name, 'n_directions', n_directions)
  init_a = initializers.get(name, 'a_init', a_init)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    d_in, d_out = checks.rank_fits(name, rank, w)
    if n > min(d_in, d_out):
      raise PeftError(
        f'{name}: n_directions={n} exceeds min(d_in, d_out)={min(d_in, d_out)} '
        f'of the kernel of shape {(d_in, d_out)}'
      )
    params = LoraDashParams(
      a=init_a(key, (d_in, rank), dtype, rank),
      b=jnp.zeros((rank, d_out), dtype),
      d=jnp.zeros(n, dtype),
    )
    buffers = LoraDashBuffers(
      v=jnp.zeros((d_in, n), jnp.float32), u=jnp.zeros((d_out, n), jnp.float32)
    )
    return params, buffers

  def delta(w, params, buffers):
    del w
    dash = (buffers.v * params.d) @ buffers.u.T
    return scale * (params.a @ params.b) + dash

  def delta_product(x, w, params, buffers):
    del w
    lora = scale * ((x @ params.a) @ params.b)
    return lora + ((x @ buffers.v) * params.d) @ buffers.u.T

  return additive(
    init,
    delta,
    delta_product=delta_product,
    num_params=lambda shape: rank * (shape[0] + shape[1]) + n,
    factors=factors,
  )
