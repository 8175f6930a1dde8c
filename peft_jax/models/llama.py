"""A Llama-family decoder in Flax Linen that loads Hugging Face checkpoints.

One module covers Llama 2/3 (incl. Llama 3.1 ``llama3`` RoPE scaling),
Mistral (without sliding window), Qwen2 (``q/k/v`` biases), TinyLlama and
SmolLM2: pre-RMSNorm layers, rotary position embeddings in Hugging Face's
``rotate_half`` convention, grouped-query attention through
``jax.nn.dot_product_attention`` (cuDNN on GPU with
``attention_impl='cudnn'``) and a SwiGLU MLP. Every linear layer is a plain
``flax.linen.Dense``, so the factored path of peft_jax intercepts them.

Parameter names (``/``-joined key paths of the ``params`` collection), which
target rules match against; with ``scan_layers=False``::

  embed_tokens/embedding                               (vocab, d)
  layers_{i}/self_attn/q_proj/{kernel,bias}            (d, heads*hd), (heads*hd,)
  layers_{i}/self_attn/{k_proj,v_proj}/{kernel,bias}   (d, kv_heads*hd), (kv_heads*hd,)
  layers_{i}/self_attn/o_proj/{kernel,bias}            (heads*hd, d), (d,)
  layers_{i}/mlp/{gate_proj,up_proj}/kernel            (d, ffn)
  layers_{i}/mlp/down_proj/kernel                      (ffn, d)
  layers_{i}/{input_layernorm,post_attention_layernorm}/scale  (d,)
  norm/scale                                           (d,)
  lm_head/kernel                                       (d, vocab)

``q/k/v`` biases exist iff ``attention_bias``, the ``o_proj`` bias iff
``attention_out_bias``; ``lm_head`` is absent when ``tie_word_embeddings``.

With ``scan_layers=True`` the ``layers_{i}`` subtrees are replaced by one
``nn.scan`` module named ``layers`` whose leaves carry a leading
``num_layers`` axis (``layers/self_attn/q_proj/kernel: (L, d, heads*hd)``);
``stack_layers`` / ``unstack_layers`` convert between the two layouts.
Kernels use the Flax layout ``(d_in, d_out)``, the transpose of a PyTorch
``Linear.weight``.

Hook points (``peft_jax.hook_point``; names are module paths plus the point;
under ``scan_layers`` every layer is ``layers/...``)::

  input_embeddings                        (embeddings (b, s, d),
                                           attention_mask (b, s) or None)
  layers_{i}/self_attn/attention_kv       (k, v), each (b, s, kv_heads, hd),
                                          keys after RoPE
  layers_{i}/self_attn/attention_output   (b, s, d) after o_proj, before residual
  layers_{i}/mlp/ffn_intermediate         (b, s, ffn) silu(gate) * up
  layers_{i}/mlp/ffn_output               (b, s, d) after down_proj, before residual

Prompt tuning: a handler at ``input_embeddings`` may return ``p`` more
positions at the front (and the mask with ``p`` more entries, or None). They
take RoPE positions ``0..p-1`` and the tokens are shifted by ``p`` (given
``positions`` are shifted by ``p`` and the prompts numbered ``0..p-1`` in
front of them); they are causal like tokens, and the ``p`` positions are
dropped from the returned logits (``(b, s, vocab)`` as without a handler).

Prefix tuning: a handler at ``attention_kv`` may return ``p`` more keys and
values at the front (``kv_heads`` heads; RoPE is not applied to them, the
queries keep their positions). Every query attends to all of them, and
causally to the tokens; ``attention_mask`` masks only the tokens.

Both only without a KV cache: a handler that changes the length while a cache
is used raises ``PeftError`` (a length-preserving handler is fine).

Example::

  config, params = load_hf('path/to/TinyLlama', dtype=jnp.bfloat16)
  model = LlamaForCausalLM(config)
  logits = model.apply({'params': params}, input_ids)        # (b, t, vocab)
  new_ids = generate(model, params, input_ids, max_new_tokens=32)
"""

import dataclasses
import functools
import math
import os
import pathlib
import re
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import traverse_util

from peft_jax._src.base import PeftError
from peft_jax._src.hooks import hook_point
from peft_jax.models.checkpoints import check_param_shapes, read_safetensors

Array = jax.Array
Params = dict[str, Any]
Cache = dict[str, Array]

ROPE_TYPES = ('linear', 'llama3')
RUNTIME_OPTIONS = ('dtype', 'param_dtype', 'scan_layers', 'remat', 'attention_impl')
_LLAMA3_KEYS = (
  'factor',
  'low_freq_factor',
  'high_freq_factor',
  'original_max_position_embeddings',
)
_SUPPORTED_MODEL_TYPES = ('llama', 'mistral', 'qwen2')
_LAYER_RE = re.compile(r'layers_(\d+)')


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters of a Llama-family decoder, plus runtime options.

  Attributes:
    vocab_size: number of token ids.
    hidden_size: width ``d`` of the residual stream.
    intermediate_size: width of the SwiGLU MLP.
    num_layers: number of decoder layers.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention); must divide
      ``num_heads``. None: ``num_heads``.
    head_dim: width of one head. None: ``hidden_size // num_heads``.
    rms_norm_eps: epsilon of every RMSNorm.
    rope_theta: RoPE base wavelength.
    rope_scaling: None (plain RoPE) or a hashable ``((key, value), ...)``
      form of Hugging Face's ``rope_scaling`` dict, sorted by key, with
      ``rope_type`` in ``ROPE_TYPES``: ``'linear'`` (``factor``) or
      ``'llama3'`` (``factor``, ``low_freq_factor``, ``high_freq_factor``,
      ``original_max_position_embeddings``). A dict is accepted and
      converted.
    attention_bias: ``q_proj``/``k_proj``/``v_proj`` have biases (Qwen2).
    attention_out_bias: ``o_proj`` has a bias (HF Llama's
      ``attention_bias=True`` sets both).
    tie_word_embeddings: the output projection is ``embed_tokensᵀ`` and there
      is no ``lm_head`` parameter.
    max_position_embeddings: context length of the checkpoint
      (informational; positions beyond it are not rejected).
    dtype: compute dtype (e.g. ``jnp.bfloat16``); RMSNorm statistics, RoPE
      and the returned logits are float32.
    param_dtype: dtype of initialised and loaded parameters.
    scan_layers: run the layers as one ``nn.scan`` (faster compiles; stacked
      parameters, see the module docstring).
    remat: rematerialise each layer in the backward pass (``nn.remat``).
    attention_impl: ``implementation`` of ``jax.nn.dot_product_attention``:
      None (XLA), ``'xla'`` or ``'cudnn'``.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Any = None
  attention_bias: bool = False
  attention_out_bias: bool = False
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 2048
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False
  attention_impl: str | None = None

  def __post_init__(self):
    set_ = functools.partial(object.__setattr__, self)
    if self.num_kv_heads is None:
      set_('num_kv_heads', self.num_heads)
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise PeftError(
          f'hidden_size={self.hidden_size} is not divisible by '
          f'num_heads={self.num_heads}; pass head_dim explicitly.'
        )
      set_('head_dim', self.hidden_size // self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise PeftError(
        f'num_heads={self.num_heads} is not a multiple of '
        f'num_kv_heads={self.num_kv_heads}.'
      )
    if self.head_dim % 2:
      raise PeftError(f'head_dim={self.head_dim} must be even for RoPE.')
    if self.attention_impl not in (None, 'xla', 'cudnn'):
      raise PeftError(
        f"Unknown attention_impl={self.attention_impl!r}; expected None, 'xla' "
        "or 'cudnn'."
      )
    set_('rope_scaling', _normalize_rope_scaling(self.rope_scaling))

  @property
  def rope_scaling_dict(self) -> dict[str, Any] | None:
    """``rope_scaling`` as a dict (None for plain RoPE)."""
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  def replace(self, **changes: Any) -> 'LlamaConfig':
    """A copy with ``changes`` applied (e.g. runtime options)."""
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf(cls, hf_config: Any, **runtime_options: Any) -> 'LlamaConfig':
    """Builds a config from a transformers Llama/Mistral/Qwen2 config.

    Reads transformers 5.x ``rope_parameters`` (and the 4.x ``rope_theta`` +
    ``rope_scaling`` attributes when those are what the object has).

    Args:
      hf_config: a ``transformers.LlamaConfig``, ``MistralConfig`` or
        ``Qwen2Config`` (or an object with their attributes).
      **runtime_options: any of ``RUNTIME_OPTIONS`` (``dtype``,
        ``param_dtype``, ``scan_layers``, ``remat``, ``attention_impl``).

    Returns:
      The equivalent ``LlamaConfig``.

    Raises:
      PeftError: for an unsupported model type, activation, MLP bias,
        partial rotary factor, RoPE type or sliding-window attention, or an
        unknown runtime option.
    """
    _check_runtime_options(runtime_options)
    model_type = getattr(hf_config, 'model_type', 'llama')
    if model_type not in _SUPPORTED_MODEL_TYPES:
      raise PeftError(
        f'Unsupported model_type={model_type!r}; peft_jax Llama supports '
        f'{_SUPPORTED_MODEL_TYPES}.'
      )
    act = getattr(hf_config, 'hidden_act', 'silu')
    if act != 'silu':
      raise PeftError(f"Unsupported hidden_act={act!r}; only 'silu' (SwiGLU).")
    if getattr(hf_config, 'mlp_bias', False):
      raise PeftError('Unsupported mlp_bias=True; Llama MLPs here have no biases.')
    _check_no_sliding_window(hf_config, model_type)
    rope = dict(getattr(hf_config, 'rope_parameters', None) or {})
    legacy_scaling = getattr(hf_config, 'rope_scaling', None)
    if not rope and legacy_scaling:
      rope = dict(legacy_scaling)
    theta = rope.pop('rope_theta', getattr(hf_config, 'rope_theta', 10000.0))
    if rope.get('partial_rotary_factor', 1.0) != 1.0:
      raise PeftError(
        f'Unsupported partial_rotary_factor={rope["partial_rotary_factor"]}; '
        'only full rotary embeddings.'
      )
    rope.pop('partial_rotary_factor', None)
    if model_type == 'qwen2':
      qkv_bias, out_bias = True, False
    else:
      qkv_bias = out_bias = bool(getattr(hf_config, 'attention_bias', False))
    num_heads = hf_config.num_attention_heads
    return cls(
      vocab_size=hf_config.vocab_size,
      hidden_size=hf_config.hidden_size,
      intermediate_size=hf_config.intermediate_size,
      num_layers=hf_config.num_hidden_layers,
      num_heads=num_heads,
      num_kv_heads=getattr(hf_config, 'num_key_value_heads', None) or num_heads,
      head_dim=getattr(hf_config, 'head_dim', None)
      or hf_config.hidden_size // num_heads,
      rms_norm_eps=hf_config.rms_norm_eps,
      rope_theta=float(theta),
      rope_scaling=rope or None,
      attention_bias=qkv_bias,
      attention_out_bias=out_bias,
      tie_word_embeddings=bool(getattr(hf_config, 'tie_word_embeddings', False)),
      max_position_embeddings=hf_config.max_position_embeddings,
      **runtime_options,
    )


def _check_runtime_options(options: Mapping[str, Any]) -> None:
  """Raises naming the first option that is not a runtime option."""
  for name in options:
    if name not in RUNTIME_OPTIONS:
      raise PeftError(
        f'Unknown runtime option {name!r}; expected one of {RUNTIME_OPTIONS}.'
      )


def _check_no_sliding_window(hf_config: Any, model_type: str) -> None:
  """Raises if the config asks for sliding-window attention anywhere."""
  layer_types = getattr(hf_config, 'layer_types', None) or ()
  window = getattr(hf_config, 'sliding_window', None)
  if model_type == 'qwen2':
    sliding = getattr(hf_config, 'use_sliding_window', False) or any(
      t == 'sliding_attention' for t in layer_types
    )
  else:
    sliding = window is not None and window < hf_config.max_position_embeddings
  if sliding:
    raise PeftError(
      f'Unsupported sliding-window attention (sliding_window={window}, '
      f'model_type={model_type!r}); set sliding_window=None (or '
      'use_sliding_window=False) in config.json to run it with full attention.'
    )


def _normalize_rope_scaling(scaling: Any) -> tuple[tuple[str, Any], ...] | None:
  """HF ``rope_scaling`` dict (or pairs) -> sorted hashable pairs, validated."""
  if scaling is None:
    return None
  items = dict(scaling)
  if 'type' in items:  # transformers 4.x spelling.
    items.setdefault('rope_type', items.pop('type'))
  items.pop('rope_theta', None)
  rope_type = items.get('rope_type', 'default')
  if rope_type == 'default':
    return None
  if rope_type not in ROPE_TYPES:
    raise PeftError(
      f'Unsupported rope_type={rope_type!r}; expected one of {ROPE_TYPES} '
      "(or 'default')."
    )
  required = ('factor',) if rope_type == 'linear' else _LLAMA3_KEYS
  for key in required:
    if key not in items:
      raise PeftError(f'rope_scaling of type {rope_type!r} is missing {key!r}.')
  return tuple(sorted(items.items()))


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """RoPE inverse frequencies, as Hugging Face computes them (float32).

  ``inv_freq[j] = theta^(-2j / head_dim)``, then the ``rope_scaling``
  rule: ``'linear'`` divides by ``factor``; ``'llama3'`` is
  ``_compute_llama3_parameters`` of transformers (long wavelengths divided
  by ``factor``, short ones kept, a smooth interpolation in between).

  Args:
    config: the model's hyper-parameters.

  Returns:
    ``(head_dim // 2,)`` float32 inverse frequencies.
  """
  dim = config.head_dim
  exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
  inv_freq = (1.0 / np.float32(config.rope_theta) ** exponent).astype(np.float32)
  scaling = config.rope_scaling_dict
  if scaling is None:
    return inv_freq
  factor = np.float32(scaling['factor'])
  if scaling['rope_type'] == 'linear':
    return (inv_freq / factor).astype(np.float32)
  low, high = scaling['low_freq_factor'], scaling['high_freq_factor']
  old_context = scaling['original_max_position_embeddings']
  low_freq_wavelen = old_context / low
  high_freq_wavelen = old_context / high
  wavelen = (2 * math.pi / inv_freq).astype(np.float32)
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_context / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
  """HF-convention ``cos``/``sin`` tables for the given positions.

  Args:
    positions: ``(batch, seq)`` or ``(seq,)`` int positions.
    inv_freq: ``(head_dim // 2,)`` inverse frequencies (``rope_inv_freq``).

  Returns:
    ``(cos, sin)``, each ``(batch or 1, seq, 1, head_dim)`` float32, the
    frequencies repeated as ``[f, f]`` (matching ``rotate_half``).
  """
  positions = jnp.asarray(positions)
  if positions.ndim == 1:
    positions = positions[None]
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """``x·cos + rotate_half(x)·sin`` in float32, cast back to ``x.dtype``.

  ``rotate_half([x1, x2]) = [-x2, x1]`` for the two halves of the head
  dimension, so dimension ``j`` pairs with ``j + head_dim/2``.

  Args:
    x: ``(batch, seq, heads, head_dim)`` queries or keys.
    cos: ``(batch or 1, seq, 1, head_dim)`` from ``rope_cos_sin``.
    sin: same shape as ``cos``.

  Returns:
    The rotated ``x``, same shape and dtype.
  """
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


class RMSNorm(nn.Module):
  """HF Llama RMSNorm: ``scale · x / sqrt(mean(x²) + eps)``, stats in float32.

  Attributes:
    eps: added to the mean square.
    dtype: output dtype.
    param_dtype: dtype of the ``scale`` parameter (initialised to ones).
  """

  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Normalises the last axis.

    Args:
      x: ``(..., d)`` hidden states.

    Returns:
      ``(..., d)`` normalised states in ``dtype``.
    """
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * x32.astype(self.dtype)


def _dense(cfg: LlamaConfig, features: int, use_bias: bool, name: str) -> nn.Dense:
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=cfg.dtype,
    param_dtype=cfg.param_dtype,
    name=name,
  )


class LlamaAttention(nn.Module):
  """Grouped-query self-attention with RoPE and an optional KV cache.

  Attributes:
    config: the model's hyper-parameters.
  """

  config: LlamaConfig

  @nn.compact
  def __call__(
    self,
    x: Array,
    rope: tuple[Array, Array],
    mask: Array | None,
    layer_cache: tuple[Array, Array] | None,
    cache_end: Array | None,
  ) -> tuple[Array, tuple[Array, Array] | None]:
    """Applies attention.

    Args:
      x: ``(batch, seq, d)`` normalised hidden states.
      rope: ``(cos, sin)`` from ``rope_cos_sin``.
      mask: None or a boolean ``(batch or 1, 1, seq, keys)`` mask (True:
        attend). Without a cache the causal mask is added on top of it; with
        a cache it must already be causal over the cache slots.
      layer_cache: None, or this layer's ``(k, v)`` cache, each
        ``(batch, max_len, kv_heads, head_dim)``.
      cache_end: with a cache, the int32 slot where ``x``'s first token is
        written.

    Returns:
      ``((batch, seq, d) output, updated (k, v) cache or None)``.

    Hook point ``attention_kv``: ``(k, v)``, each ``(batch, seq, kv_heads,
    head_dim)``, keys after RoPE, before the cache update. Without a cache a
    handler may prepend prefix keys/values that every query attends to.
    """
    cfg = self.config
    b, t, _ = x.shape
    nh, nk, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = _dense(cfg, nh * hd, cfg.attention_bias, 'q_proj')(x).reshape(b, t, nh, hd)
    k = _dense(cfg, nk * hd, cfg.attention_bias, 'k_proj')(x).reshape(b, t, nk, hd)
    v = _dense(cfg, nk * hd, cfg.attention_bias, 'v_proj')(x).reshape(b, t, nk, hd)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k, v = hook_point(self, 'attention_kv', (k, v))
    prefix = k.shape[1] - t
    if k.shape[:1] + k.shape[2:] != (b, nk, hd) or v.shape != k.shape or prefix < 0:
      raise PeftError(
        f'The attention_kv handler returned k {tuple(k.shape)} and v '
        f'{tuple(v.shape)}; expected equal shapes (batch={b}, >= {t} positions, '
        f'kv_heads={nk}, head_dim={hd}).'
      )
    if prefix and layer_cache is not None:
      raise PeftError(
        f'The attention_kv handler prepended {prefix} positions, but a KV cache is '
        'used; prefix handlers work only without a cache (cache=None).'
      )
    if prefix:  # Prefix keys: seen by every query; tokens stay causal.
      causal = jnp.tril(jnp.ones((t, t), bool))
      keep = jnp.concatenate([jnp.ones((t, prefix), bool), causal], axis=1)
      if mask is not None:
        pad = [(0, 0)] * (mask.ndim - 1) + [(prefix, 0)]
        keep = jnp.pad(mask, pad, constant_values=True) & keep
      mask = keep[None, None] if keep.ndim == 2 else keep
    if layer_cache is not None:
      start = (0, cache_end, 0, 0)
      k_cache, v_cache = layer_cache
      k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
      v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
      layer_cache = (k_cache, v_cache)
      k, v = k_cache.astype(q.dtype), v_cache.astype(q.dtype)
    if mask is not None and cfg.attention_impl == 'cudnn':
      mask = jnp.broadcast_to(mask, (b, 1, t, k.shape[1]))  # cuDNN: no broadcasting.
    y = jax.nn.dot_product_attention(
      q,
      k,
      v,
      mask=mask,
      is_causal=layer_cache is None and not prefix,
      implementation=cfg.attention_impl,
    )
    y = _dense(cfg, cfg.hidden_size, cfg.attention_out_bias, 'o_proj')(
      y.reshape(b, t, nh * hd)
    )
    return hook_point(self, 'attention_output', y), layer_cache


class LlamaMLP(nn.Module):
  """SwiGLU: ``down(silu(gate(x)) · up(x))``.

  Attributes:
    config: the model's hyper-parameters.
  """

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Applies the MLP.

    Args:
      x: ``(batch, seq, d)`` normalised hidden states.

    Returns:
      ``(batch, seq, d)`` output.
    """
    cfg = self.config
    gate = _dense(cfg, cfg.intermediate_size, False, 'gate_proj')(x)
    up = _dense(cfg, cfg.intermediate_size, False, 'up_proj')(x)
    h = hook_point(self, 'ffn_intermediate', nn.silu(gate) * up)
    return hook_point(
      self, 'ffn_output', _dense(cfg, cfg.hidden_size, False, 'down_proj')(h)
    )


class LlamaDecoderLayer(nn.Module):
  """One pre-norm decoder layer: ``h += attn(norm(h)); h += mlp(norm(h))``.

  Its call signature ``(carry, xs, *broadcast) -> (carry, ys)`` is the one
  ``nn.scan`` needs: the carry is the residual stream, the scanned input and
  output are the layer's KV cache.

  Attributes:
    config: the model's hyper-parameters.
  """

  config: LlamaConfig

  @nn.compact
  def __call__(
    self,
    h: Array,
    layer_cache: tuple[Array, Array] | None,
    rope: tuple[Array, Array],
    mask: Array | None,
    cache_end: Array | None,
  ) -> tuple[Array, tuple[Array, Array] | None]:
    """Applies the layer.

    Args:
      h: ``(batch, seq, d)`` residual stream.
      layer_cache: None or this layer's ``(k, v)`` cache.
      rope: ``(cos, sin)`` tables.
      mask: see ``LlamaAttention``.
      cache_end: see ``LlamaAttention``.

    Returns:
      ``((batch, seq, d) residual stream, updated cache or None)``.
    """
    cfg = self.config
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)
    a, layer_cache = LlamaAttention(cfg, name='self_attn')(
      norm('input_layernorm')(h), rope, mask, layer_cache, cache_end
    )
    h = h + a
    h = h + LlamaMLP(cfg, name='mlp')(norm('post_attention_layernorm')(h))
    return h, layer_cache


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


class LlamaForCausalLM(nn.Module):
  """The decoder with its LM head; returns float32 next-token logits.

  Attributes:
    config: the model's hyper-parameters.
  """

  config: LlamaConfig

  @nn.compact
  def __call__(
    self,
    input_ids: Array,
    positions: Array | None = None,
    attention_mask: Array | None = None,
    cache: Cache | None = None,
  ) -> Array | tuple[Array, Cache]:
    """Computes logits, optionally reading and extending a KV cache.

    Args:
      input_ids: ``(batch, seq)`` int token ids.
      positions: ``(batch, seq)`` or ``(seq,)`` RoPE positions. None:
        ``0..seq-1``, or ``end..end+seq-1`` with a cache. Pass them for
        left-padded batches (position 0 at the first real token).
      attention_mask: 1 for real tokens and 0 for padding, over the keys:
        ``(batch, seq)`` without a cache, ``(batch, max_len)`` over the cache
        slots with one. Causal masking is always applied.
      cache: None, or a cache from ``init_cache`` (or a previous call): the
        tokens are written at slots ``end..end+seq-1`` and attend to slots
        ``<=`` their own.

    Hook point ``input_embeddings``: ``(token embeddings (batch, seq, d),
    attention_mask)`` (the mask as passed: None, ``(batch, seq)``, or over
    the cache slots with a cache). Without a cache a handler may prepend
    ``p`` positions (prompt tuning; see the module docstring); their logits
    are dropped.

    Returns:
      ``(batch, seq, vocab)`` float32 logits; with a cache,
      ``(logits, updated cache)`` (``end`` advanced by ``seq``).

    Raises:
      PeftError: for ``input_ids`` that are not 2-D, or a hook handler whose
        result has the wrong shape or changes the length with a cache.
    """
    cfg = self.config
    if input_ids.ndim != 2:
      raise PeftError(
        f'input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}.'
      )
    t = input_ids.shape[1]
    embed = nn.Embed(
      cfg.vocab_size,
      cfg.hidden_size,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      name='embed_tokens',
    )
    h, attention_mask = hook_point(
      self, 'input_embeddings', (embed(input_ids), attention_mask)
    )
    prompt = h.shape[1] - t
    _check_prompt(h, attention_mask, input_ids.shape, prompt, cache)
    key_mask = None
    if attention_mask is not None:
      key_mask = jnp.asarray(attention_mask)[:, None, None, :].astype(bool)
    if cache is None:
      end, kv, mask = None, None, key_mask
      if positions is None:
        positions = jnp.arange(t + prompt)
      elif prompt:
        positions = jnp.asarray(positions)
        front = jnp.broadcast_to(
          jnp.arange(prompt, dtype=positions.dtype), (*positions.shape[:-1], prompt)
        )
        positions = jnp.concatenate([front, positions + prompt], axis=-1)
    else:
      end, kv = cache['end'], (cache['k'], cache['v'])
      query_slots = end + jnp.arange(t)
      if positions is None:
        positions = query_slots
      slots = jnp.arange(cache['k'].shape[2])
      mask = (slots[None, :] <= query_slots[:, None])[None, None]
      if key_mask is not None:
        mask = mask & key_mask
    rope = rope_cos_sin(positions, rope_inv_freq(cfg))

    layer_cls = LlamaDecoderLayer
    if cfg.remat:
      layer_cls = nn.remat(layer_cls, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      layers = nn.scan(
        layer_cls,
        variable_axes={'params': 0},
        split_rngs={'params': True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.num_layers,
      )(cfg, name='layers')
      h, kv = layers(h, kv, rope, mask, end)
    else:
      for i in range(cfg.num_layers):
        layer_kv = None if kv is None else (kv[0][i], kv[1][i])
        h, layer_kv = layer_cls(cfg, name=f'layers_{i}')(h, layer_kv, rope, mask, end)
        if kv is not None:
          kv = (kv[0].at[i].set(layer_kv[0]), kv[1].at[i].set(layer_kv[1]))
    h = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name='norm')(h)
    if cfg.tie_word_embeddings:
      logits = embed.attend(h)
    else:
      logits = _dense(cfg, cfg.vocab_size, False, 'lm_head')(h)
    logits = logits.astype(jnp.float32)
    if cache is None:
      return logits[:, prompt:] if prompt else logits  # Drops prepended prompts.
    return logits, {'k': kv[0], 'v': kv[1], 'end': end + t}


def _check_prompt(
  h: Array,
  attention_mask: Array | None,
  ids_shape: tuple[int, ...],
  prompt: int,
  cache: Cache | None,
) -> None:
  """Raises unless the ``input_embeddings`` handler's result is usable."""
  b, t = ids_shape
  if h.ndim != 3 or h.shape[0] != b or prompt < 0:
    raise PeftError(
      f'The input_embeddings handler returned embeddings {tuple(h.shape)}; '
      f'expected (batch={b}, >= {t} positions, d).'
    )
  if prompt and cache is not None:
    raise PeftError(
      f'The input_embeddings handler prepended {prompt} positions, but a KV cache '
      'is used; prompt handlers work only without a cache (cache=None).'
    )
  mask_shape = None if attention_mask is None else tuple(jnp.shape(attention_mask))
  if cache is None and mask_shape not in (None, (b, t + prompt)):
    raise PeftError(
      f'attention_mask {mask_shape} does not match the embeddings '
      f'{tuple(h.shape)} (after any input_embeddings handler); expected '
      f'({b}, {t + prompt}).'
    )


def _layer_names(params: Params) -> list[str]:
  """``layers_{i}`` keys of ``params`` in layer order, checked contiguous."""
  names = sorted(
    (k for k in params if _LAYER_RE.fullmatch(k)), key=lambda k: int(k[7:])
  )
  if [int(n[7:]) for n in names] != list(range(len(names))):
    raise PeftError(f'Layer keys are not layers_0..layers_{len(names) - 1}: {names}.')
  return names


def stack_layers(params: Params) -> Params:
  """Unrolled ``layers_{i}`` subtrees -> one ``layers`` subtree (scan layout).

  Works on any tree keyed like the model's params (frozen weights, gradients,
  or sparse adapter trees whose layers all hold the same leaves).

  Args:
    params: a tree with top-level keys ``layers_0..layers_{L-1}``.

  Returns:
    The same tree with those keys replaced by ``layers``, each leaf stacked
    along a new leading axis of size ``L``.

  Raises:
    PeftError: if there are no ``layers_{i}`` keys, a ``layers`` key already
      exists, or the layers' structures differ.
  """
  names = _layer_names(params)
  if not names or 'layers' in params:
    raise PeftError(
      'stack_layers expects unrolled params with layers_0.. keys and no '
      f"'layers' key; got top-level keys {sorted(params)}."
    )
  subtrees = [params[n] for n in names]
  try:
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *subtrees)
  except ValueError as e:
    raise PeftError(
      f'Layers have different parameter trees: {e}'.splitlines()[0]
    ) from None
  out = {k: v for k, v in params.items() if k not in names}
  out['layers'] = stacked
  return out


def unstack_layers(params: Params) -> Params:
  """The ``layers`` subtree (scan layout) -> ``layers_{i}`` subtrees.

  Args:
    params: a tree with a top-level ``layers`` key whose leaves have a
      leading ``num_layers`` axis.

  Returns:
    The unrolled tree, the inverse of ``stack_layers``.

  Raises:
    PeftError: if there is no ``layers`` key or its leaves disagree on the
      number of layers.
  """
  if 'layers' not in params or _layer_names(params):
    raise PeftError(
      "unstack_layers expects scanned params with a 'layers' key and no "
      f'layers_{{i}} keys; got top-level keys {sorted(params)}.'
    )
  leaves = jax.tree.leaves(params['layers'])
  sizes = {np.shape(x)[0] for x in leaves}
  if len(sizes) != 1:
    raise PeftError(f"Leaves of 'layers' disagree on the layer count: {sorted(sizes)}.")
  (num_layers,) = sizes
  out = {k: v for k, v in params.items() if k != 'layers'}
  for i in range(num_layers):
    out[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], params['layers'])
  return out


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


# ----------------------------------------------------------------------------
# Hugging Face checkpoints.

_ATTN = ('q_proj', 'k_proj', 'v_proj', 'o_proj')
_MLP = ('gate_proj', 'up_proj', 'down_proj')
_IGNORED_RE = re.compile(r'layers\.\d+\.self_attn\.rotary_emb\.inv_freq')


def _hf_leaves(config: LlamaConfig) -> Iterator[tuple[str, str, bool]]:
  """Yields ``(torch name without 'model.', flax path, transpose)``."""
  yield 'embed_tokens.weight', 'embed_tokens/embedding', False
  for i in range(config.num_layers):
    t, f = f'layers.{i}', f'layers_{i}'
    for proj in _ATTN:
      yield f'{t}.self_attn.{proj}.weight', f'{f}/self_attn/{proj}/kernel', True
      bias = config.attention_out_bias if proj == 'o_proj' else config.attention_bias
      if bias:
        yield f'{t}.self_attn.{proj}.bias', f'{f}/self_attn/{proj}/bias', False
    for proj in _MLP:
      yield f'{t}.mlp.{proj}.weight', f'{f}/mlp/{proj}/kernel', True
    for norm in ('input_layernorm', 'post_attention_layernorm'):
      yield f'{t}.{norm}.weight', f'{f}/{norm}/scale', False
  yield 'norm.weight', 'norm/scale', False
  if not config.tie_word_embeddings:
    yield 'lm_head.weight', 'lm_head/kernel', True


def abstract_params(config: LlamaConfig) -> Params:
  """The ``params`` tree of ``LlamaForCausalLM(config)`` as shape structs."""
  return jax.eval_shape(
    LlamaForCausalLM(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
  )['params']


def check_shapes(params: Params, config: LlamaConfig) -> None:
  """Raises naming the first leaf whose shape differs from the model's.

  Args:
    params: a ``params`` tree (unrolled or scanned, matching
      ``config.scan_layers``).
    config: the model's hyper-parameters.

  Raises:
    PeftError: naming the leaf, both shapes (None: absent) and the cause.
  """
  check_param_shapes(params, abstract_params(config))


def convert_hf_weights(
  tensors: Mapping[str, np.ndarray], config: LlamaConfig
) -> Params:
  """Converts a PyTorch-named Llama state dict to the Linen param tree.

  Names may carry the ``model.`` prefix of ``LlamaForCausalLM`` or not
  (``LlamaModel``); ``rotary_emb.inv_freq`` buffers are ignored, and so is
  ``lm_head.weight`` when the embeddings are tied.

  Args:
    tensors: torch tensor name -> array; Linear weights are
      ``(d_out, d_in)``.
    config: the model's hyper-parameters.

  Returns:
    The ``params`` tree of ``LlamaForCausalLM(config)`` (kernels
    ``(d_in, d_out)``, ``config.param_dtype``; scanned when
    ``config.scan_layers``).

  Raises:
    PeftError: naming the missing or unexpected tensors, or the first
      parameter whose shape differs from the model's.
  """
  tensors = {name.removeprefix('model.'): w for name, w in tensors.items()}
  leaves = list(_hf_leaves(config))
  expected = {name for name, _, _ in leaves}
  missing = sorted(expected - tensors.keys())
  if missing:
    raise PeftError(
      f'Checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:4]}; it has '
      f'{len(tensors)} tensors, e.g. {sorted(tensors)[:4]}.'
    )
  ignored = {'lm_head.weight'} if config.tie_word_embeddings else set()
  unexpected = sorted(
    n for n in tensors.keys() - expected - ignored if not _IGNORED_RE.fullmatch(n)
  )
  if unexpected:
    raise PeftError(
      f'Checkpoint has {len(unexpected)} unexpected tensor(s), e.g. '
      f'{unexpected[:4]}, for the config given (check num_hidden_layers, '
      'attention_bias and tie_word_embeddings).'
    )
  flat = {}
  for torch_name, flax_path, transpose in leaves:
    w = np.asarray(tensors[torch_name]).astype(np.float32)
    w = w.T if transpose else w
    flat[tuple(flax_path.split('/'))] = jnp.asarray(w, config.param_dtype)
  params = traverse_util.unflatten_dict(flat)
  if config.scan_layers:
    params = stack_layers(params)
  check_shapes(params, config)
  return params


def load_hf(
  model_dir: str | os.PathLike, **runtime_options: Any
) -> tuple[LlamaConfig, Params]:
  """Loads a Hugging Face Llama/Mistral/Qwen2 checkpoint directory.

  Args:
    model_dir: a directory with ``config.json`` and ``model.safetensors`` or
      a sharded ``model.safetensors.index.json``.
    **runtime_options: any of ``RUNTIME_OPTIONS`` (``dtype``,
      ``param_dtype``, ``scan_layers``, ``remat``, ``attention_impl``).

  Returns:
    ``(config, params)``; apply as
    ``LlamaForCausalLM(config).apply({'params': params}, input_ids)``.

  Raises:
    PeftError: if config.json or the weights are absent, the config is
      unsupported, or the tensors do not match the config (the message names
      the tensors).
  """
  model_dir = pathlib.Path(model_dir)
  if not (model_dir / 'config.json').is_file():
    raise PeftError(f'No config.json in {str(model_dir)!r}; expected a HF model dir.')
  config = LlamaConfig.from_hf(
    transformers.AutoConfig.from_pretrained(model_dir), **runtime_options
  )
  tensors = read_safetensors(model_dir)
  try:
    params = convert_hf_weights(tensors, config)
  except PeftError as e:
    raise PeftError(f'{model_dir}: {e}') from None
  return config, params
