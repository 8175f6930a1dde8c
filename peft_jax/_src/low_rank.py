"""The low-rank update shared by the LoRA family: ``w' = w + s · mix(a) @ b``.

LoRA, AdaLoRA, TriLoRA, FLoRA, MoSLoRA and FlexLoRA differ only in their init,
their scale and the ``r × r`` map between the factors: none (LoRA), a
diagonal ``e`` (AdaLoRA, TriLoRA, FlexLoRA's masked ``e``) or a full core
(FLoRA's ``g``, MoSLoRA's mixer). ``mix(theta, h)`` applies that map to rows
``h: (..., r)``; because it is linear, the weight form ``s · mix(a) @ b`` and
the factored form ``x @ w + s · mix(x @ a) @ b`` agree.
"""

from collections.abc import Callable

import jax.numpy as jnp

from peft_jax._src.base import Adapter, AdapterParams, Array, InitFn, NumParamsFn

MixFn = Callable[[AdapterParams, Array], Array]


def no_mix(theta: AdapterParams, h: Array) -> Array:
  """LoRA: ``a`` and ``b`` meet directly."""
  del theta
  return h


def low_rank_adapter(
  init: InitFn, scale: float, num_params: NumParamsFn, mix: MixFn = no_mix
) -> Adapter:
  """An ``Adapter`` for ``w' = w + s · mix(θ, a) @ b`` with ``θ['a'], θ['b']``.

  Args:
    init: ``(key, w) -> θ`` with ``a: (d_in, r)`` and ``b: (r, d_out)``.
    scale: ``s``.
    num_params: the trainable-count formula.
    mix: the linear ``r × r`` map between the factors, on rows ``(..., r)``.

  Returns:
    The adapter with ``apply``, ``factored`` (``x @ w + s · mix(x @ a) @ b``),
    ``unapply`` and ``factors`` (``(a, b)``).
  """

  def delta(theta):
    return scale * (mix(theta, theta['a']) @ theta['b'])

  def factored(x, w, theta):
    y = x @ w + scale * (mix(theta, x @ theta['a']) @ theta['b'])
    return y.astype(jnp.result_type(x, w))

  return Adapter(
    init=init,
    apply=lambda w, theta: (w + delta(theta)).astype(w.dtype),
    factored=factored,
    unapply=lambda w, theta: (w - delta(theta)).astype(w.dtype),
    num_params=num_params,
    factors=lambda theta: (theta['a'], theta['b']),
  )
