"""Decoding with a KV cache: ``init_cache`` and ``generate`` (one jit per shape)."""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from peft_jax._src.base import PeftError
from peft_jax.models.llama.model import Array, Cache, LlamaConfig, LlamaForCausalLM

Params = dict[str, Any]


def init_cache(
  config: LlamaConfig, batch_size: int, max_len: int, dtype: Any = None
) -> Cache:
  """An empty KV cache of fixed length for ``LlamaForCausalLM``.

  Args:
    config: the model's hyper-parameters.
    batch_size: number of sequences.
    max_len: number of cache slots (prompt + generated tokens).
    dtype: cache dtype; None: ``config.dtype``.

  Returns:
    ``{'k', 'v': (num_layers, batch, max_len, kv_heads, head_dim) zeros,
    'end': int32 0}``; ``end`` is the number of filled slots.
  """
  shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
  dtype = config.dtype if dtype is None else dtype
  return {
    'k': jnp.zeros(shape, dtype),
    'v': jnp.zeros(shape, dtype),
    'end': jnp.zeros((), jnp.int32),
  }


def _pick(logits: Array, key: Array, temperature: float) -> Array:
  """Greedy (temperature 0) or sampled next tokens from ``(batch, vocab)``."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


@functools.partial(
  jax.jit, static_argnames=('model', 'max_new_tokens', 'temperature', 'eos_id')
)
def _generate(
  model: LlamaForCausalLM,
  params: Params,
  prompt_ids: Array,
  rng: Array,
  *,
  max_new_tokens: int,
  temperature: float,
  eos_id: int,
) -> Array:
  """Prefill + ``while_loop`` decode, compiled once per shape and options."""
  batch, prompt_len = prompt_ids.shape
  cache = init_cache(model.config, batch, prompt_len + max_new_tokens)
  variables = {'params': params}
  logits, cache = model.apply(variables, prompt_ids, cache=cache)
  token = _pick(logits[:, -1], jax.random.fold_in(rng, 0), temperature)
  fill = max(eos_id, 0)
  out = jnp.full((batch, max_new_tokens), fill, jnp.int32).at[:, 0].set(token)
  done = token == eos_id

  def cond(state):
    step, _, _, done, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, token, cache, done, out = state
    logits, cache = model.apply(variables, token[:, None], cache=cache)
    new = _pick(logits[:, 0], jax.random.fold_in(rng, step), temperature)
    new = jnp.where(done, fill, new)
    out = jax.lax.dynamic_update_slice(out, new[:, None], (0, step))
    return step + 1, new, cache, done | (new == eos_id), out

  state = (jnp.int32(1), token, cache, done, out)
  return jax.lax.while_loop(cond, body, state)[-1]


def generate(
  model: LlamaForCausalLM,
  params: Params,
  prompt_ids: Array,
  max_new_tokens: int,
  *,
  temperature: float = 0.0,
  rng: Array | None = None,
  eos_id: int | None = None,
) -> Array:
  """Generates tokens with a preallocated KV cache, in one compiled call.

  The prompt is run once (prefill) into a cache of
  ``prompt_len + max_new_tokens`` slots; then a ``lax.while_loop`` feeds one
  token per step. The whole call is one ``jax.jit`` program, compiled once
  per (model, prompt shape, ``max_new_tokens``, ``temperature``,
  ``eos_id``), never per token.

  Args:
    model: a ``LlamaForCausalLM``.
    params: its ``params`` tree (merge adapters into it first).
    prompt_ids: ``(batch, prompt_len)`` int token ids, unpadded (every row a
      real prompt of the same length).
    max_new_tokens: number of tokens to generate, >= 1.
    temperature: 0 for greedy decoding, > 0 to sample from
      ``softmax(logits / temperature)``.
    rng: a PRNG key, required when ``temperature > 0``.
    eos_id: a token id that ends a sequence; a row stops after it and the
      loop exits when every row has stopped.

  Returns:
    ``(batch, max_new_tokens)`` int32 generated ids (the prompt excluded);
    after a row's ``eos_id`` the rest of the row is ``eos_id``.

  Raises:
    PeftError: for a bad ``prompt_ids`` shape, ``max_new_tokens``,
      ``temperature`` or missing ``rng``.
  """
  prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
  if prompt_ids.ndim != 2 or prompt_ids.shape[1] == 0:
    raise PeftError(
      f'prompt_ids must be (batch, prompt_len>0), got shape {prompt_ids.shape}.'
    )
  if max_new_tokens < 1:
    raise PeftError(f'max_new_tokens must be >= 1, got {max_new_tokens}.')
  if temperature < 0:
    raise PeftError(f'temperature must be >= 0, got {temperature}.')
  if temperature > 0 and rng is None:
    raise PeftError('Sampling (temperature > 0) needs rng=jax.random.key(...).')
  return _generate(
    model,
    params,
    prompt_ids,
    jax.random.key(0) if rng is None else rng,
    max_new_tokens=int(max_new_tokens),
    temperature=float(temperature),
    eos_id=-1 if eos_id is None else int(eos_id),
  )
