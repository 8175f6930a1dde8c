"""Matrix methods on N-D kernels (``nn.DenseGeneral``, multi-head projections)."""

import math

import jax.numpy as jnp

from peft_jax._src import checks
from peft_jax._src.base import Adapter, PeftError
from peft_jax._src.registry import register_wrapper
from peft_jax.wrappers.stacked import leaf_method, per_layer, stacked


@register_wrapper('matrix_view')
def matrix_view(method: str | Adapter, n_in: int = 1) -> Adapter:
  """Runs a matrix ``method`` on an N-D kernel seen as a ``(d_in, d_out)`` matrix.

  ``nn.DenseGeneral`` kernels keep their axes: a query projection is
  ``w: (d, heads, d_head)`` (``n_in = 1`` input axis), an output projection
  ``w: (heads, d_head, d)`` (``n_in = 2``). The leading ``n_in`` axes are the
  input, the rest the output: ``d_in = prod(shape[:n_in])``, ``d_out =
  prod(shape[n_in:])``, and ``w' = unflatten(apply(flatten(w), θ))``. The
  factored form contracts ``x: (..., *shape[:n_in])`` with the kernel the way
  ``DenseGeneral`` does, ``y: (..., *shape[n_in:])``, through the method's
  own factored form, so the factored path stays fast on these layers.
  Trainable count: the method's count on ``(d_in, d_out)``. On a
  ``stacked`` method it views each layer's slice:
  ``matrix_view(stacked(m)) == stacked(matrix_view(m))``.

  Args:
    method: a spec string (``'lora(rank=8)'``) or an ``Adapter`` for 2-D
      kernels.
    n_in: the number of leading input axes of the kernel.
  """
  inner = leaf_method('matrix_view', method)
  n_in = checks.positive_int('matrix_view', 'n_in', n_in)
  if per_layer(inner) is not None:
    return stacked(matrix_view(per_layer(inner), n_in))

  def split(shape) -> tuple[int, int]:
    if len(shape) <= n_in:
      raise PeftError(
        f'matrix_view(n_in={n_in}) needs a kernel with more than {n_in} axes; '
        f'got shape {tuple(shape)}'
      )
    return math.prod(shape[:n_in]), math.prod(shape[n_in:])

  def as_matrix(w):
    return jnp.reshape(w, split(jnp.shape(w)))

  def on_matrix(fn):
    if fn is None:
      return None
    return lambda w, *state: jnp.reshape(fn(as_matrix(w), *state), jnp.shape(w))

  def factored(x, w, params, buffers):
    lead = x.shape[: x.ndim - n_in]
    y = inner.linear.factored(
      jnp.reshape(x, (*lead, -1)), as_matrix(w), params, buffers
    )
    return jnp.reshape(y, (*lead, *jnp.shape(w)[n_in:]))

  def num_params(shape):
    if inner.num_params is None:
      raise PeftError(f'{inner.name or "the inner method"} has no count formula')
    return inner.num_params(split(shape))

  has_factored = inner.linear is not None and inner.linear.factored is not None
  return inner._replace(
    init=lambda key, w: inner.init(key, as_matrix(w)),
    apply=on_matrix(inner.apply),
    unapply=on_matrix(inner.unapply),
    linear=inner.linear._replace(factored=factored, in_axes=n_in)
    if has_factored
    else None,
    regularizer=(
      None
      if inner.regularizer is None
      else lambda w, *state: inner.regularizer(as_matrix(w), *state)
    ),
    num_params=num_params,
  )
