"""Low-rank parameterised hypercomplex multiplication (LPHM), Compacter's layer.

An LPHM weight is a sum of ``n`` Kronecker products, ``W = Σ_{i=1..n} A_i ⊗
(S_i T_i)``, with rule matrices ``A_i: (n, n)`` and rank-``r`` factors
``S_i: (p, r)``, ``T_i: (r, q)``, so ``W: (n·p, n·q)`` costs ``n³ + n·r·(p +
q)`` parameters instead of ``n²·p·q``. The weight-space ``compacter`` keeps
its ``A_i`` per leaf; ``compacter_adapter`` shares them across layers.
"""

import jax
import jax.numpy as jnp

from peft_jax._src.base import Array


def lphm_weight(rule: Array, s: Array, t: Array) -> Array:
  """``Σ_i rule_i ⊗ (s_i @ t_i)``: ``(n, n, n), (n, p, r), (n, r, q) -> (n·p, n·q)``."""
  n, p, q = rule.shape[0], s.shape[1], t.shape[2]
  blocks = jnp.einsum('ijk,iar,irb->jakb', rule, s, t)
  return blocks.reshape(n * p, n * q)


def glorot_uniform(key: Array, shape: tuple[int, ...], dtype) -> Array:
  """``U(±√(6 / (fan_in + fan_out)))`` for each ``shape[-2:]`` matrix of the stack.

  torch's ``xavier_uniform_`` on each ``shape[-2:]`` slice (its bound is
  symmetric in the two fans, so the layout does not matter).
  """
  bound = (6.0 / (shape[-2] + shape[-1])) ** 0.5
  return jax.random.uniform(key, shape, dtype, -bound, bound)
