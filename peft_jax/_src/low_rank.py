"""The low-rank update shared by the LoRA family: ``w' = w + s · mix(a) @ b``.

LoRA, AdaLoRA, TriLoRA, FLoRA, MoSLoRA, FlexLoRA, PiSSA and MiLoRA differ
only in their init, their scale and the ``r × r`` map between the factors:
none (LoRA), a diagonal ``e`` (AdaLoRA, TriLoRA, FlexLoRA's masked ``e``), a
full core (FLoRA's ``g``, MoSLoRA's mixer) or an initial copy subtracted
(PiSSA, MiLoRA). Their typed parameters all have fields ``a: (d_in, r)`` and
``b: (r, d_out)``; ``mix(params, buffers, h)`` applies the map to rows
``h: (..., r)``. Because it is linear, the weight form ``s · mix(a) @ b`` and
the factored form ``x @ w + s · mix(x @ a) @ b`` agree.
"""

from collections.abc import Callable

from peft_jax._src import checks
from peft_jax._src.additive import additive
from peft_jax._src.base import Adapter, AdapterParams, Array, Buffers

MixFn = Callable[[AdapterParams, Buffers, Array], Array]


def no_mix(params: AdapterParams, buffers: Buffers, h: Array) -> Array:
  """LoRA: ``a`` and ``b`` meet directly."""
  del params, buffers
  return h


def lora_scale(method: str, rank: int, alpha: float, rslora: bool = False) -> float:
  """``s = α/r``, or ``α/√r`` with rsLoRA, for ``α > 0`` (``s = 0`` zeroes the
  update and both factors' gradients: the adapter could never train)."""
  rank = checks.positive_int(method, 'rank', rank)
  alpha = checks.positive(method, 'alpha', alpha)
  return alpha / (rank**0.5 if checks.flag(method, 'rslora', rslora) else rank)


def adalora_scale(method: str, rank: int, alpha: float) -> float:
  """``s = α/(r₀ + 1e-5)``, with ``α ≤ 0`` replaced by ``r₀`` (AdaLoRA's code)."""
  rank = checks.positive_int(method, 'rank', rank)
  alpha = checks.real(method, 'alpha', alpha)
  return (alpha if alpha > 0 else float(rank)) / (rank + 1e-5)


def factors(params: AdapterParams, buffers: Buffers) -> tuple[Array, Array]:
  """``(a, b)``: the low-rank factors of any LoRA-family parameters."""
  del buffers
  return params.a, params.b


def low_rank_adapter(init, scale: float, num_params, mix: MixFn = no_mix) -> Adapter:
  """An ``Adapter`` for ``w' = w + s · mix(a) @ b`` on parameters with ``a``, ``b``.

  Args:
    init: ``(key, w) -> (params, buffers)`` with ``params.a: (d_in, r)`` and
      ``params.b: (r, d_out)``.
    scale: ``s``.
    num_params: the trainable-count formula.
    mix: the linear ``r × r`` map between the factors, on rows ``(..., r)``.

  Returns:
    The adapter with ``apply``, ``unapply``, the factored form
    ``x @ w + s · mix(x @ a) @ b`` and ``factors`` ``(a, b)``.
  """

  def delta(w, params, buffers):
    del w
    return scale * (mix(params, buffers, params.a) @ params.b)

  def delta_product(x, w, params, buffers):
    del w
    return scale * (mix(params, buffers, x @ params.a) @ params.b)

  return additive(
    init, delta, delta_product=delta_product, num_params=num_params, factors=factors
  )
