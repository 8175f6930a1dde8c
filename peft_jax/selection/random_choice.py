"""Random scores: ``top_p`` of them is a uniformly random mask of exact size.

The SAM paper's Random baseline. (This module is not called ``random`` so
that it does not shadow the standard library's.)
"""

import functools

import jax
import jax.numpy as jnp

from peft_jax._src import selection
from peft_jax._src.base import Array, Params
from peft_jax._src.paths import leaf_key


def random(key: Array, frozen: Params, *, where: selection.Where = None):
  """I.i.d. ``U[0, 1)`` scores per scored entry.

  Every entry set of a given size is equally likely to be ``top_p``'s mask.
  Leaf ``name`` draws from ``fold_in(key, hash(name))``, so its scores do not
  depend on which other leaves are scored.

  Args:
    key: PRNG key.
    frozen: the pretrained weights (only shapes are read).
    where: the scored leaves (see ``peft_jax.selection.sam``).

  Returns:
    A score tree of ``float32`` uniform scores.
  """
  chosen = selection.choose('random', frozen, where)
  shapes = tuple((name, tuple(jnp.shape(w))) for name, w in chosen.items())
  return selection.nest(_draw(key, shapes))


@functools.partial(jax.jit, static_argnums=1)
def _draw(key: Array, shapes: tuple[tuple[str, tuple[int, ...]], ...]):
  """``{name: U[0, 1) of shape}``, compiled once per set of shapes."""
  return {
    name: jax.random.uniform(leaf_key(key, name), shape, jnp.float32)
    for name, shape in shapes
  }
