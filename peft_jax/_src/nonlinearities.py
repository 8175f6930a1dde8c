"""Non-linearities of adapter branches, by the names the method specs use."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from peft_jax._src import checks

BY_NAME: dict[str, Callable[[jax.Array], jax.Array]] = {
  'relu': jax.nn.relu,
  'gelu': jax.nn.gelu,
  'silu': jax.nn.silu,
  'swish': jax.nn.silu,  # adapter-transformers' name for silu.
  'tanh': jnp.tanh,
}


def get(method: str, name: str, value: str) -> Callable[[jax.Array], jax.Array]:
  """The non-linearity called ``value``; raises listing the known names."""
  return BY_NAME[checks.choice(method, name, value, tuple(BY_NAME))]
