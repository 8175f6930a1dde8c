"""Training-time randomness for stochastic adapters (DiffPruning, Mixout).

A method that samples inside ``apply`` (a hard-concrete gate, a Bernoulli
mixing mask) keeps a ``Noise`` in its buffers. Stored buffers hold it
*inactive*: ``apply`` then computes the deterministic, evaluation-time form,
so ``merge``, evaluation and checkpoints never see noise. Only inside the
training step (``make_train_step``) is every ``Noise`` replaced by an active
one with a fresh key, folded from the step's dropout key and the entry's
position in the tree; the stored buffers are not changed.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from peft_jax._src.base import Array, Buffers


class Noise(NamedTuple):
  """A per-entry random stream, active only during training.

  Attributes:
    key: raw key data, ``uint32 (..., 2)`` (``jax.random.key_data`` of a
      threefry key); leading axes for stacked entries.
    active: ``bool (...)``: sample (training) or not (evaluation).
  """

  key: Array
  active: Array


def inactive(key: Array) -> Noise:
  """A stored (evaluation-mode) ``Noise`` for one entry."""
  return Noise(jax.random.key_data(key), jnp.zeros((), bool))


def key_of(noise: Noise) -> Array:
  """The typed PRNG key of one (unstacked) ``Noise``."""
  return jax.random.wrap_key_data(noise.key)


def _is_noise(node) -> bool:
  return isinstance(node, Noise)


def activate(buffers: Buffers, rng: Array) -> Buffers:
  """``buffers`` with every ``Noise`` active under a key folded from ``rng``.

  Entry ``i`` (tree order) gets ``fold_in(rng, i)``; a stacked entry with
  leading axes ``s`` gets one split key per slice.
  """
  leaves, treedef = jax.tree.flatten(buffers, is_leaf=_is_noise)
  out = []
  for i, leaf in enumerate(leaves):
    if not _is_noise(leaf):
      out.append(leaf)
      continue
    batch = leaf.active.shape
    keys = jax.random.split(jax.random.fold_in(rng, i), math.prod(batch))
    data = jax.random.key_data(keys).reshape(*batch, -1)
    out.append(Noise(data.astype(leaf.key.dtype), jnp.ones(batch, bool)))
  return jax.tree.unflatten(treedef, out)


def has_noise(buffers: Buffers) -> bool:
  """Whether some entry of ``buffers`` is stochastic."""
  return any(_is_noise(x) for x in jax.tree.leaves(buffers, is_leaf=_is_noise))
