"""Hook points of the Llama decoder, and factored == weight space on it.

Prompt and prefix tuning are checked against an independent computation:
prompt vectors equal to the embeddings of some tokens must give the logits
of those tokens fed as a prefix of the input, and prefix keys/values captured
from a run over those tokens must give the same logits again.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax.models import llama

B, T, P = 2, 6, 3  # batch, tokens, prompt/prefix length
CONFIG = llama.LlamaConfig(
  vocab_size=53,
  hidden_size=32,
  intermediate_size=48,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  rope_theta=500.0,
)
D, FFN, KV, HD = 32, 48, 2, 8
LAYOUTS = {
  'unrolled': {},
  'scan': dict(scan_layers=True),
  'scan_remat': dict(scan_layers=True, remat=True),
}


@functools.cache
def tiny(layout='unrolled'):
  """(model, params) of a tiny random GQA Llama; one init for all layouts."""
  params = llama.LlamaForCausalLM(CONFIG).init(
    jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
  )['params']
  config = CONFIG.replace(**LAYOUTS[layout])
  if config.scan_layers:
    params = llama.stack_layers(params)
  return llama.LlamaForCausalLM(config), params


def ids(shape=(B, T), seed=0):
  return (
    np.random.default_rng(seed).integers(0, CONFIG.vocab_size, shape).astype(np.int32)
  )


def run(model, params, input_ids, handler=None, **kwargs):
  """``model.apply`` under ``handler`` (traced afresh each call)."""
  fn = lambda p, i: model.apply({'params': p}, i, **kwargs)
  if handler is None:
    return jax.jit(fn)(params, input_ids)
  with pj.hook_handler(handler):
    return jax.jit(fn)(params, input_ids)


def shapes(value):
  return jax.tree.map(
    lambda x: None if x is None else tuple(x.shape), value, is_leaf=lambda x: x is None
  )


# ---------------------------------------------------------------------------
# Points, names, shapes.


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_identity_handler_gives_identical_logits(layout):
  model, params = tiny(layout)
  mask = np.ones((B, T), np.int32)
  mask[1, -2:] = 0
  for kwargs in ({}, {'attention_mask': mask}):
    np.testing.assert_array_equal(
      run(model, params, ids(), lambda name, value: value, **kwargs),
      run(model, params, ids(), **kwargs),
    )


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_every_point_is_reached_with_its_documented_shapes(layout):
  model, params = tiny(layout)
  seen = {}

  def handler(name, value):
    seen.setdefault(name, shapes(value))
    return value

  with pj.hook_handler(handler):
    jax.eval_shape(
      lambda p: model.apply({'params': p}, ids(), attention_mask=np.ones((B, T))),
      params,
    )
  layers = ['layers'] if model.config.scan_layers else ['layers_0', 'layers_1']
  want = {'input_embeddings': ((B, T, D), (B, T))}
  for layer in layers:
    want[f'{layer}/self_attn/attention_kv'] = ((B, T, KV, HD), (B, T, KV, HD))
    want[f'{layer}/self_attn/attention_output'] = (B, T, D)
    want[f'{layer}/mlp/ffn_intermediate'] = (B, T, FFN)
    want[f'{layer}/mlp/ffn_output'] = (B, T, D)
  assert seen == want

  seen.clear()
  with pj.hook_handler(handler):
    jax.eval_shape(lambda p: model.apply({'params': p}, ids()), params)
  assert seen['input_embeddings'] == ((B, T, D), None)


# ---------------------------------------------------------------------------
# Prompt tuning at input_embeddings.


def prompt_handler(prompt):
  """Prepends ``prompt: (p, d)`` to every row (and ones to the mask)."""

  def handler(name, value):
    if name != 'input_embeddings':
      return value
    x, mask = value
    front = jnp.broadcast_to(prompt, (x.shape[0], *prompt.shape))
    if mask is not None:
      mask = jnp.concatenate([jnp.ones((x.shape[0], len(prompt)), mask.dtype), mask], 1)
    return jnp.concatenate([front, x], axis=1), mask

  return handler


@pytest.mark.parametrize('layout', ['unrolled', 'scan'])
def test_prompt_of_token_embeddings_equals_feeding_those_tokens(layout):
  model, params = tiny(layout)
  prefix = ids((P,), seed=5)
  prompt = params['embed_tokens']['embedding'][prefix]
  tokens = ids()
  full = np.concatenate([np.broadcast_to(prefix, (B, P)), tokens], axis=1)
  np.testing.assert_allclose(
    run(model, params, tokens, prompt_handler(prompt)),
    run(model, params, full)[:, P:],
    rtol=1e-5,
    atol=1e-5,
  )

  # Left padding with explicit positions: the prompt goes in front of the
  # pads, the given positions are shifted behind it.
  mask = np.ones((B, T), np.int32)
  mask[1, :2] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  full_mask = np.concatenate([np.ones((B, P), np.int32), mask], axis=1)
  full_positions = np.concatenate(
    [np.broadcast_to(np.arange(P), (B, P)), positions + P], axis=1
  )
  got = run(
    model,
    params,
    tokens,
    prompt_handler(prompt),
    attention_mask=mask,
    positions=positions,
  )
  want = run(model, params, full, attention_mask=full_mask, positions=full_positions)
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], want[:, P:][real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('layout', ['unrolled', 'scan_remat'])
def test_trainable_prompt_is_differentiable_and_changes_the_logits(layout):
  model, params = tiny(layout)
  prompt = jax.random.normal(jax.random.key(1), (P, D))

  def loss(prompt):
    with pj.hook_handler(prompt_handler(prompt)):
      logits = model.apply({'params': params}, ids())
    return jnp.mean(jax.nn.logsumexp(logits, -1)), logits

  (value, logits), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(prompt)
  assert logits.shape == (B, T, CONFIG.vocab_size)
  assert grad.shape == (P, D) and np.isfinite(value)
  assert np.all(np.isfinite(grad)) and np.abs(grad).min() > 0
  plain = run(model, params, ids())
  assert np.abs(logits - plain).max() > 1e-3


def test_length_changes_with_a_cache_or_bad_masks_raise():
  model, params = tiny()
  cache = llama.init_cache(CONFIG, B, T)
  prompt = jnp.zeros((P, D))
  with (
    pj.hook_handler(prompt_handler(prompt)),
    pytest.raises(pj.PeftError, match='prepended 3 positions, but a KV cache'),
  ):
    model.apply({'params': params}, ids(), cache=cache)

  bad_mask = lambda name, v: (v[0], v[1][:, 1:]) if name == 'input_embeddings' else v
  with (
    pj.hook_handler(bad_mask),
    pytest.raises(pj.PeftError, match=r'attention_mask \(2, 5\) does not match'),
  ):
    model.apply({'params': params}, ids(), attention_mask=np.ones((B, T)))

  with (
    pj.hook_handler(prefix_handler(zero_prefix(P))),
    pytest.raises(pj.PeftError, match='attention_kv handler prepended 3 positions'),
  ):
    model.apply({'params': params}, ids(), cache=cache)

  drop = lambda name, v: (v[0][:, 1:], v[1][:, 1:]) if 'attention_kv' in name else v
  with pj.hook_handler(drop), pytest.raises(pj.PeftError, match='expected equal'):
    model.apply({'params': params}, ids())

  # Handlers that keep the length work with a cache.
  logits, _ = run(model, params, ids(), lambda n, v: v, cache=cache)
  np.testing.assert_allclose(logits, run(model, params, ids()), atol=1e-5)


# ---------------------------------------------------------------------------
# Prefix tuning at attention_kv.


def zero_prefix(p):
  return lambda name: (jnp.zeros((p, KV, HD)), jnp.zeros((p, KV, HD)))


def prefix_handler(prefixes):
  """Prepends ``prefixes(name) = (k, v)``, each ``(p, kv_heads, hd)``."""

  def handler(name, value):
    if not name.endswith('attention_kv'):
      return value
    k, v = value
    pk, pv = (jnp.broadcast_to(x, (k.shape[0], *x.shape)) for x in prefixes(name))
    return jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1)

  return handler


@pytest.mark.parametrize('layout', ['unrolled', 'scan'])
def test_zero_length_prefix_equals_no_handler(layout):
  model, params = tiny(layout)
  mask = np.ones((B, T), np.int32)
  mask[0, -1] = 0
  np.testing.assert_array_equal(
    run(model, params, ids(), prefix_handler(zero_prefix(0)), attention_mask=mask),
    run(model, params, ids(), attention_mask=mask),
  )


def test_prefix_of_captured_keys_values_equals_feeding_those_tokens():
  model, params = tiny()
  prefix = ids((1, P), seed=7)
  captured = {}

  def capture(name, value):
    if name.endswith('attention_kv'):
      captured[name] = jax.tree.map(lambda x: x[0], value)  # (P, kv, hd)
    return value

  with pj.hook_handler(capture):
    model.apply({'params': params}, prefix)  # eager: keeps concrete values
  assert sorted(captured) == [f'layers_{i}/self_attn/attention_kv' for i in (0, 1)]

  tokens = ids()
  mask = np.ones((B, T), np.int32)
  mask[1, -2:] = 0  # right padding: masks tokens, never the prefix
  got = run(
    model,
    params,
    tokens,
    prefix_handler(captured.__getitem__),
    attention_mask=mask,
    positions=np.arange(P, P + T),  # the tokens sit behind the prefix
  )
  full = np.concatenate([np.repeat(prefix, B, axis=0), tokens], axis=1)
  full_mask = np.concatenate([np.ones((B, P), np.int32), mask], axis=1)
  want = run(model, params, full, attention_mask=full_mask)[:, P:]
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)

  def loss(kv):
    with pj.hook_handler(prefix_handler(lambda name: kv)):
      return jnp.sum(jnp.sin(model.apply({'params': params}, tokens)))

  kv = (jnp.ones((P, KV, HD)), jnp.ones((P, KV, HD)))
  grads = jax.grad(loss)(kv)
  assert all(np.abs(g).max() > 0 for g in grads)


# ---------------------------------------------------------------------------
# The factored path equals the weight-space path on the decoder.

SEVEN = r'(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel'
LORA = 'lora(rank=2, alpha=4, b_init="normal")'


@pytest.mark.parametrize(
  'layout, rules',
  [
    ('unrolled', [(f'layers_\\d+/{SEVEN}', LORA)]),
    ('scan', [(f'layers/{SEVEN}', f'stacked({LORA!r})')]),
    ('scan_remat', [(f'layers/{SEVEN}', f'stacked({LORA!r})')]),
  ],
)
def test_factored_equals_weight_space_outputs_and_gradients(layout, rules):
  model, frozen = tiny(layout)
  adapter = pj.by_rules(rules)
  theta = adapter.init(jax.random.key(3), frozen)
  tokens, mask = ids(), np.ones((B, T), np.int32)
  mask[1, -1] = 0
  fn = lambda p, x: model.apply({'params': p}, x, attention_mask=mask)
  loss = lambda logits: jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask)
  weight_space = lambda t: fn(adapter.apply(frozen, t), tokens)
  fast = lambda t: pj.factored(adapter, fn)(frozen, t, tokens)
  with warnings.catch_warnings():
    warnings.simplefilter('error', pj.FactoredFallbackWarning)
    logits = jax.jit(fast)(theta)
    fast_grad = jax.jit(jax.grad(lambda t: loss(fast(t))))(theta)
  np.testing.assert_allclose(logits, jax.jit(weight_space)(theta), rtol=1e-5, atol=1e-5)
  slow_grad = jax.jit(jax.grad(lambda t: loss(weight_space(t))))(theta)
  assert jax.tree.structure(fast_grad) == jax.tree.structure(slow_grad)
  assert len(jax.tree.leaves(fast_grad)) == 7 * 2 * (1 if 'scan' in layout else 2)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
    fast_grad,
    slow_grad,
  )
