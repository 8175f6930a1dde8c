"""Activation adapters on the Llama decoder, unrolled and under ``nn.scan``.

Each is checked against an independent computation: a prompt equal to the
embeddings of some tokens gives the logits of those tokens fed in front; a
prefix equal to keys/values captured from a run over some tokens gives the
logits of those tokens fed in front, layer by layer (so per-layer parameters
under ``nn.scan`` must be sliced right); Houlsby adapters equal a hand-written
formula added to the projections' outputs by Flax method interception.
"""

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax._src import paths
from peft_jax.methods.prompt_tuning import PromptParams
from peft_jax.models import llama
from tests import references

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
HOULSBY = 'houlsby(reduction_factor=4)'


@functools.cache
def unrolled_params():
  """The tiny Llama's random parameters, initialised once per process
  (jitted: one compile instead of an op-by-op forward pass)."""
  return jax.jit(llama.LlamaForCausalLM(CONFIG).init)(
    jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
  )['params']


@functools.cache
def tiny(layout='unrolled'):
  """(model, params) of a tiny random GQA Llama; one init for all layouts."""
  params = unrolled_params()
  config = CONFIG.replace(**LAYOUTS[layout])
  if config.scan_layers:
    params = llama.stack_layers(params)
  return llama.LlamaForCausalLM(config), params


def ids(shape=(B, T), seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, CONFIG.vocab_size, shape).astype(np.int32)


def logits(model, **kwargs):
  return lambda w, tokens: model.apply({'params': w}, tokens, **kwargs)


@functools.cache
def forward(model):
  """The plain model's logits as one jitted function per model: the tests'
  references share its compiled programs (one per input shapes)."""
  return jax.jit(
    lambda w, tokens, **kwargs: model.apply({'params': w}, tokens, **kwargs)
  )


def init(tree, frozen, hooks, seed: int, run: bool = True):
  """``tree.init(key(seed), frozen, hooks)``; with ``run=False`` only its
  shapes and dtypes (``jax.eval_shape``: traced, nothing computed)."""
  fn = lambda key: tree.init(key, frozen, hooks)
  return fn(jax.random.key(seed)) if run else jax.eval_shape(fn, jax.random.key(seed))


def layer_names(layout):
  return ['layers'] if LAYOUTS[layout] else ['layers_0', 'layers_1']


def stack_entries(per_layer: list, layout: str, point: str) -> dict:
  """Per-layer parameters as by_rules lays them out for ``layout``."""
  if not LAYOUTS[layout]:
    return {f'layers_{i}/{point}': p for i, p in enumerate(per_layer)}
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
  return {f'layers/{point}': stacked}


# ---------------------------------------------------------------------------
# Discovery.


@pytest.mark.parametrize('layout', ['unrolled', 'scan'])
def test_hook_points_names_shapes_and_layer_stacks(layout):
  model, _ = tiny(layout)
  hooks = pj.hook_points(model, ids(), attention_mask=np.ones((B, T)))
  stack = (2,) if LAYOUTS[layout] else ()
  want = {
    'input_embeddings': (((B, T, D), (B, T)), ()),
  }
  for layer in layer_names(layout):
    kv = ((B, T, KV, HD), (B, T, KV, HD), None, (B, T, D))  # AttentionKV
    want[f'{layer}/self_attn/attention_kv'] = (kv, stack)
    want[f'{layer}/self_attn/adaption_prompt'] = (((0, D), ()), stack)
    want[f'{layer}/self_attn/attention_output'] = ((B, T, D), stack)
    want[f'{layer}/self_attn/attention_block'] = (((B, T, D), (B, T, D)), stack)
    want[f'{layer}/mlp/ffn_intermediate'] = ((B, T, FFN), stack)
    want[f'{layer}/mlp/ffn_output'] = ((B, T, D), stack)
    want[f'{layer}/mlp/ffn_block'] = (((B, T, D), (B, T, D)), stack)
  got = {
    name: (jax.tree.map(lambda x: x.shape, point.value), point.stack)
    for name, point in hooks.items()
  }
  assert got == want


# ---------------------------------------------------------------------------
# Prompt tuning at input_embeddings.


def prompted(layout, prompt):
  model, frozen = tiny(layout)
  hooks = pj.hook_points(model, ids())
  tree = pj.by_rules([('input_embeddings', f'prompt_tuning(length={P})')])
  params, buffers = tree.init(jax.random.key(1), frozen, hooks)
  if prompt is not None:
    params = {'input_embeddings': PromptParams(prompt)}
  return model, frozen, tree, params, buffers


@pytest.mark.parametrize('layout', ['scan'])  # The point is before the layers.
def test_prompt_of_token_embeddings_equals_feeding_those_tokens(layout):
  prefix = ids((P,), seed=5)
  _, frozen = tiny(layout)
  prompt = frozen['embed_tokens']['embedding'][prefix]
  model, frozen, tree, params, buffers = prompted(layout, prompt)
  tokens = ids()
  full = np.concatenate([np.broadcast_to(prefix, (B, P)), tokens], axis=1)
  want = forward(model)(frozen, full)[:, P:]
  for factored in (False, True):
    got = jax.jit(pj.adapted(tree, logits(model), factored=factored))(
      frozen, params, buffers, tokens
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  # Left padding with explicit positions: the prompt goes in front of the
  # pads, the given positions are shifted behind it.
  mask = np.ones((B, T), np.int32)
  mask[1, :2] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  full_mask = np.concatenate([np.ones((B, P), np.int32), mask], axis=1)
  full_positions = np.concatenate(
    [np.broadcast_to(np.arange(P), (B, P)), positions + P], axis=1
  )
  fn = lambda w, t: model.apply(
    {'params': w}, t, attention_mask=mask, positions=positions
  )
  got = jax.jit(pj.adapted(tree, fn))(frozen, params, buffers, tokens)
  want = forward(model)(
    frozen, full, attention_mask=full_mask, positions=full_positions
  )
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], want[:, P:][real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('layout', ['scan_remat'])
def test_trainable_prompt_is_differentiable_and_changes_the_logits(layout):
  model, frozen, tree, params, buffers = prompted(layout, None)
  run = pj.adapted(tree, logits(model), factored=True)

  def loss(p):
    out = run(frozen, p, buffers, ids())
    return jnp.mean(jax.nn.logsumexp(out, -1)), out

  (value, out), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert out.shape == (B, T, CONFIG.vocab_size) and np.isfinite(value)
  g = grad['input_embeddings'].prompt
  assert g.shape == (P, D) and np.all(np.isfinite(g)) and np.abs(g).min() > 0
  assert np.abs(out - forward(model)(frozen, ids())).max() > 1e-3


def decode_step_by_step(step, frozen, params, buffers, tokens, cache, first=2):
  """Logits of a prefill of ``first`` tokens, then one token per call."""
  out, cache = step(frozen, params, buffers, tokens[:, :first], cache)
  outs = [out]
  for t in range(first, tokens.shape[1]):
    out, cache = step(frozen, params, buffers, tokens[:, t : t + 1], cache)
    outs.append(out)
  return np.concatenate(outs, axis=1), cache


@pytest.mark.parametrize('layout', ['unrolled', 'scan'])
def test_prompt_tuning_decodes_through_the_cache_as_the_full_pass(layout):
  """The prompt positions stand before the cache slots, recomputed at every
  call: a prefill of 2 tokens, then one token per step, gives the logits of
  the full pass without a cache, also with a padded cache slot masked out
  and with a prefix at every attention_kv (front keys: prefix, prompt)."""
  model, frozen = tiny(layout)
  tokens = ids()
  rules = [('input_embeddings', f'prompt_tuning(length={P})')]
  mask = np.ones((B, T), np.int32)
  mask[1, 1] = 0  # One padded slot in row 1, masked in both runs.
  for extra in ([], [('.*/attention_kv', 'prefix_tuning(length=2)')]):
    tree = pj.by_rules(rules + extra)
    hooks = pj.hook_points(model, tokens)
    params, buffers = tree.init(jax.random.key(5), frozen, hooks)
    params = references.perturb(params, 6, scale=1.0)
    run = lambda w, t, m: model.apply({'params': w}, t, attention_mask=m)
    full = jax.jit(pj.adapted(tree, run))(frozen, params, buffers, tokens, mask)
    plain = forward(model)(frozen, tokens, attention_mask=mask)
    assert np.abs(np.asarray(full - plain)).max() > 1e-3  # the prompt matters
    step = jax.jit(
      pj.adapted(
        tree,
        lambda w, t, cache: model.apply(
          {'params': w}, t, cache=cache, attention_mask=mask
        ),
      )
    )
    got, cache = decode_step_by_step(
      step, frozen, params, buffers, tokens, llama.init_cache(CONFIG, B, T)
    )
    np.testing.assert_allclose(got, full, rtol=1e-4, atol=1e-4)
    assert int(cache['end']) == T and cache['k'].shape[-3] == T  # tokens only


def test_generate_with_a_prompt_is_greedy_decoding_of_the_full_pass():
  model, frozen, tree, params, buffers = prompted('scan', None)
  prompt, new = ids((B, 3), seed=3), 4
  tokens = pj.adapted(tree, lambda w, t: llama.generate(model, w, t, new))(
    frozen, params, buffers, prompt
  )
  # The model is causal: one full pass over the prompt and the generated
  # tokens gives the logits after each prefix (one compile, not one a length).
  seq = np.concatenate([prompt, np.asarray(tokens, np.int32)], axis=1)
  out = jax.jit(pj.adapted(tree, logits(model)))(frozen, params, buffers, seq)
  greedy = np.argmax(out[:, prompt.shape[1] - 1 : -1], axis=-1)
  np.testing.assert_array_equal(tokens, greedy)


def test_a_mask_that_misses_the_cache_slots_is_a_clear_error():
  model, frozen, tree, params, buffers = prompted('unrolled', None)
  cache = llama.init_cache(CONFIG, B, T + 2)
  mask = np.ones((B, T), np.int32)  # over the tokens, not the T + 2 slots
  run = pj.adapted(tree, logits(model, cache=cache, attention_mask=mask))
  with pytest.raises(pj.PeftError, match=r'does not match the cache slots \(8\) and 3'):
    run(frozen, params, buffers, ids())


@pytest.mark.parametrize('layout', ['unrolled', 'scan'])
def test_prefix_tuning_decodes_through_the_cache_as_the_full_pass(layout):
  """The prefix stands before the cache slots at every step: a prefill of
  2 tokens, then one token per step, gives the full pass's logits."""
  model, frozen = tiny(layout)
  tokens = ids()
  tree = pj.by_rules([('.*/attention_kv', 'prefix_tuning(length=3, bottleneck=4)')])
  params, buffers = tree.init(jax.random.key(5), frozen, pj.hook_points(model, tokens))
  params = references.perturb(params, 6, scale=1.0)
  full = jax.jit(pj.adapted(tree, logits(model)))(frozen, params, buffers, tokens)
  plain = forward(model)(frozen, tokens)
  assert np.abs(np.asarray(full - plain)).max() > 1e-3  # the prefix matters
  step = jax.jit(
    pj.adapted(tree, lambda w, t, cache: model.apply({'params': w}, t, cache=cache))
  )
  cache = llama.init_cache(CONFIG, B, T)
  out, cache = step(frozen, params, buffers, tokens[:, :2], cache)
  np.testing.assert_allclose(out, full[:, :2], rtol=1e-4, atol=1e-4)
  for t in range(2, T):
    out, cache = step(frozen, params, buffers, tokens[:, t : t + 1], cache)
    np.testing.assert_allclose(out[:, 0], full[:, t], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# Prefix tuning at attention_kv (a hand-built activation adapter: the method
# itself belongs to the additive family).


class PrefixParams(NamedTuple):
  keys: jax.Array  # (p, kv_heads, hd)
  values: jax.Array


def prefix_adapter(length=P):
  def init(key, value):
    shape = (length, *value.keys.shape[2:])
    return PrefixParams(jnp.zeros(shape), jnp.zeros(shape)), None

  def apply(value, params, buffers):
    del buffers
    k, v = value.keys, value.values
    front = lambda p: jnp.broadcast_to(p, (k.shape[0], *p.shape)).astype(k.dtype)
    return value._replace(
      keys=jnp.concatenate([front(params.keys), k], axis=1),
      values=jnp.concatenate([front(params.values), v], axis=1),
    )

  return pj.ActivationAdapter(init=init, apply=apply)


class LayerIndex(NamedTuple):
  index: jax.Array


@functools.cache
def captured_prefix() -> tuple[np.ndarray, list[PrefixParams]]:
  """``(prefix, its keys and values per layer)``, captured once per process
  (both layouts' tests use the same prefix)."""
  prefix = ids((1, P), seed=7)
  return prefix, captured_keys_values(prefix)


def captured_keys_values(tokens) -> list[PrefixParams]:
  """The keys and values every layer computes for ``tokens: (1, p)``, read
  eagerly by an identity adapter whose buffers name its layer."""
  model, frozen = tiny('unrolled')
  seen = {}

  def apply(value, params, buffers):
    seen[int(buffers.index)] = PrefixParams(value.keys[0], value.values[0])
    return value

  recorder = pj.ActivationAdapter(init=lambda key, value: ((), None), apply=apply)
  tree = pj.by_rules([('.*attention_kv', recorder)])
  hooks = pj.hook_points(model, tokens)
  params, _ = tree.init(jax.random.key(0), frozen, hooks)
  buffers = paths.nest(
    {f'layers_{i}/self_attn/attention_kv': LayerIndex(jnp.array(i)) for i in (0, 1)}
  )
  pj.adapted(tree, logits(model))(frozen, params, buffers, tokens)
  return [seen[0], seen[1]]


# scan_remat covers scan's per-layer slicing, inside remat as well.
@pytest.mark.parametrize('layout', ['unrolled', 'scan_remat'])
def test_prefix_of_captured_keys_values_equals_feeding_those_tokens(layout):
  prefix, per_layer = captured_prefix()
  assert not np.allclose(per_layer[0].keys, per_layer[1].keys)
  model, frozen = tiny(layout)
  tree = pj.by_rules([('.*attention_kv', prefix_adapter())])
  hooks = pj.hook_points(model, ids())
  params, buffers = tree.init(jax.random.key(0), frozen, hooks)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
    jnp.shape, paths.nest(stack_entries(per_layer, layout, 'self_attn/attention_kv'))
  )
  params = paths.nest(stack_entries(per_layer, layout, 'self_attn/attention_kv'))

  tokens = ids()
  mask = np.ones((B, T), np.int32)
  mask[1, -2:] = 0  # right padding: masks tokens, never the prefix
  # The tokens' positions count on after the prefix's (as after a cache).
  fn = lambda w, t: model.apply({'params': w}, t, attention_mask=mask)
  full = np.concatenate([np.repeat(prefix, B, axis=0), tokens], axis=1)
  full_mask = np.concatenate([np.ones((B, P), np.int32), mask], axis=1)
  want = forward(model)(frozen, full, attention_mask=full_mask)[:, P:]
  real = mask.astype(bool)
  # The weight-space path's logits come with its gradient (one program).
  got, grads = references.outputs_and_grad(
    lambda p: pj.adapted(tree, fn)(frozen, p, buffers, tokens)
  )(params)
  np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)
  got = jax.jit(pj.adapted(tree, fn, factored=True))(frozen, params, buffers, tokens)
  np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))


# ---------------------------------------------------------------------------
# Houlsby adapters at attention_output and ffn_output.


def random_houlsby(seed):
  adapter = pj.get(HOULSBY)
  value = jax.ShapeDtypeStruct((1, D), jnp.float32)
  params, _ = adapter.init(jax.random.key(seed), value)
  return references.perturb(params, seed + 100, scale=0.2)


@functools.cache
def houlsby_intercepted() -> tuple[dict, np.ndarray]:
  """``(Houlsby parameters per point and layer, the unrolled model's logits
  with them added by interception)``: computed once, eagerly, for both
  layouts' tests."""
  sites = {
    'self_attn/attention_output': 'self_attn/o_proj',
    'mlp/ffn_output': 'mlp/down_proj',
  }
  per_site = {
    point: [random_houlsby(10 * i + j) for i in range(2)]
    for j, point in enumerate(sites)
  }
  model_unrolled, frozen_unrolled = tiny('unrolled')
  dense_adapters = {
    ('layers_' + str(i), *dense.split('/')): per_site[point][i]
    for point, dense in sites.items()
    for i in range(2)
  }
  with references.intercepting_houlsby(dense_adapters):
    want = model_unrolled.apply({'params': frozen_unrolled}, ids())
  return per_site, want


@pytest.mark.parametrize('layout', ['unrolled', 'scan_remat'])
def test_houlsby_adapters_equal_a_hand_written_interception(layout):
  per_site, want = houlsby_intercepted()
  model, frozen = tiny(layout)
  hooks = pj.hook_points(model, ids())
  tree = pj.by_rules([('.*(attention_output|ffn_output)', HOULSBY)])
  params, buffers = tree.init(jax.random.key(0), frozen, hooks)
  entries = {}
  for point, layers in per_site.items():
    entries.update(stack_entries(layers, layout, point))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, paths.nest(entries))
  params = paths.nest(entries)
  for factored in (False, True):
    got = jax.jit(pj.adapted(tree, logits(model), factored=factored))(
      frozen, params, buffers, ids()
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# Weight-space and activation adapters together: factored == weight space.

SEVEN = r'(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel'
LORA = 'lora(rank=2, alpha=4, b_init="normal")'


@pytest.mark.parametrize(
  'layout, lora_rule',
  [
    ('unrolled', (f'layers_\\d+/{SEVEN}', LORA)),
    ('scan_remat', (f'layers/{SEVEN}', f'stacked({LORA!r})')),
  ],
)
def test_factored_equals_weight_space_outputs_and_gradients(layout, lora_rule):
  model, frozen = tiny(layout)
  rules = [
    lora_rule,
    ('input_embeddings', f'prompt_tuning(length={P})'),
    ('.*mlp/ffn_output', HOULSBY),
  ]
  hooks = pj.hook_points(model, ids())
  tree = pj.by_rules(rules)
  params, buffers = tree.init(jax.random.key(3), frozen, hooks)
  tokens, mask = ids(), np.ones((B, T), np.int32)
  mask[1, -1] = 0
  fn = lambda w, x: model.apply({'params': w}, x, attention_mask=mask)
  loss = lambda out: jnp.sum(jax.nn.log_softmax(out)[..., 0] * mask)
  weight_space = lambda p: pj.adapted(tree, fn)(frozen, p, buffers, tokens)
  fast = lambda p: pj.adapted(tree, fn, factored=True)(frozen, p, buffers, tokens)
  with warnings.catch_warnings():
    warnings.simplefilter('error', pj.FactoredFallbackWarning)
    out, fast_grad = references.outputs_and_grad(fast, loss)(params)
  slow_out, slow_grad = references.outputs_and_grad(weight_space, loss)(params)
  np.testing.assert_allclose(out, slow_out, rtol=1e-5, atol=1e-5)
  assert jax.tree.structure(fast_grad) == jax.tree.structure(slow_grad)
  n_layers = 1 if LAYOUTS[layout] else 2
  assert len(jax.tree.leaves(fast_grad)) == 7 * 2 * n_layers + 1 + 4 * n_layers
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
    fast_grad,
    slow_grad,
  )
