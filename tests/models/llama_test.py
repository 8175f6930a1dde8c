"""Tests for peft_jax.models.llama on tiny random checkpoints.

The parity reference is an independent float64 numpy Llama written from the
Hugging Face formulas (RMSNorm, rotate_half RoPE with linear/llama3 scaling,
GQA by repeating KV heads, causal softmax, SwiGLU). It reads the
PyTorch-named tensors that the tests write into a Hugging Face directory,
so it checks ``load_hf`` as well as the forward pass.
"""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import traverse_util
from safetensors import numpy as safetensors_numpy

import peft_jax as pj
from peft_jax.models import checkpoints, llama
from tests.references import compiled_programs

BASE = dict(
  vocab_size=97,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=512,
  rms_norm_eps=1e-5,
)
LLAMA3_ROPE = {
  'rope_type': 'llama3',
  'rope_theta': 10000.0,
  'factor': 8.0,
  'low_freq_factor': 1.0,
  'high_freq_factor': 4.0,
  'original_max_position_embeddings': 64,
}
VARIANTS = {
  'llama': ('LlamaConfig', {}),
  'llama_bias_tied': (
    'LlamaConfig',
    dict(attention_bias=True, tie_word_embeddings=True),
  ),
  'llama3_rope': ('LlamaConfig', dict(rope_parameters=LLAMA3_ROPE)),
  'linear_rope': (
    'LlamaConfig',
    dict(rope_parameters={'rope_type': 'linear', 'rope_theta': 500.0, 'factor': 4.0}),
  ),
  'mha_head_dim': ('LlamaConfig', dict(num_key_value_heads=4, head_dim=8)),
  'qwen2': ('Qwen2Config', dict(tie_word_embeddings=True)),
  'mistral': ('MistralConfig', dict(sliding_window=None, num_key_value_heads=1)),
}


def hf_config(variant):
  cls_name, overrides = VARIANTS[variant]
  return getattr(transformers, cls_name)(**{**BASE, **overrides})


# ---------------------------------------------------------------------------
# Independent float64 numpy reference (PyTorch layout: y = x @ W.T + b).


def _head_dim(hf):
  return getattr(hf, 'head_dim', None) or hf.hidden_size // hf.num_attention_heads


def _np_inv_freq(hf):
  """transformers' default / linear / llama3 RoPE inverse frequencies."""
  rope = hf.rope_parameters
  dim = _head_dim(hf)
  inv_freq = 1.0 / rope['rope_theta'] ** (np.arange(0, dim, 2) / dim)
  rope_type = rope.get('rope_type', 'default')
  if rope_type == 'linear':
    return inv_freq / rope['factor']
  if rope_type == 'llama3':
    factor, low, high = (
      rope['factor'],
      rope['low_freq_factor'],
      rope['high_freq_factor'],
    )
    old = rope['original_max_position_embeddings']
    wavelen = 2 * math.pi / inv_freq
    out = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return np.where(medium, smoothed, out)
  return inv_freq


def _np_rms(x, weight, eps):
  return weight * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def _np_linear(x, w, prefix):
  y = x @ w[f'{prefix}.weight'].T
  return y + w[f'{prefix}.bias'] if f'{prefix}.bias' in w else y


def _np_rope(x, positions, inv_freq):
  """HF apply_rotary_pos_emb: x*cos + rotate_half(x)*sin; x (b, t, h, d)."""
  freqs = positions[..., None] * inv_freq  # (b, t, d/2)
  emb = np.concatenate([freqs, freqs], -1)[:, :, None, :]
  half = x.shape[-1] // 2
  rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
  return x * np.cos(emb) + rotated * np.sin(emb)


def np_llama(torch_weights, hf, input_ids, positions=None, attention_mask=None):
  """Logits ``(batch, seq, vocab)`` in float64."""
  w = {k.removeprefix('model.'): v.astype(np.float64) for k, v in torch_weights.items()}
  b, t = input_ids.shape
  nh, nk, hd = hf.num_attention_heads, hf.num_key_value_heads, _head_dim(hf)
  if positions is None:
    positions = np.broadcast_to(np.arange(t), (b, t))
  if attention_mask is None:
    attention_mask = np.ones((b, t))
  inv_freq = _np_inv_freq(hf)
  causal = np.tril(np.ones((t, t), bool))[None, None]
  keep = causal & (attention_mask[:, None, None, :] > 0)
  x = w['embed_tokens.weight'][input_ids]
  for i in range(hf.num_hidden_layers):
    p = f'layers.{i}'
    h = _np_rms(x, w[f'{p}.input_layernorm.weight'], hf.rms_norm_eps)
    q = _np_linear(h, w, f'{p}.self_attn.q_proj').reshape(b, t, nh, hd)
    k = _np_linear(h, w, f'{p}.self_attn.k_proj').reshape(b, t, nk, hd)
    v = _np_linear(h, w, f'{p}.self_attn.v_proj').reshape(b, t, nk, hd)
    q, k = _np_rope(q, positions, inv_freq), _np_rope(k, positions, inv_freq)
    k, v = np.repeat(k, nh // nk, axis=2), np.repeat(v, nh // nk, axis=2)  # repeat_kv
    scores = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(hd)
    scores = np.where(keep, scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = np.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, t, nh * hd)
    x = x + _np_linear(context, w, f'{p}.self_attn.o_proj')
    h = _np_rms(x, w[f'{p}.post_attention_layernorm.weight'], hf.rms_norm_eps)
    gate = _np_linear(h, w, f'{p}.mlp.gate_proj')
    up = _np_linear(h, w, f'{p}.mlp.up_proj')
    silu = gate / (1 + np.exp(-gate))
    x = x + _np_linear(silu * up, w, f'{p}.mlp.down_proj')
  x = _np_rms(x, w['norm.weight'], hf.rms_norm_eps)
  head = w['embed_tokens.weight'] if hf.tie_word_embeddings else w['lm_head.weight']
  return x @ head.T


def random_hf_weights(hf, seed=0):
  """Random PyTorch-named tensors of a Llama-family checkpoint."""
  rng = np.random.default_rng(seed)
  nh, nk, hd, d = (
    hf.num_attention_heads,
    hf.num_key_value_heads,
    _head_dim(hf),
    hf.hidden_size,
  )
  ffn = hf.intermediate_size
  normal = lambda *shape, std=0.15: (std * rng.standard_normal(shape)).astype(
    np.float32
  )
  w = {'model.embed_tokens.weight': normal(hf.vocab_size, d, std=1.0)}
  qkv_bias = hf.model_type == 'qwen2' or getattr(hf, 'attention_bias', False)
  out_bias = hf.model_type != 'qwen2' and getattr(hf, 'attention_bias', False)
  for i in range(hf.num_hidden_layers):
    p = f'model.layers.{i}'
    for name, rows in (('q_proj', nh * hd), ('k_proj', nk * hd), ('v_proj', nk * hd)):
      w[f'{p}.self_attn.{name}.weight'] = normal(rows, d)
      if qkv_bias:
        w[f'{p}.self_attn.{name}.bias'] = normal(rows, std=0.5)
    w[f'{p}.self_attn.o_proj.weight'] = normal(d, nh * hd)
    if out_bias:
      w[f'{p}.self_attn.o_proj.bias'] = normal(d, std=0.5)
    w[f'{p}.mlp.gate_proj.weight'] = normal(ffn, d)
    w[f'{p}.mlp.up_proj.weight'] = normal(ffn, d)
    w[f'{p}.mlp.down_proj.weight'] = normal(d, ffn)
    for norm in ('input_layernorm', 'post_attention_layernorm'):
      w[f'{p}.{norm}.weight'] = 1 + normal(d, std=0.2)
  w['model.norm.weight'] = 1 + normal(d, std=0.2)
  if not hf.tie_word_embeddings:
    w['lm_head.weight'] = normal(hf.vocab_size, d, std=0.3)
  return w


def write_checkpoint(directory, hf, weights):
  hf.save_pretrained(directory)
  safetensors_numpy.save_file(weights, str(directory / 'model.safetensors'))
  return directory


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """(hf_config, torch weights, config, unrolled params) of the 'llama' variant."""
  hf = hf_config('llama')
  weights = random_hf_weights(hf)
  directory = write_checkpoint(tmp_path_factory.mktemp('llama'), hf, weights)
  config, params = llama.load_hf(directory)
  return hf, weights, config, params


@functools.partial(jax.jit, static_argnums=0)
def apply(model, params, *args):
  """``model.apply`` jitted once per (model, shapes)."""
  return model.apply({'params': params}, *args)


def token_ids(shape, seed=0, vocab=BASE['vocab_size']):
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


# ---------------------------------------------------------------------------
# Parity with the numpy reference.


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_logits_match_numpy_reference(variant, tmp_path):
  hf = hf_config(variant)
  weights = random_hf_weights(hf, seed=len(variant))
  config, params = llama.load_hf(write_checkpoint(tmp_path, hf, weights))
  ids = token_ids((2, 9))
  # Large, distinct offsets so that RoPE scaling changes the logits a lot.
  positions = np.array([np.arange(9) + 300, np.arange(9) + 17])
  got = llama.LlamaForCausalLM(config).apply({'params': params}, ids, positions)
  want = np_llama(weights, hf, ids, positions)
  assert got.dtype == jnp.float32 and got.shape == (2, 9, hf.vocab_size)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  assert ('lm_head' in params) == (not hf.tie_word_embeddings)


def test_config_from_hf_variants():
  qwen = llama.LlamaConfig.from_hf(hf_config('qwen2'))
  assert (
    qwen.attention_bias and not qwen.attention_out_bias and qwen.tie_word_embeddings
  )
  biased = llama.LlamaConfig.from_hf(hf_config('llama_bias_tied'))
  assert biased.attention_bias and biased.attention_out_bias
  scaled = llama.LlamaConfig.from_hf(hf_config('llama3_rope'), scan_layers=True)
  assert scaled.rope_scaling_dict == {
    k: v for k, v in LLAMA3_ROPE.items() if k != 'rope_theta'
  }
  assert scaled.scan_layers and hash(scaled) == hash(scaled.replace())
  assert llama.LlamaConfig.from_hf(hf_config('mha_head_dim')).head_dim == 8


@pytest.mark.parametrize('variant', ['llama3_rope', 'linear_rope', 'llama'])
def test_rope_inv_freq_matches_hf_formula(variant):
  hf = hf_config(variant)
  got = llama.rope_inv_freq(llama.LlamaConfig.from_hf(hf))
  np.testing.assert_allclose(got, _np_inv_freq(hf), rtol=2e-6)


def test_bfloat16_compute_is_close(tiny):
  _, _, config, params = tiny
  ids = token_ids((1, 8))
  want = apply(llama.LlamaForCausalLM(config), params, ids)
  got = apply(llama.LlamaForCausalLM(config.replace(dtype=jnp.bfloat16)), params, ids)
  assert got.dtype == jnp.float32
  assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


# ---------------------------------------------------------------------------
# Layouts: scan_layers and remat.


@pytest.mark.slow
def test_scan_and_remat_match_unrolled_logits_and_gradients(tiny):
  _, _, config, params = tiny
  ids = token_ids((2, 6), seed=3)
  probe = jax.random.normal(jax.random.key(1), (2, 6, config.vocab_size))

  def loss_and_grad(cfg, p):
    model = llama.LlamaForCausalLM(cfg)
    loss = lambda p: jnp.sum(model.apply({'params': p}, ids) * probe)
    return jax.jit(jax.value_and_grad(loss))(p)

  want_loss, want_grad = loss_and_grad(config, params)
  stacked_grad = llama.stack_layers(want_grad)
  for scan, remat in ((True, False), (False, True), (True, True)):
    cfg = config.replace(scan_layers=scan, remat=remat)
    p = llama.stack_layers(params) if scan else params
    got_loss, got_grad = loss_and_grad(cfg, p)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
      got_grad,
      stacked_grad if scan else want_grad,
    )


def test_stack_unstack_layers_round_trip_and_names(tiny):
  _, _, config, params = tiny
  stacked = llama.stack_layers(params)
  scanned_init = llama.abstract_params(config.replace(scan_layers=True))
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(
    lambda x: x.shape, scanned_init
  )
  names = traverse_util.flatten_dict(stacked, sep='/')
  assert names['layers/self_attn/q_proj/kernel'].shape == (2, 64, 64)
  assert names['layers/self_attn/k_proj/kernel'].shape == (2, 64, 32)
  assert 'layers_0/self_attn/q_proj/kernel' in traverse_util.flatten_dict(
    params, sep='/'
  )
  back = llama.unstack_layers(stacked)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  with pytest.raises(pj.PeftError, match="'layers' key"):
    llama.unstack_layers(params)
  with pytest.raises(pj.PeftError, match='layers_0'):
    llama.stack_layers(stacked)


# ---------------------------------------------------------------------------
# KV cache and generation.


@pytest.mark.slow
def test_cached_chunks_match_full_forward(tiny):
  _, _, config, params = tiny
  ids = token_ids((2, 7), seed=4)
  for cfg in (config, config.replace(scan_layers=True)):
    model = llama.LlamaForCausalLM(cfg)
    p = llama.stack_layers(params) if cfg.scan_layers else params
    full = apply(model, p, ids)
    cache = llama.init_cache(cfg, 2, 10)
    first, cache = apply(model, p, ids[:, :4], None, None, cache)
    second, cache = apply(model, p, ids[:, 4:], None, None, cache)
    assert int(cache['end']) == 7
    np.testing.assert_allclose(np.concatenate([first, second], 1), full, atol=1e-5)


def greedy_by_recompute(model, params, prompt, steps):
  """Greedy tokens from full forward passes (no cache), one compile.

  The sequence is right-padded to its final length: causal attention makes
  the logits at the last real position independent of the padding.
  """
  b, p = prompt.shape
  seq = np.concatenate([prompt, np.zeros((b, steps), prompt.dtype)], axis=1)
  for i in range(steps):
    logits = np.asarray(apply(model, params, seq))
    seq[:, p + i] = np.argmax(logits[:, p + i - 1], axis=-1)
  return seq[:, p:]


@pytest.fixture(scope='module')
def greedy(tiny):
  """(model, prompt, greedy tokens from generate) on the tiny model."""
  _, _, config, params = tiny
  model = llama.LlamaForCausalLM(config)
  prompt = token_ids((2, 5), seed=5)
  return model, prompt, np.asarray(llama.generate(model, params, prompt, 8))


@pytest.mark.slow
def test_generate_greedy_matches_recompute_and_compiles_once(tiny, greedy):
  _, _, config, params = tiny
  model, prompt, got = greedy
  np.testing.assert_array_equal(got, greedy_by_recompute(model, params, prompt, 8))
  other = token_ids((2, 5), seed=6)
  llama.generation._generate.clear_cache()
  with compiled_programs() as first:
    llama.generate(model, params, prompt, 8)
  with compiled_programs() as second:
    again = llama.generate(model, params, other, 8)
  np.testing.assert_array_equal(again, greedy_by_recompute(model, params, other, 8))
  assert first.count('jit(_generate)') == 1, first
  assert 'jit(_generate)' not in second, second  # Same shapes: no recompile.
  scanned = llama.LlamaForCausalLM(config.replace(scan_layers=True))
  np.testing.assert_array_equal(
    llama.generate(scanned, llama.stack_layers(params), prompt, 8), got
  )


@pytest.mark.slow
def test_generate_eos_and_sampling(tiny, greedy):
  params = tiny[3]
  model, prompt, tokens = greedy
  eos = int(tokens[0, 2])
  stopped = np.asarray(llama.generate(model, params, prompt, 8, eos_id=eos))
  for row, want in zip(stopped, tokens, strict=True):
    first = list(want).index(eos) if eos in want else len(want)
    np.testing.assert_array_equal(row[: first + 1], want[: first + 1])
    assert (row[first:] == eos).all()
  key = jax.random.key(3)
  sample = llama.generate(model, params, prompt, 8, temperature=1.0, rng=key)
  again = llama.generate(model, params, prompt, 8, temperature=1.0, rng=key)
  assert sample.shape == (2, 8)
  np.testing.assert_array_equal(sample, again)
  with pytest.raises(pj.PeftError, match='rng'):
    llama.generate(model, params, prompt, 8, temperature=0.7)
  with pytest.raises(pj.PeftError, match='max_new_tokens'):
    llama.generate(model, params, prompt, 0)


# ---------------------------------------------------------------------------
# Padding.


def test_left_padding_with_mask_and_positions_matches_unpadded(tiny):
  hf, weights, config, params = tiny
  model = llama.LlamaForCausalLM(config)
  seq = token_ids((1, 5), seed=8)
  pad = 3
  ids = np.concatenate([np.zeros((1, pad), np.int32), seq], axis=1)
  mask = np.array([[0] * pad + [1] * 5])
  positions = np.array([[0] * pad + list(range(5))])
  got = apply(model, params, ids, positions, mask)[:, pad:]
  want = apply(model, params, seq)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(
    got, np_llama(weights, hf, ids, positions, mask)[:, pad:], atol=1e-4
  )
  unmasked = apply(model, params, ids, positions)[:, pad:]
  assert np.abs(unmasked - want).max() > 1e-3  # the mask matters


# ---------------------------------------------------------------------------
# Loading and errors.


def test_load_sharded_checkpoint_and_ignored_tensors(tiny, tmp_path):
  hf, weights, config, params = tiny
  hf.save_pretrained(tmp_path)
  names = sorted(weights)
  shards = {'model-00001-of-00002.safetensors': names[::2]}
  shards['model-00002-of-00002.safetensors'] = names[1::2]
  weight_map = {}
  for file, shard in shards.items():
    safetensors_numpy.save_file({n: weights[n] for n in shard}, str(tmp_path / file))
    weight_map.update(dict.fromkeys(shard, file))
  index = {'metadata': {}, 'weight_map': weight_map}
  (tmp_path / 'model.safetensors.index.json').write_text(json.dumps(index))
  got_config, got = llama.load_hf(tmp_path, scan_layers=True)
  assert got_config == config.replace(scan_layers=True)
  jax.tree.map(np.testing.assert_array_equal, got, llama.stack_layers(params))
  extra = dict(weights)
  extra['model.layers.0.self_attn.rotary_emb.inv_freq'] = np.ones(8, np.float32)
  jax.tree.map(
    np.testing.assert_array_equal,
    checkpoints.convert(extra, llama.hf_layout(config)),
    params,
  )


def test_missing_and_unexpected_tensors_are_named(tiny):
  _, weights, config, _ = tiny
  missing = {k: v for k, v in weights.items() if 'layers.1.mlp.up_proj' not in k}
  with pytest.raises(
    pj.PeftError, match=r'missing 1 .*layers\.1\.mlp\.up_proj\.weight'
  ):
    checkpoints.convert(missing, llama.hf_layout(config))
  extra = {**weights, 'model.layers.2.mlp.up_proj.weight': np.zeros((96, 64))}
  with pytest.raises(pj.PeftError, match=r'unexpected .*layers\.2\.mlp\.up_proj'):
    checkpoints.convert(extra, llama.hf_layout(config))
  wrong = {**weights, 'model.norm.weight': np.ones(63, np.float32)}
  with pytest.raises(pj.PeftError, match="'norm/scale' has shape"):
    checkpoints.convert(wrong, llama.hf_layout(config))


def test_unsupported_configs_raise_clear_errors(tmp_path):
  with pytest.raises(pj.PeftError, match='sliding-window'):
    llama.LlamaConfig.from_hf(transformers.MistralConfig(**BASE, sliding_window=16))
  qwen = transformers.Qwen2Config(**BASE, use_sliding_window=True, sliding_window=16)
  with pytest.raises(pj.PeftError, match='sliding-window'):
    llama.LlamaConfig.from_hf(qwen)
  dynamic = {'rope_type': 'dynamic', 'factor': 2.0, 'rope_theta': 1e4}
  with pytest.raises(pj.PeftError, match="rope_type='dynamic'"):
    llama.LlamaConfig.from_hf(transformers.LlamaConfig(**BASE, rope_parameters=dynamic))
  with pytest.raises(pj.PeftError, match="runtime option 'dtpye'"):
    llama.LlamaConfig.from_hf(hf_config('llama'), dtpye=jnp.bfloat16)
  with pytest.raises(pj.PeftError, match='num_kv_heads'):
    llama.LlamaConfig(97, 64, 96, 2, num_heads=4, num_kv_heads=3)
  hf_config('llama').save_pretrained(tmp_path)
  with pytest.raises(pj.PeftError, match=r'No model\.safetensors'):
    llama.load_hf(tmp_path)


# ---------------------------------------------------------------------------
# Library integration.


@pytest.mark.slow
def test_factored_lora_equals_weight_space(tiny):
  _, _, config, frozen = tiny
  model = llama.LlamaForCausalLM(config)
  tree = pj.by_rules([(r'.*self_attn/(q|v)_proj/kernel', 'lora(rank=2, alpha=4)')])
  params, buffers = tree.init(jax.random.key(0), frozen)
  params = jax.tree.map(lambda t: t + 0.1, params)  # nonzero b
  ids = token_ids((1, 6), seed=9)
  fn = lambda w, ids: model.apply({'params': w}, ids)
  fast = jax.jit(pj.adapted(tree, fn, factored=True))(frozen, params, buffers, ids)
  slow = jax.jit(lambda p, b: fn(tree.apply(frozen, p, b), ids))(params, buffers)
  np.testing.assert_allclose(fast, slow, atol=1e-5)
  assert np.abs(slow - apply(model, frozen, ids)).max() > 1e-3


def test_hook_points_are_named_per_layer(tiny):
  _, _, config, _ = tiny
  ids = token_ids((1, 3))
  points = pj.hook_points(llama.LlamaForCausalLM(config), ids)
  per_layer = (
    'self_attn/attention_kv',
    'self_attn/adaption_prompt',
    'self_attn/attention_output',
    'self_attn/attention_block',
    'mlp/ffn_intermediate',
    'mlp/ffn_output',
    'mlp/ffn_block',
  )
  assert list(points) == [
    'input_embeddings',
    *(f'layers_{i}/{p}' for i in range(2) for p in per_layer),
  ]
  scanned = pj.hook_points(
    llama.LlamaForCausalLM(config.replace(scan_layers=True)), ids
  )
  assert list(scanned) == ['input_embeddings', *(f'layers/{p}' for p in per_layer)]
  assert scanned['layers/mlp/ffn_output'].stack == (2,)


# ---------------------------------------------------------------------------
# Optional: parity with Hugging Face PyTorch (torch is not a dependency).


def test_matches_hf_pytorch_when_torch_is_installed():
  torch = pytest.importorskip('torch')
  if not hasattr(transformers, 'LlamaForCausalLM'):
    pytest.skip('transformers has no LlamaForCausalLM (no torch backend)')
  hf = hf_config('llama3_rope')
  torch.manual_seed(0)
  reference = transformers.LlamaForCausalLM(hf).eval()
  weights = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
  config = llama.LlamaConfig.from_hf(hf)
  params = checkpoints.convert(weights, llama.hf_layout(config))
  ids = token_ids((2, 9))
  with torch.no_grad():
    want = reference(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  got = llama.LlamaForCausalLM(config).apply({'params': params}, ids)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
