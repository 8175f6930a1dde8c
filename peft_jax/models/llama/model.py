"""The Llama decoder: config, RoPE and Linen modules (``LlamaForCausalLM``).

Parameter names, hook points and the supported checkpoints are listed in the
``peft_jax.models.llama`` package docstring.
"""

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src.base import PeftError
from peft_jax._src.hooks import AttentionKV, hook_point
from peft_jax.models import layers
from peft_jax.models.partitioning import constrain

Array = jax.Array
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
# Logical axes of the weights (``peft_jax.models.partitioning``); under
# ``scan_layers`` the leading layer axis is kept whole.
PARAM_AXES = (
  (r'embed_tokens/embedding', ('table', None)),
  (r'.*/q_proj/kernel', ('embed', 'heads')),
  (r'.*/q_proj/bias', ('heads',)),
  (r'.*/(k|v)_proj/kernel', ('embed', 'kv_heads')),
  (r'.*/(k|v)_proj/bias', ('kv_heads',)),
  (r'.*/o_proj/kernel', ('heads', 'embed')),
  (r'.*/(gate|up)_proj/kernel', ('embed', 'mlp')),
  (r'.*/down_proj/kernel', ('mlp', 'embed')),
  (r'lm_head/kernel', ('embed', 'vocab')),
)


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
    attention_impl: None for ``peft_jax.models.layers.attention`` (XLA ops,
      a backward that recomputes the probabilities), or the
      ``implementation`` of ``jax.nn.dot_product_attention`` to use instead:
      ``'xla'`` or ``'cudnn'``.
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
    check_runtime_options(runtime_options)
    model_type = getattr(hf_config, 'model_type', 'llama')
    _check_hf_support(hf_config, model_type)
    theta, rope_scaling = _hf_rope(hf_config)
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
      rope_theta=theta,
      rope_scaling=rope_scaling,
      attention_bias=qkv_bias,
      attention_out_bias=out_bias,
      tie_word_embeddings=bool(getattr(hf_config, 'tie_word_embeddings', False)),
      max_position_embeddings=hf_config.max_position_embeddings,
      **runtime_options,
    )


def check_runtime_options(options: Mapping[str, Any]) -> None:
  """Raises naming the first option that is not in ``RUNTIME_OPTIONS``."""
  for name in options:
    if name not in RUNTIME_OPTIONS:
      raise PeftError(
        f'Unknown runtime option {name!r}; expected one of {RUNTIME_OPTIONS}.'
      )


def _check_hf_support(hf_config: Any, model_type: str) -> None:
  """Raises naming the first option of ``hf_config`` this model lacks."""
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


def _hf_rope(hf_config: Any) -> tuple[float, dict[str, Any] | None]:
  """``(rope_theta, rope_scaling dict or None)`` of a transformers config."""
  rope = dict(getattr(hf_config, 'rope_parameters', None) or {})
  legacy_scaling = getattr(hf_config, 'rope_scaling', None)
  if not rope and legacy_scaling:
    rope = dict(legacy_scaling)
  theta = rope.pop('rope_theta', getattr(hf_config, 'rope_theta', 10000.0))
  partial = rope.pop('partial_rotary_factor', 1.0)
  if partial != 1.0:
    raise PeftError(
      f'Unsupported partial_rotary_factor={partial}; only full rotary embeddings.'
    )
  return float(theta), rope or None


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
  return layers.dense(
    features,
    name,
    use_bias=use_bias,
    dtype=cfg.dtype,
    param_dtype=cfg.param_dtype,
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

    Hook point ``attention_kv``: ``AttentionKV(k, v, None, x)``, ``k`` and
    ``v`` each ``(batch, seq, kv_heads, head_dim)``, keys after RoPE, before
    the cache update, and ``x`` the normalised input. An adapter may prepend
    ``l`` prefix keys/values that every query attends to. Prefix keys are
    read as a KV cache holds keys, rotated at positions ``0..l-1`` of a
    sequence the tokens continue: the tokens' positions count on from
    ``l`` (Li & Liang's prefix as past activations; transformers with
    ``past_key_values``, so Hugging Face PEFT's prefix tuning). RoPE being
    relative, this is applied as one rotation of the prefix keys by ``-l``
    (``_prefix_before_position_0``). With a cache the prefix keys are
    not cached but put before the cache slots at every step (the prefix is
    the same at every step), so ``generate`` works with prefix tuning. So
    are the keys of prompt positions (``mask`` columns before the cache
    slots; see ``LlamaForCausalLM``).
    Hook point ``adaption_prompt``: ``(prompt (0, d), gate ())``, zeros, a
    placeholder; an adapter returns ``(prompt (l, d), gate ())`` and, for
    ``l > 0``, ``adaption_branch`` of them is added to the ``o_proj``
    output (LLaMA-Adapter; with ``l = 0`` nothing is computed). Then
    ``attention_output``: the ``o_proj`` output (plus that branch) ``(batch,
    seq, d)``; and ``attention_block``: ``(x, that output)``, the output
    replaced by what the adapter returns (parallel adapters).
    """
    cfg = self.config
    b, t, _ = x.shape
    nh, nk, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    k_proj = _dense(cfg, nk * hd, cfg.attention_bias, 'k_proj')
    v_proj = _dense(cfg, nk * hd, cfg.attention_bias, 'v_proj')
    o_proj = _dense(cfg, cfg.hidden_size, cfg.attention_out_bias, 'o_proj')
    q = _dense(cfg, nh * hd, cfg.attention_bias, 'q_proj')(x).reshape(b, t, nh, hd)
    k = k_proj(x).reshape(b, t, nk, hd)
    v = v_proj(x).reshape(b, t, nk, hd)
    q = constrain(q, 'batch', None, 'heads', None)
    k, v = (constrain(a, 'batch', None, 'kv_heads', None) for a in (k, v))
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k, v, _, _ = hook_point(self, 'attention_kv', AttentionKV(k, v, None, x))
    prefix = _check_kv(k, v, (b, t, nk, hd))
    if prefix:
      k = _prefix_before_position_0(k, prefix, rope_inv_freq(cfg))
    if layer_cache is not None:
      # Prefix keys and prompt positions (mask columns before the cache
      # slots) are recomputed at every step and sit before the cache slots.
      front = prefix + _prompt_columns(mask, layer_cache)
      layer_cache = _write_cache(layer_cache, k[:, front:], v[:, front:], cache_end)
      cached = [c.astype(q.dtype) for c in layer_cache]
      if front:
        k, v = (
          jnp.concatenate([new[:, :front], c], 1)
          for new, c in zip((k, v), cached, strict=True)
        )
        mask = _visible_first(mask, prefix)
      else:
        k, v = cached
    elif prefix:
      mask = _prefix_mask(mask, t, prefix)
    if mask is not None and cfg.attention_impl == 'cudnn':
      mask = jnp.broadcast_to(mask, (b, 1, t, k.shape[1]))  # cuDNN: no broadcasting.
    is_causal = layer_cache is None and not prefix
    if cfg.attention_impl is None:
      y = layers.attention(q, k, v, mask, is_causal)
    else:
      y = jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=is_causal, implementation=cfg.attention_impl
      )
    y = o_proj(y.reshape(b, t, nh * hd))
    prompt, gate = hook_point(
      self,
      'adaption_prompt',
      (jnp.zeros((0, cfg.hidden_size), cfg.dtype), jnp.zeros((), cfg.dtype)),
    )
    if _adaption_length(prompt, gate, cfg.hidden_size):
      pk = k_proj(prompt).reshape(-1, nk, hd)
      pv = v_proj(prompt).reshape(-1, nk, hd)
      y = y + o_proj(adaption_branch(q, pk, pv, gate).reshape(b, t, nh * hd))
    y = hook_point(self, 'attention_output', y)
    _, y = hook_point(self, 'attention_block', (x, y))
    return y, layer_cache


def adaption_branch(q: Array, pk: Array, pv: Array, gate: Array) -> Array:
  """LLaMA-Adapter's attention of the queries to the adaption prompt.

  ``g · softmax(q pkᵀ / √d_h) pv`` per head: the prompt's keys and values
  ``pk, pv: (l, kv_heads, d_h)`` (its ``k_proj``/``v_proj`` outputs, no
  RoPE) repeated for grouped-query attention (query head ``n`` reads
  key/value head ``n // (heads / kv_heads)``), the softmax over the ``l``
  prompt positions alone, in float32 and cast back to ``q``'s dtype, then
  scaled by the gate ``g: ()`` (Hugging Face PEFT's ``AdaptedAttention``).

  Args:
    q: ``(b, t, heads, d_h)`` queries after RoPE.
    pk: ``(l, kv_heads, d_h)`` prompt keys.
    pv: ``(l, kv_heads, d_h)`` prompt values.
    gate: ``()``, the gate ``g``.

  Returns:
    ``(b, t, heads, d_h)``, before ``o_proj``.
  """
  groups = q.shape[2] // pk.shape[1]
  pk, pv = (jnp.repeat(p.astype(q.dtype), groups, axis=1) for p in (pk, pv))
  scores = jnp.einsum('bthd,lhd->bhtl', q, pk) / math.sqrt(q.shape[-1])
  weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
  return jnp.einsum('bhtl,lhd->bthd', gate.astype(q.dtype) * weights, pv)


def _adaption_length(prompt: Array, gate: Array, d: int) -> int:
  """``l``, the prompt length the ``adaption_prompt`` adapter returned.

  Raises unless ``prompt`` is ``(l, d)`` and ``gate`` a scalar.
  """
  if jnp.ndim(prompt) != 2 or jnp.shape(prompt)[1] != d or jnp.ndim(gate) != 0:
    raise PeftError(
      f'The adaption_prompt adapter returned prompt {jnp.shape(prompt)} and gate '
      f'{jnp.shape(gate)}; expected prompt (length, d={d}) and gate ().'
    )
  return jnp.shape(prompt)[0]


def _prefix_before_position_0(k: Array, prefix: int, inv_freq: np.ndarray) -> Array:
  """``k (b, l + s, h, d_h)`` with its first ``l = prefix`` keys rotated by
  ``-l`` positions: ``R(-l)·k_i`` for ``i < l``.

  For a query rotated at position ``p``, ``<R(p) q, R(-l) k_i> = <R(p + l)
  q, k_i>``: the tokens attend to the prefix as if they stood at positions
  ``l + p``, after ``l`` cached keys (the convention of a KV cache; what
  transformers does with a prefix given as ``past_key_values``).
  """
  cos, sin = rope_cos_sin(jnp.full((prefix,), -prefix), inv_freq)
  return jnp.concatenate([apply_rope(k[:, :prefix], cos, sin), k[:, prefix:]], axis=1)


def _check_kv(k: Array, v: Array, shape: tuple[int, int, int, int]) -> int:
  """The number of prefix keys the ``attention_kv`` adapter prepended.

  Raises unless ``k`` and ``v`` are ``(b, t + prefix, kv_heads, hd)`` for
  ``shape = (b, t, kv_heads, hd)`` and ``prefix >= 0``.
  """
  b, t, nk, hd = shape
  prefix = k.shape[1] - t
  if k.shape[:1] + k.shape[2:] != (b, nk, hd) or v.shape != k.shape or prefix < 0:
    raise PeftError(
      f'The attention_kv adapter returned k {tuple(k.shape)} and v '
      f'{tuple(v.shape)}; expected equal shapes (batch={b}, >= {t} positions, '
      f'kv_heads={nk}, head_dim={hd}).'
    )
  return prefix


def _prompt_columns(mask: Array | None, layer_cache: tuple[Array, Array]) -> int:
  """With a cache: the prompt positions, the mask's columns before the slots."""
  return 0 if mask is None else mask.shape[-1] - layer_cache[0].shape[1]


def _visible_first(mask: Array, prefix: int) -> Array:
  """``mask (..., keys)`` with ``prefix`` always-visible keys in front."""
  return jnp.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(prefix, 0)], constant_values=True)


def _prefix_mask(mask: Array | None, t: int, prefix: int) -> Array:
  """``(b or 1, 1, t, prefix + t)``: prefix keys seen by every query, tokens
  causal, and ``mask`` (over the tokens) kept."""
  causal = jnp.tril(jnp.ones((t, t), bool))
  keep = jnp.concatenate([jnp.ones((t, prefix), bool), causal], axis=1)
  if mask is not None:
    keep = _visible_first(mask, prefix) & keep
  return keep[None, None] if keep.ndim == 2 else keep


def _write_cache(
  layer_cache: tuple[Array, Array], k: Array, v: Array, end: Array
) -> tuple[Array, Array]:
  """The ``(k, v)`` cache with ``k``, ``v`` written at slots ``end..``."""
  start = (0, end, 0, 0)
  return tuple(
    jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), start)
    for cache, new in zip(layer_cache, (k, v), strict=True)
  )


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

    Hook points: ``ffn_intermediate`` ``silu(gate) · up`` ``(batch, seq,
    ffn)``, ``ffn_output`` the ``down_proj`` output ``(batch, seq, d)``, then
    ``ffn_block`` ``(x, that output)``, the output replaced by what the
    adapter returns (parallel adapters).
    """
    cfg = self.config
    gate = _dense(cfg, cfg.intermediate_size, False, 'gate_proj')(x)
    up = _dense(cfg, cfg.intermediate_size, False, 'up_proj')(x)
    gate, up = (constrain(a, 'batch', None, 'mlp') for a in (gate, up))
    h = hook_point(self, 'ffn_intermediate', layers.swiglu(gate, up))
    h = hook_point(
      self, 'ffn_output', _dense(cfg, cfg.hidden_size, False, 'down_proj')(h)
    )
    _, h = hook_point(self, 'ffn_block', (x, h))
    return h


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
    return constrain(h, 'batch', None, None), layer_cache


class _LlamaDecoder(nn.Module):
  """The embeddings and decoder layers that the task models share.

  Attributes:
    config: the model's hyper-parameters.
  """

  config: LlamaConfig

  def _decoder(
    self,
    input_ids: Array,
    positions: Array | None,
    attention_mask: Array | None,
    cache: Cache | None,
  ) -> tuple[nn.Embed, Array, Cache | None]:
    """The embeddings and layers: ``(embed, (batch, seq, d) residual stream
    at the tokens (prepended prompts dropped), updated cache or None)``."""
    cfg = self.config
    if input_ids.ndim != 2:
      raise PeftError(
        f'input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}.'
      )
    embed = nn.Embed(
      cfg.vocab_size,
      cfg.hidden_size,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      name='embed_tokens',
    )
    h, attention_mask = hook_point(
      self,
      'input_embeddings',
      (constrain(embed(input_ids), 'batch', None, None), attention_mask),
    )
    t = input_ids.shape[1]
    prompt = h.shape[1] - t
    _check_prompt(h, attention_mask, input_ids.shape, prompt, cache)
    positions, mask = _positions_and_mask(positions, attention_mask, t, prompt, cache)
    rope = rope_cos_sin(positions, rope_inv_freq(cfg))
    if cache is None:
      h, _ = self._layers(h, None, rope, mask, None)
      return embed, h[:, prompt:], None  # Drops prepended prompts.
    h, (k, v) = self._layers(h, (cache['k'], cache['v']), rope, mask, cache['end'])
    return embed, h[:, prompt:], {'k': k, 'v': v, 'end': cache['end'] + t}

  def _layers(
    self,
    h: Array,
    kv: tuple[Array, Array] | None,
    rope: tuple[Array, Array],
    mask: Array | None,
    end: Array | None,
  ) -> tuple[Array, tuple[Array, Array] | None]:
    """The decoder layers, unrolled or under ``nn.scan``, with ``nn.remat``.

    Args:
      h: ``(batch, seq, d)`` embeddings.
      kv: None, or the cache's ``(k, v)``, each ``(num_layers, batch,
        max_len, kv_heads, head_dim)``.
      rope: ``(cos, sin)`` tables.
      mask: see ``LlamaAttention``.
      end: with a cache, the slot of the first token.

    Returns:
      ``((batch, seq, d) residual stream, updated kv or None)``.
    """
    cfg = self.config
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
      return layers(h, kv, rope, mask, end)
    for i in range(cfg.num_layers):
      layer_kv = None if kv is None else (kv[0][i], kv[1][i])
      h, layer_kv = layer_cls(cfg, name=f'layers_{i}')(h, layer_kv, rope, mask, end)
      if kv is not None:
        kv = (kv[0].at[i].set(layer_kv[0]), kv[1].at[i].set(layer_kv[1]))
    return h, kv


class LlamaForCausalLM(_LlamaDecoder):
  """The decoder with its LM head; returns float32 next-token logits.

  Attributes:
    config: the model's hyper-parameters.
  """

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
    the cache slots with a cache). An adapter may prepend ``p`` positions
    (prompt tuning; see the package docstring), also with a cache: they are
    recomputed at every call and stand before the cache slots, which hold
    the tokens only. Their logits are dropped.

    Returns:
      ``(batch, seq, vocab)`` float32 logits; with a cache,
      ``(logits, updated cache)`` (``end`` advanced by ``seq``).

    Raises:
      PeftError: for ``input_ids`` that are not 2-D, or an activation adapter
        whose result has the wrong shape.
    """
    embed, h, cache = self._decoder(input_ids, positions, attention_mask, cache)
    logits = self._logits(embed, h)
    return logits if cache is None else (logits, cache)

  def _logits(self, embed: nn.Embed, h: Array) -> Array:
    """Final RMSNorm, then ``lm_head`` (or ``embed_tokensᵀ`` when tied)."""
    cfg = self.config
    h = _final_norm(cfg, h)
    if cfg.tie_word_embeddings:
      logits = embed.attend(h)
    else:
      logits = _dense(cfg, cfg.vocab_size, False, 'lm_head')(h)
    return constrain(logits, 'batch', None, 'vocab').astype(jnp.float32)


class LlamaForSequenceClassification(_LlamaDecoder):
  """The decoder with a linear ``score`` head on its last real token, as
  transformers' ``LlamaForSequenceClassification``.

  ``logits = norm(h)[last] W_score``, ``W_score: (d, num_labels)`` without
  bias; ``last`` is each row's rightmost position whose ``attention_mask``
  is 1 (the last position without a mask). transformers picks the
  rightmost token that is not ``pad_token_id``: the same token for padded
  batches whose real tokens are not the pad token. Parameters: those of
  ``LlamaForCausalLM`` with ``score`` instead of ``lm_head``.

  Attributes:
    config: the model's hyper-parameters.
    num_labels: number of output logits.
  """

  num_labels: int

  @nn.compact
  def __call__(
    self,
    input_ids: Array,
    positions: Array | None = None,
    attention_mask: Array | None = None,
  ) -> Array:
    """``(batch, num_labels)`` float32 logits (arguments as
    ``LlamaForCausalLM``, without a cache)."""
    cfg = self.config
    _, h, _ = self._decoder(input_ids, positions, attention_mask, None)
    h = _final_norm(cfg, h)
    b, t, _ = h.shape
    if attention_mask is None:
      last = jnp.full((b,), t - 1)
    else:
      real = jnp.asarray(attention_mask)[:, -t:] > 0  # the tokens' columns
      last = jnp.argmax(jnp.where(real, jnp.arange(t), -1), axis=-1)
    pooled = h[jnp.arange(b), last]
    return _dense(cfg, self.num_labels, False, 'score')(pooled).astype(jnp.float32)


def _final_norm(cfg: LlamaConfig, h: Array) -> Array:
  """The decoder's last RMSNorm (``norm``)."""
  return RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name='norm')(h)


def _check_prompt(
  h: Array,
  attention_mask: Array | None,
  ids_shape: tuple[int, ...],
  prompt: int,
  cache: Cache | None,
) -> None:
  """Raises unless the ``input_embeddings`` adapter's result is usable."""
  b, t = ids_shape
  if h.ndim != 3 or h.shape[0] != b or prompt < 0:
    raise PeftError(
      f'The input_embeddings adapter returned embeddings {tuple(h.shape)}; '
      f'expected (batch={b}, >= {t} positions, d).'
    )
  mask_shape = None if attention_mask is None else tuple(jnp.shape(attention_mask))
  keys = t if cache is None else cache['k'].shape[2]
  if mask_shape not in (None, (b, keys + prompt)):
    over = 'the embeddings' if cache is None else 'the cache slots'
    raise PeftError(
      f'attention_mask {mask_shape} does not match {over} ({keys}) and '
      f'{prompt} prompt positions (after any input_embeddings adapter); '
      f'expected ({b}, {keys + prompt}).'
    )


def _positions_and_mask(
  positions: Array | None,
  attention_mask: Array | None,
  t: int,
  prompt: int,
  cache: Cache | None,
) -> tuple[Array, Array | None]:
  """RoPE positions of the queries and the layers' boolean key mask.

  ``positions`` (default ``0..t-1``, with a cache the slots
  ``end..end+t-1``) shifted by ``prompt`` behind prompt positions
  ``0..prompt-1``. Without a cache the padding mask (causality is added by
  the attention); with one, a mask over ``prompt`` columns and the cache
  slots, causal (``_prompt_causal``) and and'ed with the padding mask.
  """
  mask = None
  if attention_mask is not None:
    mask = jnp.asarray(attention_mask)[:, None, None, :].astype(bool)
  if cache is None:
    return _prompt_positions(
      jnp.arange(t) if positions is None else positions, prompt
    ), mask
  query_slots = cache['end'] + jnp.arange(t)
  slots = jnp.arange(cache['k'].shape[2])
  causal = _prompt_causal(slots[None, :] <= query_slots[:, None], prompt)[None, None]
  mask = causal if mask is None else causal & mask
  return _prompt_positions(
    query_slots if positions is None else positions, prompt
  ), mask


def _prompt_causal(causal: Array, prompt: int) -> Array:
  """The ``(t, slots)`` causal mask with ``prompt`` positions in front of
  the queries and the keys: they see each other causally and no slot; the
  tokens see all of them."""
  if not prompt:
    return causal
  t, slots = causal.shape
  own = jnp.tril(jnp.ones((prompt, prompt), bool))
  return jnp.concatenate(
    [
      jnp.concatenate([own, jnp.zeros((prompt, slots), bool)], axis=1),
      jnp.concatenate([jnp.ones((t, prompt), bool), causal], axis=1),
    ]
  )


def _prompt_positions(positions: Array, prompt: int) -> Array:
  """``0..prompt-1`` then ``positions + prompt``."""
  if not prompt:
    return positions
  positions = jnp.asarray(positions)
  front = jnp.broadcast_to(
    jnp.arange(prompt, dtype=positions.dtype), (*positions.shape[:-1], prompt)
  )
  return jnp.concatenate([front, positions + prompt], axis=-1)
