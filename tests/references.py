"""Independent computations and helpers the tests share."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def perturb(tree, seed: int, scale: float = 0.3):
  """Every array of ``tree`` moved by ``scale · N(0, 1)`` noise (so checks are
  not trivial at an identity init)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  moved = [
    x + scale * jax.random.normal(k, x.shape, x.dtype)
    for x, k in zip(leaves, keys, strict=True)
  ]
  return treedef.unflatten(moved)


def houlsby_reference(y, params) -> np.ndarray:
  """``y + silu(y @ down + b_d) @ up + b_u``, written out in float64 NumPy."""
  f64 = lambda t: np.asarray(t, np.float64)
  pre = f64(y) @ f64(params.down) + f64(params.down_bias)
  return f64(y) + (pre / (1 + np.exp(-pre))) @ f64(params.up) + f64(params.up_bias)


def intercepting_houlsby(adapters: dict[tuple, object]):
  """Adds ``houlsby_reference`` to the outputs of the Dense modules at the
  given module paths by Flax method interception: a mechanism independent of
  hook points. Eager only (NumPy inside)."""

  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    path = tuple(context.module.path)
    if context.method_name == '__call__' and path in adapters:
      return jnp.asarray(houlsby_reference(y, adapters[path]), y.dtype)
    return y

  return nn.intercept_methods(interceptor)
