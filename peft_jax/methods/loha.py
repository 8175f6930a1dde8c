"""LoHa: low-rank Hadamard product update (Hyeon-Woo et al., FedPara; HF PEFT)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from peft_jax._src import checks, initializers
from peft_jax._src.additive import additive
from peft_jax._src.base import Adapter, Array
from peft_jax._src.registry import register


class LohaParams(NamedTuple):
  """LoHa's two factor pairs: ``a1, a2: (d_in, r)``, ``b1, b2: (r, d_out)``."""

  a1: Array
  b1: Array
  a2: Array
  b2: Array


@register('loha')
def loha(rank: int = 8, alpha: float = 8.0, *, param_dtype: str = 'float32') -> Adapter:
  """Hadamard product of two rank-r updates: ``w' = w + s · (a1 @ b1) ⊙ (a2 @ b2)``.

  Shapes (Flax layout): ``w: (d_in, d_out)``, ``a1, a2: (d_in, r)``,
  ``b1, b2: (r, d_out)``; ``s = α/r``. In the PyTorch layout of HF PEFT
  ``ΔW = s · (w1_a w1_b) ⊙ (w2_a w2_b)`` with ``w1_a = b1ᵀ: (d_out, r)`` and
  ``w1_b = a1ᵀ: (r, d_in)`` (likewise for pair 2). ``rank(ΔW) ≤ r²`` with only
  ``2r(d_in + d_out)`` trainable parameters.

  Init as HF PEFT (``init_weights=True``): ``a1``, ``b1`` and ``b2``
  Kaiming-uniform (``U(±1/√fan_in)``: ``1/√d_in`` for ``a1``, ``1/√r`` for
  ``b1``, ``b2``) and ``a2 = 0`` (HF's ``hada_w2_b``), so the update starts at
  0 (identity at init) and every factor but ``a2`` starts with zero gradient.
  HF's defaults are ``r = 8``, ``α = 8``; HF's rank/module dropout, the
  Conv "effective" decomposition and the ABBA init are not provided.

  Factored form (Khatri–Rao, no ``(d_in, d_out)`` matrix):
  ``y = x @ w + s · Σ_jk (x·a1_j·a2_k) (b1_j ⊙ b2_k)``, i.e.
  ``z = einsum('...i,ij,ik->...jk', x, a1, a2)`` then
  ``einsum('...jk,jo,ko->...o', z, b1, b2)``: ``O(r²(d_in + d_out))`` per row.
  Trainable count ``2r(d_in + d_out)`` (``LohaParams``); no buffers.
  Mergeable; ``unapply`` subtracts the update.

  Args:
    rank: r, with ``0 < r <= min(d_in, d_out)``.
    alpha: α > 0 of the scale ``s = α/r``.
    param_dtype: dtype of the four factors; ``w'`` keeps ``w``'s dtype.

  Returns:
    The LoHa ``Adapter``.
  """
  name = 'loha'
  rank = checks.positive_int(name, 'rank', rank)
  scale = checks.positive(name, 'alpha', alpha) / rank
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)
  uniform = initializers.kaiming_uniform

  def init(key, w):
    d_in, d_out = checks.rank_fits(name, rank, w)
    k_a1, k_b1, k_b2 = jax.random.split(key, 3)
    params = LohaParams(
      a1=uniform(k_a1, (d_in, rank), dtype, rank),
      b1=uniform(k_b1, (rank, d_out), dtype, rank),
      a2=jnp.zeros((d_in, rank), dtype),
      b2=uniform(k_b2, (rank, d_out), dtype, rank),
    )
    return params, None

  def delta(w, params, buffers):
    del w, buffers
    return scale * (params.a1 @ params.b1) * (params.a2 @ params.b2)

  def delta_product(x, w, params, buffers):
    del w, buffers
    z = jnp.einsum('...i,ij,ik->...jk', x, params.a1, params.a2)
    return scale * jnp.einsum('...jk,jo,ko->...o', z, params.b1, params.b2)

  return additive(
    init,
    delta,
    delta_product=delta_product,
    num_params=lambda shape: 2 * rank * (shape[0] + shape[1]),
  )
