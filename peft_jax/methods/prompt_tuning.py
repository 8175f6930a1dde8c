"""Prompt tuning (Lester et al., 2021): trainable vectors before the input."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src import checks
from peft_jax._src.base import ActivationAdapter, Array, PeftError
from peft_jax._src.registry import register

INITS = ('uniform', 'normal')


class PromptParams(NamedTuple):
  """The soft prompt ``prompt: (l, d)``."""

  prompt: Array


def _embeddings_and_mask(name: str, value) -> tuple:
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


@register('prompt_tuning')
def prompt_tuning(
  length: int = 20,
  *,
  init: str = 'uniform',
  init_scale: float = 0.5,
  param_dtype: str = 'float32',
) -> ActivationAdapter:
  """Prepends ``l`` trained vectors to the input embeddings.

  At an ``input_embeddings`` hook point with value ``(x, mask)``,
  ``x: (b, s, d)``, ``mask: (b, s)`` (or ``None``):
  ``x' = concat(P, x)`` along the sequence with ``P: (l, d)`` broadcast over
  the batch, and ``mask' = concat(1_l, mask)`` (the guide's
  ``E' = concat(P, Embed(ids))``); the model sees ``s + l`` positions.
  Trainable count ``l · d`` (``PromptParams``); no buffers. Not mergeable:
  there is no weight-space form.

  Init: ``'uniform'``, ``U(−c, c)`` with ``c = init_scale = 0.5`` (Lester
  et al.'s random init), or ``'normal'``, ``N(0, c²)`` (``c = 1`` is HF
  PEFT's ``RANDOM``). Lester et al.'s better init from vocabulary
  embeddings: overwrite ``params`` rows with rows of the frozen embedding
  table after ``init``.

  Args:
    length: l > 0, the number of prompt vectors.
    init: ``'uniform'`` or ``'normal'``.
    init_scale: c > 0 of the init.
    param_dtype: dtype of ``P``; the output keeps the embeddings' dtype.

  Returns:
    The prompt-tuning ``ActivationAdapter``.
  """
  name = 'prompt_tuning'
  length = checks.positive_int(name, 'length', length)
  checks.choice(name, 'init', init, INITS)
  scale = checks.positive(name, 'init_scale', init_scale)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init_fn(key, value):
    x, _ = _embeddings_and_mask(name, value)
    shape = (length, x.shape[-1])
    if init == 'uniform':
      prompt = jax.random.uniform(key, shape, dtype, -scale, scale)
    else:
      prompt = scale * jax.random.normal(key, shape, dtype)
    return PromptParams(prompt), None

  def apply(value, params, buffers):
    del buffers
    x, mask = _embeddings_and_mask(name, value)
    batch = x.shape[0]
    prompt = jnp.broadcast_to(
      params.prompt.astype(x.dtype), (batch, length, x.shape[2])
    )
    x = jnp.concatenate([prompt, x], axis=1)
    if mask is not None:
      mask = jnp.concatenate([jnp.ones((batch, length), mask.dtype), mask], axis=1)
    return x, mask

  def num_params(value):
    return length * _embeddings_and_mask(name, value)[0].shape[-1]

  return ActivationAdapter(init=init_fn, apply=apply, num_params=num_params)
