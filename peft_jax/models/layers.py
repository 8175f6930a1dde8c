"""Layers shared by the model families."""

import flax.linen as nn
import jax

Array = jax.Array


def token_dot_general(
  x: Array,
  kernel: Array,
  dimension_numbers,
  precision=None,
  preferred_element_type=None,
) -> Array:
  """``nn.Dense``'s ``x @ w`` over one token axis: ``(..., d_in) @ (d_in,
  d_out) -> (..., d_out)`` computed as ``(tokens, d_in) @ (d_in, d_out)``.

  Same result as ``lax.dot_general``; what changes is the backward pass: the
  weight gradient ``xᵀ g`` contracts over one axis instead of (batch, seq),
  which XLA:CPU lays out by transposing the whole output gradient first.
  """
  (x_contract, w_contract), batch = dimension_numbers
  if x_contract != (x.ndim - 1,) or w_contract != (0,) or batch != ((), ()):
    raise ValueError(f'expected x @ w dimension numbers, got {dimension_numbers}')
  y = jax.lax.dot_general(
    x.reshape(-1, x.shape[-1]),
    kernel,
    (((1,), (0,)), ((), ())),
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  return y.reshape(*x.shape[:-1], y.shape[-1])


def dense(features: int, name: str, **kwargs) -> nn.Dense:
  """``nn.Dense`` (same parameters) with ``token_dot_general``."""
  return nn.Dense(features, dot_general=token_dot_general, name=name, **kwargs)
