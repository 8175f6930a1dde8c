"""Initializers for low-rank factors, by the names the method specs use.

Each takes ``(key, shape, dtype, rank)``; ``shape[0]`` is the fan-in in the
Flax layout (``a: (d_in, r)`` has fan-in ``d_in``; ``b: (r, d_out)`` has
fan-in ``r``).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from peft_jax._src import checks

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype, int], jax.Array]


def kaiming_uniform(key, shape, dtype, rank):
  """``U(-1/√fan_in, 1/√fan_in)``: torch ``kaiming_uniform_(a=√5)``, LoRA's default."""
  del rank
  bound = 1.0 / jnp.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def gaussian(key, shape, dtype, rank):
  """``N(0, (1/r)²)``: HF PEFT ``init_lora_weights='gaussian'``."""
  return jax.random.normal(key, shape, dtype) / rank


def normal(key, shape, dtype, rank):
  """``N(0, 0.02²)``: the BERT/DeBERTa init hook of the paper's NLU code."""
  del rank
  return 0.02 * jax.random.normal(key, shape, dtype)


def zeros(key, shape, dtype, rank):
  """All zeros (LoRA's ``b``, so the adapter starts as the identity)."""
  del key, rank
  return jnp.zeros(shape, dtype)


BY_NAME: dict[str, Initializer] = {
  'kaiming_uniform': kaiming_uniform,
  'gaussian': gaussian,
  'normal': normal,
  'zeros': zeros,
}


def get(method: str, name: str, value: str) -> Initializer:
  """The initializer called ``value``; raises listing the known names."""
  return BY_NAME[checks.choice(method, name, value, tuple(BY_NAME))]
