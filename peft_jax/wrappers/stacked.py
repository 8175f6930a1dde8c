"""Per-layer adapters on kernels stacked for a scan over layers."""

import jax
import jax.numpy as jnp

from peft_jax._src import registry
from peft_jax._src.base import Adapter, Linear, PeftError
from peft_jax._src.registry import register_wrapper


def leaf_method(wrapper: str, method) -> Adapter:
  """``method`` resolved to a weight-space ``Adapter``, or a one-line error."""
  inner = registry.get(method)
  if not isinstance(inner, Adapter):
    raise PeftError(
      f'{wrapper} wraps weight-space methods; {inner.name or "this adapter"} acts '
      'on activations'
    )
  return inner


def _vmapped(fn):
  return None if fn is None else jax.vmap(fn)


@register_wrapper('stacked')
def stacked(method: str | Adapter) -> Adapter:
  """One independent copy of ``method`` per slice of a stacked leaf.

  Models that scan over layers (``nn.scan``, ``lax.scan``) keep each
  layer's kernel in one leaf ``w: (L, d_in, d_out)``. ``stacked(method)``
  vmaps the method over the leading axis: every array of ``params`` and
  ``buffers`` gets a leading ``L`` axis (layer ``l`` has its own
  ``init(key_l, w[l])``), ``w'[l] = apply(w[l], θ[l])``, and the regulariser
  gives one term per layer. On the factored path the scan slices
  ``(w, θ)`` together and every layer runs the method's own factored form
  (``Linear.per_layer``). Nest it for more stacked axes. Trainable count
  ``L · count(method on w[0])``. The parameters keep the method's type, so
  its schedule governs them.

  Args:
    method: a spec string (``'lora(rank=8)'``) or an ``Adapter``.
  """
  inner = leaf_method('stacked', method)

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

  in_axes = 1 if inner.linear is None else inner.linear.in_axes
  return inner._replace(
    init=init,
    apply=_vmapped(inner.apply),
    unapply=_vmapped(inner.unapply),
    linear=Linear(factored=None, in_axes=in_axes, per_layer=inner),
    regularizer=_vmapped(inner.regularizer),
    num_params=num_params,
  )


def per_layer(adapter: Adapter) -> Adapter | None:
  """The per-slice adapter of a ``stacked`` one, else ``None``."""
  return None if adapter.linear is None else adapter.linear.per_layer
