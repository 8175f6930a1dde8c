"""What soft-prompt methods share: the ``input_embeddings`` value and the
prepend of ``l`` vectors with their mask (prompt tuning, P-tuning)."""

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src.base import Array, PeftError


def embeddings_and_mask(name: str, value) -> tuple:
  """``(x, mask)`` of an ``input_embeddings`` point, or a one-line error."""
  if not (
    isinstance(value, tuple) and len(value) == 2 and len(np.shape(value[0])) == 3
  ):
    raise PeftError(
      f'{name} acts at an input_embeddings hook point, whose value is '
      '(embeddings (batch, seq, d), attention_mask (batch, seq) or None); got '
      f'{jax.tree.map(lambda x: tuple(x.shape), value)}'
    )
  return value


def prepend(value, prompt: Array) -> tuple:
  """``(concat(P, x), concat(1_l, mask))`` along the sequence, for
  ``x: (b, s, d)``, ``P: (l, d)`` broadcast over the batch in ``x``'s dtype,
  ``mask: (b, s)`` (``None`` stays ``None``)."""
  x, mask = value
  batch, length = x.shape[0], prompt.shape[0]
  prompt = jnp.broadcast_to(prompt.astype(x.dtype), (batch, length, x.shape[2]))
  x = jnp.concatenate([prompt, x], axis=1)
  if mask is not None:
    mask = jnp.concatenate([jnp.ones((batch, length), mask.dtype), mask], axis=1)
  return x, mask
