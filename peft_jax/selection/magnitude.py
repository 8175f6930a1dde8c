"""MagPruning scores: ``|θ0|``, the magnitude of each pretrained weight."""

import jax
import jax.numpy as jnp

from peft_jax._src import selection
from peft_jax._src.base import Params


def magnitude(frozen: Params, *, where: selection.Where = None) -> selection.ScoreTree:
  """``|θ0|`` per scored entry (the SAM paper's MagPruning baseline).

  Args:
    frozen: the pretrained weights θ0.
    where: the scored leaves (see ``peft_jax.selection.sam``).

  Returns:
    A score tree of ``float32`` magnitudes.
  """
  chosen = selection.choose('magnitude', frozen, where)
  return selection.nest(jax.jit(_abs)(chosen))


def _abs(chosen: selection.Flat) -> selection.Flat:
  return {name: jnp.abs(w.astype(jnp.float32)) for name, w in chosen.items()}
