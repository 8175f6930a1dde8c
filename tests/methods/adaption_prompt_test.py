"""LLaMA-Adapter (``adaption_prompt``) on the tiny Llama, against HF's formula.

The independent reference: Flax method interception on the *plain* model (a
mechanism that knows nothing of hook points) reads each adapted layer's
``q_proj`` output, applies RoPE written from its formula in float64 NumPy,
and adds to that layer's ``o_proj`` output the branch of Hugging Face PEFT's
``AdaptedAttention.forward`` (``src/peft/tuners/adaption_prompt/layer.py``),
also in float64 NumPy from the frozen weights::

  K, V = k_proj(P), v_proj(P)              (l, kv_heads, d_h), no RoPE
  K, V = repeat_interleave(·, heads / kv_heads) over the heads
  S = g · softmax(q Kᵀ / √d_h)             over the l prompt positions
  out = o_proj(S V)                        with o_proj's bias, as HF

The adapted model, run through ``pj.adapted`` in every layout (and through
the KV cache), must give the reference's logits. A parity test against HF
PEFT itself runs where ``tests/fixtures/adaption_prompt_hf.npz`` has been
generated (``tests/fixtures/make_adaption_prompt_fixture.py``, on a machine
with torch, transformers and peft).
"""

import functools
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax._src import paths
from peft_jax.methods.adaption_prompt import AdaptionPromptParams
from peft_jax.models import llama
from tests import references
from tests.models import llama_hooks_test as tiny_llama

L = 3  # prompt length
SPEC = f'adaption_prompt(length={L})'
ALL = r'layers(_\d+)?/self_attn/adaption_prompt'
FIXTURE = pathlib.Path(__file__).parent.parent / 'fixtures' / 'adaption_prompt_hf.npz'
f64 = lambda x: np.asarray(x, np.float64)


def random_params(seed: int, d: int = tiny_llama.D) -> AdaptionPromptParams:
  """One layer's prompt ``N(0, 1)`` and a gate away from 0."""
  kp, kg = jax.random.split(jax.random.key(seed))
  return AdaptionPromptParams(
    jax.random.normal(kp, (L, d)), jax.random.uniform(kg, (), minval=0.5, maxval=1.5)
  )


def numpy_rope(x, positions, config: llama.LlamaConfig) -> np.ndarray:
  """HF's ``x·cos + rotate_half(x)·sin``, ``x: (b, t, h, d_h)``, in float64,
  with ``inv_freq[j] = θ^(-2j/d_h)`` and ``rotate_half([a, b]) = [-b, a]``."""
  hd = config.head_dim
  inv_freq = config.rope_theta ** (-np.arange(0, hd, 2) / hd)
  angles = f64(positions)[..., None] * inv_freq  # (t, d_h/2)
  angles = np.concatenate([angles, angles], axis=-1)[None, :, None, :]
  a, b = np.split(f64(x), 2, axis=-1)
  return f64(x) * np.cos(angles) + np.concatenate([-b, a], axis=-1) * np.sin(angles)


def hf_branch(q, p: AdaptionPromptParams, attn, config) -> np.ndarray:
  """HF's adapter output ``o_proj(g · softmax(q Kᵀ/√d_h) V)`` for one layer,
  ``q: (b, t, heads, d_h)`` after RoPE, ``attn`` its frozen ``self_attn``."""

  def linear(name, x):
    w = attn[name]
    return x @ f64(w['kernel']) + (f64(w['bias']) if 'bias' in w else 0.0)

  nh, nk, hd = config.num_heads, config.num_kv_heads, config.head_dim
  b, t = q.shape[:2]
  prompt, gate = f64(p.prompt), f64(p.gate)
  # (1, kv_heads, l, d_h), then repeat_interleave over the heads as HF.
  k = linear('k_proj', prompt).reshape(1, L, nk, hd).transpose(0, 2, 1, 3)
  v = linear('v_proj', prompt).reshape(1, L, nk, hd).transpose(0, 2, 1, 3)
  k, v = np.repeat(k, nh // nk, axis=1), np.repeat(v, nh // nk, axis=1)
  q = q.transpose(0, 2, 1, 3)  # (b, heads, t, d_h)
  scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
  scores = np.exp(scores - scores.max(-1, keepdims=True))
  scores = gate * scores / scores.sum(-1, keepdims=True)
  out = (scores @ v).transpose(0, 2, 1, 3).reshape(b, t, nh * hd)
  return linear('o_proj', out)


def reference_logits(model, frozen, ids, layers: dict[str, AdaptionPromptParams]):
  """The plain unrolled ``model`` with HF's branch added, by interception,
  to the ``o_proj`` output of each layer in ``layers``."""
  config, queries = model.config, {}
  b, t = ids.shape

  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    path = tuple(context.module.path)
    if context.method_name != '__call__' or len(path) != 3 or path[0] not in layers:
      return y
    if path[1:] == ('self_attn', 'q_proj'):
      q = f64(y).reshape(b, t, config.num_heads, config.head_dim)
      queries[path[0]] = numpy_rope(q, np.arange(t), config)
    elif path[1:] == ('self_attn', 'o_proj'):
      attn = frozen[path[0]]['self_attn']
      branch = hf_branch(queries[path[0]], layers[path[0]], attn, config)
      return jnp.asarray(f64(y) + branch, y.dtype)
    return y

  with nn.intercept_methods(interceptor):
    return model.apply({'params': frozen}, ids)


def laid_out(per_layer: list[AdaptionPromptParams], layout: str) -> dict:
  return paths.nest(
    tiny_llama.stack_entries(per_layer, layout, 'self_attn/adaption_prompt')
  )


def adapted_setup(layout, rule=ALL):
  model, frozen = tiny_llama.tiny(layout)
  tree = pj.by_rules([(rule, SPEC)])
  params, buffers = tree.init(
    jax.random.key(0), frozen, pj.hook_points(model, tiny_llama.ids())
  )
  return model, frozen, tree, params, buffers


def logits_fn(model):
  return lambda w, ids: model.apply({'params': w}, ids)


# ---------------------------------------------------------------------------
# The method itself.


def test_init_count_dtype_and_value_checks():
  adapter = pj.adaption_prompt(64, param_dtype='bfloat16')
  value = (
    jax.ShapeDtypeStruct((0, 96), jnp.float32),
    jax.ShapeDtypeStruct((), jnp.float32),
  )
  params, buffers = adapter.init(jax.random.key(0), value)
  assert isinstance(params, AdaptionPromptParams) and buffers is None
  assert params.prompt.shape == (64, 96) and params.gate.shape == ()
  assert params.prompt.dtype == params.gate.dtype == jnp.bfloat16
  assert float(params.gate) == 0.0  # zero-init gate
  prompt = f64(params.prompt.astype(jnp.float32))  # HF: torch.empty(...).normal_()
  assert abs(prompt.mean()) < 0.05 and abs(prompt.std() - 1) < 0.05
  assert adapter.num_params(value) == pj.count(params) == 64 * 96 + 1
  out = adapter.apply(
    (jnp.zeros((0, 96), jnp.bfloat16), jnp.zeros((), jnp.bfloat16)), params, None
  )
  assert [(x.shape, x.dtype) for x in out] == [
    ((64, 96), jnp.bfloat16),
    ((), jnp.bfloat16),
  ]
  hidden = jax.ShapeDtypeStruct((2, 5, 96), jnp.float32)
  with pytest.raises(
    pj.PeftError, match=r'acts at an adaption_prompt hook point.*got \(2, 5, 96\)'
  ):
    adapter.init(jax.random.key(0), hidden)
  with pytest.raises(pj.PeftError, match='length=0 must be > 0'):
    pj.adaption_prompt(0)
  assert not pj.by_rules([(ALL, SPEC)]).mergeable


def test_a_wrong_adapter_result_is_a_one_line_model_error():
  model, frozen = tiny_llama.tiny('unrolled')
  bad = pj.ActivationAdapter(
    init=lambda key, value: ((), None),
    apply=lambda value, params, buffers: (jnp.zeros((L, 7)), jnp.zeros(())),
  )
  tree = pj.by_rules([(ALL, bad)])
  params, buffers = tree.init(
    jax.random.key(0), frozen, pj.hook_points(model, tiny_llama.ids())
  )
  run = jax.jit(pj.adapted(tree, logits_fn(model)))  # Raised while tracing.
  with pytest.raises(
    pj.PeftError,
    match=r'returned prompt \(3, 7\) and gate \(\); expected prompt \(length, d=32\)',
  ):
    run(frozen, params, buffers, tiny_llama.ids())


# ---------------------------------------------------------------------------
# Against HF's formula.


@functools.cache
def both_layers_reference() -> tuple[list[AdaptionPromptParams], np.ndarray]:
  """``(per-layer parameters, the reference's logits with them)``: computed
  once (eagerly, by interception) for every layout's test."""
  per_layer = [random_params(1), random_params(2)]
  unrolled, frozen_unrolled = tiny_llama.tiny('unrolled')
  want = reference_logits(
    unrolled,
    frozen_unrolled,
    tiny_llama.ids(),
    {'layers_0': per_layer[0], 'layers_1': per_layer[1]},
  )
  return per_layer, want


@pytest.mark.parametrize('layout', sorted(tiny_llama.LAYOUTS))
def test_adapted_llama_equals_hf_branch_added_by_interception(layout):
  per_layer, want = both_layers_reference()
  unrolled, frozen_unrolled = tiny_llama.tiny('unrolled')
  ids = tiny_llama.ids()
  model, frozen, tree, params, buffers = adapted_setup(layout)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
    jnp.shape, laid_out(per_layer, layout)
  )
  for factored in (False, True):
    got = jax.jit(pj.adapted(tree, logits_fn(model), factored=factored))(
      frozen, laid_out(per_layer, layout), buffers, ids
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  plain = unrolled.apply({'params': frozen_unrolled}, ids)
  assert np.abs(np.asarray(want - plain)).max() > 1e-2


def test_a_top_layers_rule_adapts_only_those_layers():
  """HF's ``adapter_layers=1`` of 2: the rule names the top layer only."""
  top = random_params(3)
  model, frozen, tree, params, buffers = adapted_setup(
    'unrolled', 'layers_1/self_attn/adaption_prompt'
  )
  assert list(params) == ['layers_1']
  ids = tiny_llama.ids()
  got = pj.adapted(tree, logits_fn(model))(
    frozen, {'layers_1': {'self_attn': {'adaption_prompt': top}}}, buffers, ids
  )
  want = reference_logits(model, frozen, ids, {'layers_1': top})
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_the_branch_uses_the_lora_adapted_projections_as_hf_wraps_them():
  """LoRA on ``k_proj``/``v_proj``/``o_proj`` reaches the prompt's keys,
  values and output too (HF's branch calls the wrapped Linears): the
  reference runs on the LoRA-merged weights; factored == weight space."""
  model, frozen = tiny_llama.tiny('unrolled')
  lora = (r'layers_\d+/self_attn/(k|v|o)_proj/kernel', 'lora(rank=2, b_init="normal")')
  tree = pj.by_rules([lora, (ALL, SPEC)])
  ids = tiny_llama.ids()
  params, buffers = tree.init(jax.random.key(1), frozen, pj.hook_points(model, ids))
  per_layer = [random_params(14), random_params(15)]
  for i, p in enumerate(per_layer):
    params[f'layers_{i}']['self_attn']['adaption_prompt'] = p
  merged = tree.apply(frozen, params, buffers)
  layers = {'layers_0': per_layer[0], 'layers_1': per_layer[1]}
  want = reference_logits(model, merged, ids, layers)
  assert (
    np.abs(np.asarray(want - reference_logits(model, frozen, ids, layers))).max() > 1e-3
  )
  for factored in (False, True):
    got = jax.jit(pj.adapted(tree, logits_fn(model), factored=factored))(
      frozen, params, buffers, ids
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_o_proj_bias_is_added_once_more_as_hf_does():
  """HF runs the branch through ``o_proj`` with its bias, so with a bias the
  gate-0 model is not the base model; the reference does the same."""
  config = tiny_llama.CONFIG.replace(attention_bias=True, attention_out_bias=True)
  model = llama.LlamaForCausalLM(config)
  frozen = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params']
  frozen = references.perturb(frozen, 5, scale=0.1)  # biases away from 0
  tree = pj.by_rules([(ALL, SPEC)])
  ids = tiny_llama.ids()
  init, buffers = tree.init(jax.random.key(0), frozen, pj.hook_points(model, ids))
  run = pj.adapted(tree, logits_fn(model))
  for per_layer in (
    [init[f'layers_{i}']['self_attn']['adaption_prompt'] for i in (0, 1)],
    [random_params(6), random_params(7)],
  ):
    got = run(frozen, laid_out(per_layer, 'unrolled'), buffers, ids)
    want = reference_logits(
      model, frozen, ids, {'layers_0': per_layer[0], 'layers_1': per_layer[1]}
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  at_init = run(frozen, init, buffers, ids)
  assert np.abs(np.asarray(at_init - model.apply({'params': frozen}, ids))).max() > 1e-3


@pytest.mark.parametrize('layout', sorted(tiny_llama.LAYOUTS))
def test_identity_at_init(layout):
  model, frozen, tree, params, buffers = adapted_setup(layout)
  ids = tiny_llama.ids()
  got = pj.adapted(tree, logits_fn(model))(frozen, params, buffers, ids)
  plain = model.apply({'params': frozen}, ids)
  if layout == 'unrolled':  # Op by op: the gate-0 branch adds exact zeros.
    np.testing.assert_array_equal(got, plain)
  else:  # One traced program each: XLA may fuse the base path differently.
    np.testing.assert_allclose(got, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize('layout', ['unrolled', 'scan_remat'])
def test_gradients_reach_prompt_and_gate_and_the_prompt_waits_for_the_gate(layout):
  model, frozen, tree, params0, buffers = adapted_setup(layout)
  run = pj.adapted(tree, logits_fn(model))
  ids = tiny_llama.ids()
  loss = lambda p: jnp.mean(jax.nn.log_softmax(run(frozen, p, buffers, ids))[..., 0])
  grad = jax.jit(jax.grad(loss))
  per_layer = laid_out([random_params(8), random_params(9)], layout)
  for g in jax.tree.leaves(grad(per_layer)):
    assert np.all(np.isfinite(g)) and np.abs(g).min() > 0
  # Zero-init: at gate 0 only the gate learns; the prompt's gradient is 0.
  at_init = jax.tree.map(np.asarray, grad(params0))
  for p in jax.tree.leaves(
    at_init, is_leaf=lambda x: isinstance(x, AdaptionPromptParams)
  ):
    assert np.all(p.prompt == 0) and np.all(p.gate != 0)


# ---------------------------------------------------------------------------
# Generation with the KV cache.


@pytest.mark.parametrize('layout', ['unrolled', 'scan'])
def test_kv_cache_decoding_equals_the_full_forward(layout):
  """A 2-token prefill then one token a step, through the cache: the prompt
  keys are recomputed each step and the queries sit at the cache slots."""
  model, frozen, tree, _, buffers = adapted_setup(layout)
  params = laid_out([random_params(10), random_params(11)], layout)
  ids = tiny_llama.ids()
  full = pj.adapted(tree, logits_fn(model))(frozen, params, buffers, ids)
  step = jax.jit(
    pj.adapted(tree, lambda w, t, cache: model.apply({'params': w}, t, cache=cache))
  )
  cache = llama.init_cache(model.config, tiny_llama.B, tiny_llama.T)
  logits, cache = step(frozen, params, buffers, ids[:, :2], cache)
  np.testing.assert_allclose(logits, full[:, :2], rtol=1e-4, atol=1e-5)
  for t in range(2, tiny_llama.T):
    logits, cache = step(frozen, params, buffers, ids[:, t : t + 1], cache)
    np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-4, atol=1e-5)


def test_generate_is_greedy_decoding_of_the_adapted_model():
  """``llama.generate`` (the jitted prefill + while_loop) on the weights
  ``pj.adapted`` installs, scanned layers as the SmolLM2 experiment runs it."""
  model, frozen, tree, _, buffers = adapted_setup('scan')
  params = laid_out([random_params(12), random_params(13)], 'scan')
  prompt, new = tiny_llama.ids((tiny_llama.B, 3), seed=3), 4
  generate = lambda w, ids: llama.generate(model, w, ids, new)
  tokens = pj.adapted(tree, generate)(frozen, params, buffers, prompt)
  # The model is causal: one full pass over the prompt and the generated
  # tokens gives the logits after each prefix (one compile, not one a length).
  seq = np.concatenate([prompt, np.asarray(tokens, np.int32)], axis=1)
  out = jax.jit(pj.adapted(tree, logits_fn(model)))(frozen, params, buffers, seq)
  greedy = np.argmax(out[:, prompt.shape[1] - 1 : -1], axis=-1)
  np.testing.assert_array_equal(tokens, greedy)


# ---------------------------------------------------------------------------
# Parity with Hugging Face PEFT (where its fixture was generated).


def test_matches_hf_peft_adaption_prompt_fixture():
  if not FIXTURE.exists():
    pytest.skip(
      f'{FIXTURE.name} not generated: run '
      'tests/fixtures/make_adaption_prompt_fixture.py where torch, '
      'transformers and peft are installed'
    )
  with np.load(FIXTURE) as data:
    arrays = {k: data[k] for k in data.files}
  model, frozen = references.hf_llama(arrays)
  config = model.config
  layers = {}
  for name, value in arrays.items():
    match = re.search(r'layers\.(\d+)\.self_attn\.adaption_(prompt|gate)$', name)
    if match:
      layers.setdefault(int(match[1]), {})[match[2]] = value
  assert sorted(layers) == list(
    range(config.num_layers - len(layers), config.num_layers)
  )
  rule = f'layers_({"|".join(map(str, layers))})/self_attn/adaption_prompt'
  length = int(arrays['adapter_len'])
  tree = pj.by_rules([(rule, f'adaption_prompt(length={length})')])
  ids = arrays['input_ids'].astype(np.int32)
  _, buffers = tree.init(jax.random.key(0), frozen, pj.hook_points(model, ids))
  params = {
    f'layers_{i}': {
      'self_attn': {
        'adaption_prompt': AdaptionPromptParams(
          jnp.asarray(p['prompt'].reshape(length, config.hidden_size)),
          jnp.asarray(p['gate'].reshape(())),
        )
      }
    }
    for i, p in layers.items()
  }
  # Tolerance 1e-5 (+ 1e-5 relative): float32 round-off between torch and XLA
  # (measured ≲ 6e-6 on logits up to 6); one prompt entry moved by 1e-2
  # gives ≳ 1e-3.
  got = jax.jit(pj.adapted(tree, logits_fn(model)))(frozen, params, buffers, ids)
  np.testing.assert_allclose(got, arrays['logits'], rtol=1e-5, atol=1e-5)

  prefill = int(arrays['prefill'])
  step = jax.jit(
    pj.adapted(tree, lambda w, t, cache: model.apply({'params': w}, t, cache=cache))
  )
  cache = llama.init_cache(config, ids.shape[0], ids.shape[1])
  cached, cache = step(frozen, params, buffers, ids[:, :prefill], cache)
  steps = [cached]
  for t in range(prefill, ids.shape[1]):
    logits, cache = step(frozen, params, buffers, ids[:, t : t + 1], cache)
    steps.append(logits)
  np.testing.assert_allclose(
    np.concatenate(steps, axis=1), arrays['cached_logits'], rtol=1e-5, atol=1e-5
  )
