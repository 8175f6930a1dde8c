"""Prompt tuning (Lester et al., 2021): trainable vectors before the input."""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src import checks, soft_prompts
from peft_jax._src.base import ActivationAdapter, Array, PeftError
from peft_jax._src.registry import register

INITS = ('uniform', 'normal')


class PromptParams(NamedTuple):
  """The soft prompt ``prompt: (l, d)``."""

  prompt: Array


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
  PEFT's ``RANDOM``). Lester et al.'s better inits come from the frozen
  embedding table ``table: (V, d)``, which ``init`` does not see: replace
  the prompt's parameters after ``init`` with ``prompt_from_vocabulary``
  (rows of random token ids, HF PEFT's ``SAMPLE_VOCAB``) or
  ``prompt_from_text`` (the rows of a text's token ids, HF PEFT's
  ``TEXT``)::

    point = 'bert/embeddings/input_embeddings'
    tree = pj.by_rules([(point, 'prompt_tuning(length=20)')])
    params, buffers = tree.init(key, frozen, pj.hook_points(model, ids, mask))
    table = frozen['bert']['embeddings']['word_embeddings']['embedding']
    ids = tokenizer('Is this review positive?')['input_ids']
    params['bert']['embeddings']['input_embeddings'] = pj.prompt_from_text(
      ids, table, 20
    )  # or pj.prompt_from_vocabulary(key, table, 20)

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
    x, _ = soft_prompts.embeddings_and_mask(name, value)
    shape = (length, x.shape[-1])
    if init == 'uniform':
      prompt = jax.random.uniform(key, shape, dtype, -scale, scale)
    else:
      prompt = scale * jax.random.normal(key, shape, dtype)
    return PromptParams(prompt), None

  def apply(value, params, buffers):
    del buffers
    return soft_prompts.prepend(
      soft_prompts.embeddings_and_mask(name, value), params.prompt
    )

  def num_params(value):
    return length * soft_prompts.embeddings_and_mask(name, value)[0].shape[-1]

  return ActivationAdapter(init=init_fn, apply=apply, num_params=num_params)


def _vocabulary_size(method: str, table) -> int:
  """``V`` of an embedding table ``(V, d)``, or a one-line error."""
  if np.ndim(table) != 2 or 0 in np.shape(table):
    raise PeftError(
      f'{method}: table of shape {np.shape(table)} must be a non-empty '
      'embedding table (vocab, d)'
    )
  return np.shape(table)[0]


def prompt_from_vocabulary(
  key: Array, table: Array, length: int, *, param_dtype: str = 'float32'
) -> PromptParams:
  """A prompt of ``l`` random rows of the frozen embedding table.

  ``P = table[ids]`` with ``ids ~ U{0, …, V−1}``, ``l`` draws with
  replacement over the whole vocabulary: Hugging Face PEFT's
  ``PromptTuningInit.SAMPLE_VOCAB`` (``torch.randint(0, V, (l,))``; Lester
  et al. sample from the 5,000 most frequent tokens, which needs a
  frequency-sorted vocabulary: pass ``table[:5000]`` for that).

  Args:
    key: the PRNG key of the draw.
    table: the model's token embeddings ``(V, d)``.
    length: l > 0, the number of prompt vectors.
    param_dtype: dtype of ``P`` (float32, as HF PEFT).

  Returns:
    ``PromptParams(prompt: (l, d))``, to replace the ``prompt_tuning``
    parameters that ``init`` made.
  """
  name = 'prompt_from_vocabulary'
  length = checks.positive_int(name, 'length', length)
  vocab = _vocabulary_size(name, table)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)
  ids = jax.random.randint(key, (length,), 0, vocab)
  return PromptParams(jnp.take(jnp.asarray(table), ids, axis=0).astype(dtype))


def prompt_from_text(
  token_ids, table: Array, length: int, *, param_dtype: str = 'float32'
) -> PromptParams:
  """A prompt of the embedding-table rows of a text's token ids.

  With the text's ``n`` ids: the first ``l`` ids if ``n ≥ l``, else the ids
  repeated ``⌈l/n⌉`` times and cut to ``l`` (``t_1 … t_n t_1 … t_n t_1 …``);
  ``P = table[ids]``: Hugging Face PEFT's ``PromptTuningInit.TEXT``. HF
  tokenizes with ``tokenizer(text)['input_ids']``, special tokens included
  (``[CLS] … [SEP]`` for BERT): pass the same ids for the same prompt.

  Args:
    token_ids: the text's token ids, a non-empty 1-D sequence of ints in
      ``[0, V)``.
    table: the model's token embeddings ``(V, d)``.
    length: l > 0, the number of prompt vectors.
    param_dtype: dtype of ``P`` (float32, as HF PEFT).

  Returns:
    ``PromptParams(prompt: (l, d))``, to replace the ``prompt_tuning``
    parameters that ``init`` made.
  """
  name = 'prompt_from_text'
  length = checks.positive_int(name, 'length', length)
  vocab = _vocabulary_size(name, table)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)
  ids = np.asarray(token_ids)
  if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
    raise PeftError(
      f'{name}: token_ids of shape {ids.shape} and dtype {ids.dtype} must be a '
      'non-empty 1-D sequence of ints'
    )
  if ids.min() < 0 or ids.max() >= vocab:
    raise PeftError(
      f'{name}: token ids must be in [0, {vocab}) for a table of {vocab} rows; '
      f'got min {ids.min()}, max {ids.max()}'
    )
  ids = np.tile(ids, math.ceil(length / ids.size))[:length]
  return PromptParams(jnp.take(jnp.asarray(table), ids, axis=0).astype(dtype))
