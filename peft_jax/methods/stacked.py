"""Per-layer adapters on kernels stacked for a scan over layers."""

import jax
import jax.numpy as jnp

from peft_jax._src import registry
from peft_jax._src.base import Adapter, PeftError
from peft_jax._src.registry import register


def _vmapped(fn):
  return None if fn is None else jax.vmap(fn)


@register('stacked')
def stacked(method: str | Adapter) -> Adapter:
  """One independent copy of ``method`` per slice of a stacked leaf.

  Models that scan over layers (``nn.scan``, ``lax.scan``) keep each
  layer's kernel in one leaf ``w: (L, d_in, d_out)``. ``stacked(method)``
  vmaps the method over the leading axis: ``θ`` gets a leading ``L`` axis
  (layer ``l`` has its own ``init(key_l, w[l])``) and ``w'[l] =
  apply(w[l], θ[l])``. On the factored path the scan slices ``(w, θ)``
  together and every layer runs the method's own factored form. Nest it for
  more stacked axes. Trainable count ``L · count(method on w[0])``.

  Args:
    method: a spec string (``'lora(rank=8)'``) or an ``Adapter``.
  """
  inner = registry.get(method)

  def init(key, w):
    if jnp.ndim(w) < 2:
      raise PeftError(
        f'stacked expects a leaf with a leading layer axis; got {jnp.shape(w)}'
      )
    return jax.vmap(inner.init)(jax.random.split(key, jnp.shape(w)[0]), w)

  def num_params(shape):
    if inner.num_params is None:
      raise PeftError(f'{inner.name or "the inner method"} has no count formula')
    return shape[0] * inner.num_params(shape[1:])

  regularizer = _vmapped(inner.regularizer)
  return Adapter(
    init=init,
    apply=_vmapped(inner.apply),
    unapply=_vmapped(inner.unapply),
    regularizer=None
    if regularizer is None
    else lambda w, t: jnp.sum(regularizer(w, t)),
    num_params=num_params,
    mergeable=inner.mergeable,
    unstacked=inner,
  )
