"""Prefix tuning, flat and through its shared MLP, against a float64 NumPy
BERT (tests/bert_reference.py) with the prefix written from the formula; the
shared copy's gradient against the chain rule through a hand-written MLP;
per-layer slicing under ``nn.scan`` on the Llama decoder."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax._src.gating import Gated
from peft_jax.methods.prefix_tuning import PrefixHead, PrefixMlp, PrefixParams
from tests import bert_reference, references
from tests.models import llama_hooks_test as tiny_llama

CONFIG = references.TINY_BERT
B, T, L, H, DH, HIDDEN = 2, 5, 3, 2, 8, 6
KV = '.*/attention_kv'


def setup():
  model, frozen, ids, mask = references.tiny_bert_encoder(B, T)
  hidden = lambda w, ids, mask: model.apply({'params': w}, ids, mask)
  return frozen, dict(encoder_hooks()), hidden, ids, mask


@functools.cache
def encoder_hooks():
  model, _, ids, mask = references.tiny_bert_encoder(B, T)
  return pj.hook_points(model, ids, mask)


def layer(params, i):
  return params['encoder'][f'layer_{i}']['attention']['attention_kv']


def f64(x):
  return np.asarray(x, np.float64)


def mlp_prefix_np(shared: PrefixMlp, head: PrefixHead):
  """``tanh(E W_1 + b_1) W_2 + b_2`` in float64, split keys | values."""
  f = lambda x: np.asarray(x, np.float64)
  hid = np.tanh(f(shared.embedding) @ f(shared.hidden) + f(shared.hidden_bias))
  out = hid @ f(head.out) + f(head.out_bias)
  width = out.shape[-1] // 2
  return (out[:, :width].reshape(L, H, DH), out[:, width:].reshape(L, H, DH))


@pytest.mark.parametrize('factored', [False, True])
def test_flat_prefix_equals_the_numpy_encoder(factored):
  frozen, hooks, hidden, ids, mask = setup()
  tree = pj.by_rules([(KV, f'prefix_tuning(length={L}, bottleneck=None)')])
  params, buffers = tree.init(jax.random.key(2), frozen, hooks)
  assert layer(params, 0).keys.shape == (L, H, DH) and '@shared' not in params
  assert pj.count(params) == CONFIG.num_layers * 2 * L * H * DH
  edits = bert_reference.Edits(prefix=lambda i: tuple(layer(params, i)))
  want = bert_reference.encoder(frozen, ids, mask, CONFIG, edits)
  got = jax.jit(pj.adapted(tree, hidden, factored=factored))(
    frozen, params, buffers, ids, mask
  )
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # The prefix matters: without it the output differs.
  plain = bert_reference.encoder(frozen, ids, mask, CONFIG)
  assert np.abs(plain - want).max() > 1e-2


def test_mlp_prefix_equals_the_formula_and_keeps_one_shared_copy():
  frozen, hooks, hidden, ids, mask = setup()
  spec = f'prefix_tuning(length={L}, bottleneck={HIDDEN})'
  tree = pj.by_rules([(KV, spec)])
  params, buffers = tree.init(jax.random.key(3), frozen, hooks)
  params = references.perturb(params, 4)
  shared = params['@shared']['prefix_tuning']
  assert isinstance(shared, PrefixMlp) and shared.embedding.shape == (L, H * DH)
  assert isinstance(layer(params, 1), PrefixHead)
  width = 2 * H * DH
  per_layer = width * (HIDDEN + 1)
  assert pj.count(params) == 2 * per_layer + L * H * DH + H * DH * HIDDEN + HIDDEN
  edits = bert_reference.Edits(prefix=lambda i: mlp_prefix_np(shared, layer(params, i)))
  want = bert_reference.encoder(frozen, ids, mask, CONFIG, edits)
  got = jax.jit(pj.adapted(tree, hidden))(frozen, params, buffers, ids, mask)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # The plan hands each layer its flat prefix: the MLP can be dropped.
  plan = tree.plan(frozen, params, buffers).hooks
  flat = plan['encoder/layer_1/attention/attention_kv'].params
  assert isinstance(flat, PrefixParams)
  np.testing.assert_allclose(
    np.reshape(flat.keys, (L, H, DH)),
    mlp_prefix_np(shared, layer(params, 1))[0],
    rtol=1e-5,
    atol=1e-5,
  )


def test_shared_gradient_is_the_chain_rule_through_every_layer():
  """The MLP's gradient equals the flat prefix's gradient pulled back
  through a hand-written MLP (sum over layers: one copy serves all). In
  float64: some of these gradients are ~1e-7, where float32 round-off of the
  two paths (1e-6) would decide the comparison."""
  frozen, hooks, hidden, ids, mask = setup()
  mlp = pj.by_rules([(KV, f'prefix_tuning(length={L}, bottleneck={HIDDEN})')])
  flat = pj.by_rules([(KV, f'prefix_tuning(length={L}, bottleneck=None)')])
  params, _ = mlp.init(jax.random.key(5), frozen, hooks)
  params = references.perturb(params, 6)
  with jax.enable_x64():
    float64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
    frozen, params = float64(frozen), float64(params)
    loss = lambda tree: (
      lambda p: jnp.sum(pj.adapted(tree, hidden)(frozen, p, None, ids, mask) ** 2)
    )

    def by_hand(shared, heads):
      hid = jnp.tanh(shared.embedding @ shared.hidden + shared.hidden_bias)
      out = [hid @ h.out + h.out_bias for h in heads]
      return [
        PrefixParams(*(x.reshape(L, H, DH) for x in jnp.split(o, 2, -1))) for o in out
      ]

    heads = [layer(params, i) for i in range(CONFIG.num_layers)]
    prefixes, pullback = jax.vjp(by_hand, params['@shared']['prefix_tuning'], heads)
    flat_params = {
      'encoder': {
        f'layer_{i}': {'attention': {'attention_kv': p}} for i, p in enumerate(prefixes)
      }
    }
    flat_grads = jax.jit(jax.grad(loss(flat)))(flat_params)
    want_shared, want_heads = pullback(
      [layer(flat_grads, i) for i in range(CONFIG.num_layers)]
    )
    got = jax.jit(jax.grad(loss(mlp)))(params)
  pairs = list(
    zip(
      jax.tree.leaves(got['@shared']['prefix_tuning']),
      jax.tree.leaves(want_shared),
      strict=True,
    )
  )
  for i in range(CONFIG.num_layers):
    pairs += zip(
      jax.tree.leaves(layer(got, i)), jax.tree.leaves(want_heads[i]), strict=True
    )
  for g, w in pairs:
    assert g.dtype == np.float64
    np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
  'spec',
  [
    pytest.param('prefix_tuning(length=3)', marks=pytest.mark.slow),
    'prefix_tuning(length=3, bottleneck=None)',
  ],
)
def test_scanned_llama_slices_each_layer_and_shares_one_mlp(spec):
  """Under ``nn.scan`` the per-layer parameters carry the layer axis and the
  shared copy does not; the logits equal the unrolled model's with the same
  parameters layer by layer."""
  tokens = tiny_llama.ids()
  rules = [('.*/attention_kv', spec)]
  runs = {}
  for layout in ('unrolled', 'scan_remat'):
    model, frozen = tiny_llama.tiny(layout)
    hooks = pj.hook_points(model, tokens)
    tree = pj.by_rules(rules)
    # The scanned layout's init only shows its shapes: traced, not run.
    params, buffers = tiny_llama.init(tree, frozen, hooks, 7, run=layout == 'unrolled')
    runs[layout] = (tree, model, frozen, params, buffers)
  tree, model, frozen, params, _ = runs['unrolled']
  params = references.perturb(params, 8)
  per_layer = [params[f'layers_{i}']['self_attn']['attention_kv'] for i in range(2)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
  scan_params = {'layers': {'self_attn': {'attention_kv': stacked}}}
  if '@shared' in params:
    scan_params['@shared'] = params['@shared']
  s_tree, s_model, s_frozen, s_init, _ = runs['scan_remat']
  assert jax.tree.map(jnp.shape, s_init) == jax.tree.map(jnp.shape, scan_params)
  want = pj.adapted(tree, tiny_llama.logits(model))(frozen, params, None, tokens)
  scanned = jax.jit(pj.adapted(s_tree, tiny_llama.logits(s_model)))
  got = scanned(s_frozen, scan_params, None, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  swapped = jax.tree.map(lambda x: x[::-1], stacked)  # layer 1's prefix in layer 0
  other = scanned(
    s_frozen,
    {**scan_params, 'layers': {'self_attn': {'attention_kv': swapped}}},
    None,
    tokens,
  )
  assert np.abs(other - want).max() > 1e-3


def test_describe_lists_the_shared_copy_and_counts_it():
  frozen, hooks, *_ = setup()
  rules = [(KV, f'prefix_tuning(length={L}, bottleneck={HIDDEN})')]
  lines = []
  pj.describe(rules, frozen, hooks, print_fn=lines.append)
  table = lines[0]
  shared_count = L * H * DH + H * DH * HIDDEN + HIDDEN
  row = next(r for r in table.splitlines() if '@shared/prefix_tuning' in r)
  assert f'{shared_count:,}' in row
  params, _ = pj.by_rules(rules).init(jax.random.key(0), frozen, hooks)
  assert (
    f'{pj.count(params):,}' in table.splitlines()[-1]
    or f'{pj.count(params):,}' in table
  )


@pytest.mark.parametrize(
  ('change', 'match'),
  [
    (
      lambda p: {k: v for k, v in p.items() if k != '@shared'},
      "hold nothing at '@shared/prefix_tuning'",
    ),
    (
      lambda p: {**p, '@shared': {**p['@shared'], 'lora': jnp.ones(2)}},
      "hold '@shared/lora'",
    ),
  ],
)
def test_missing_or_foreign_shared_entries_are_one_line_errors(change, match):
  frozen, hooks, hidden, ids, mask = setup()
  tree = pj.by_rules([(KV, f'prefix_tuning(length={L}, bottleneck={HIDDEN})')])
  params, buffers = tree.init(jax.random.key(0), frozen, hooks)
  with pytest.raises(pj.PeftError, match=match) as error:
    pj.adapted(tree, hidden)(frozen, change(params), buffers, ids, mask)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize(
  ('rules', 'match'),
  [
    ([('.*/ffn_output', 'prefix_tuning()')], 'acts at an attention_kv hook point'),
    ([(KV, 'prefix_tuning(length=0)')], 'length=0 must be > 0'),
    ([(KV, 'prefix_tuning(bottleneck=0)')], 'bottleneck=0 must be > 0'),
    ([(KV, "prefix_tuning(bottleneck='x')")], "bottleneck='x' must be an int"),
  ],
)
def test_bad_specs_and_points_are_one_line_errors(rules, match):
  frozen, hooks, *_ = setup()
  with pytest.raises(pj.PeftError, match=match) as error:
    pj.by_rules(rules).init(jax.random.key(0), frozen, hooks)
  assert '\n' not in str(error.value)


def test_shared_points_must_agree_in_shape():
  """One MLP cannot serve points of different head sizes."""
  frozen, hooks, *_ = setup()
  name = 'encoder/layer_1/attention/attention_kv'
  value = hooks[name].value
  wider = jax.ShapeDtypeStruct((*value.keys.shape[:2], 4, 8), value.keys.dtype)
  hooks = {**hooks, name: pj.HookPoint(value._replace(keys=wider, values=wider))}
  with pytest.raises(pj.PeftError, match='must show the same shapes'):
    pj.by_rules([(KV, 'prefix_tuning(length=2, bottleneck=4)')]).init(
      jax.random.key(0), frozen, hooks
    )


def test_shared_copy_round_trips_through_the_adapter_file(tmp_path):
  frozen, hooks, hidden, ids, mask = setup()
  tree = pj.by_rules([(KV, f'prefix_tuning(length={L}, bottleneck={HIDDEN})')])
  params, buffers = tree.init(jax.random.key(9), frozen, hooks)
  params = references.perturb(params, 10)
  path = str(tmp_path / 'prefix.safetensors')
  pj.save_adapter(path, params, buffers, {'rules': 'prefix'})
  like = jax.eval_shape(lambda k: tree.init(k, frozen, hooks), jax.random.key(0))
  loaded, loaded_buffers, _ = pj.load_adapter(path, like)
  assert isinstance(loaded['@shared']['prefix_tuning'], PrefixMlp)
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(got, want)  # bit-exact
  run = jax.jit(pj.adapted(tree, hidden))
  np.testing.assert_array_equal(
    run(frozen, loaded, loaded_buffers, ids, mask),
    run(frozen, params, buffers, ids, mask),
  )


def sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


@pytest.mark.parametrize('bottleneck', [None, HIDDEN])
def test_gated_prefix_scales_each_example_by_its_gate(bottleneck):
  """UniPELT: ``P_k, P_v`` of example ``n`` times ``g_n = mean_s σ(x_n W_g +
  b_g)``, ``x`` the attention's input, in the float64 NumPy encoder."""
  frozen, hooks, hidden, ids, mask = setup()
  spec = f'prefix_tuning(length={L}, bottleneck={bottleneck}, gated=True)'
  tree = pj.by_rules([(KV, spec)])
  params, buffers = tree.init(jax.random.key(11), frozen, hooks)
  params = references.perturb(params, 12, scale=1.0)
  d = CONFIG.hidden_size
  own = layer(params, 0)
  assert isinstance(own, Gated) and own.gate.weight.shape == (d, 1)
  flat = tree.plan(frozen, params, buffers).hooks

  def prefix(i):
    entry = flat[f'encoder/layer_{i}/attention/attention_kv'].params
    gate = entry.gate
    if bottleneck is None:
      pk, pv = (f64(t) for t in layer(params, i).inner)
    else:
      pk, pv = mlp_prefix_np(params['@shared']['prefix_tuning'], layer(params, i).inner)

    def per_example(x):
      g = sigmoid(x @ f64(gate.weight) + f64(gate.bias)).mean(axis=1)  # (b, 1)
      scale = g[:, :, None, None]
      return scale * pk[None], scale * pv[None]

    return per_example

  want = bert_reference.encoder(frozen, ids, mask, CONFIG, bert_reference.Edits(prefix))
  got = jax.jit(pj.adapted(tree, hidden))(frozen, params, buffers, ids, mask)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  per_layer = 2 * L * H * DH if bottleneck is None else 2 * H * DH * (HIDDEN + 1)
  shared = 0 if bottleneck is None else L * H * DH + H * DH * HIDDEN + HIDDEN
  assert pj.count(params) == CONFIG.num_layers * (per_layer + d + 1) + shared


# ---------------------------------------------------------------------------
# Parity with Hugging Face PEFT: tests/fixtures/prefix_tuning_hf.npz, written
# by tests/fixtures/make_prefix_tuning_fixture.py with torch, transformers and
# peft on a tiny GQA Llama (their versions are in the file).
#
# The mapping from PEFT's ``prompt_encoder.default.*`` to our parameters.
# PEFT's prefix row ``(2·L·t,)``, ``t = kv_heads · d_h`` (PEFT's
# ``token_dim`` for grouped-query attention), is read as ``(2·L, kv_heads,
# d_h)``, entry ``2i`` layer i's keys and ``2i+1`` its values
# (``PeftModel.get_prompt``'s view and permute):
#
#   flat:  embedding.weight (l, 2·L·t)
#            -> layers_i: PrefixParams(keys=E[:, 2i], values=E[:, 2i+1])
#   mlp:   embedding.weight (l, t)            -> PrefixMlp.embedding
#          transform.0.weight (b, t), .bias   -> PrefixMlp.hidden = Wᵀ, hidden_bias
#          transform.2.weight (2·L·t, b), .bias
#            -> layers_i: PrefixHead(out = Wᵀ[:, 2i·t:(2i+2)·t],
#                                    out_bias = bias[2i·t:(2i+2)·t])
#
# Positions: PEFT hands the prefix to transformers as a ``past_key_values``
# cache of length l, so HF rotates the queries at RoPE positions
# ``l..l+s−1`` (the prefix keys are never rotated; token-token scores depend
# only on differences). Our Llama reads a prefix the same way (docs/
# methods.md), so the default positions reproduce HF; the flat test checks
# that shifting them by l once more does not.
#
# Tolerance 1e-5: float32 round-off between torch and XLA through 2 layers
# (measured ≲ 4e-6 on logits of order 1); one prefix entry moved by 1e-2
# gives ≳ 1e-3, a wrong layer, key/value order or position ≳ 1.

HF_KV = r'layers_\d+/self_attn/attention_kv'


def hf_prefix_setup():
  """``(arrays, model, frozen, ids, mask, l, (L, kv_heads, d_h))``."""
  arrays = references.hf_fixture('prefix_tuning')
  model, frozen = references.hf_llama(arrays, 'llama')
  config = model.config
  heads = (config.num_layers, config.num_kv_heads, config.head_dim)
  assert int(arrays['token_dim']) == heads[1] * heads[2]
  ids = arrays['input_ids'].astype(np.int32)
  mask = arrays['attention_mask'].astype(np.int32)
  return arrays, model, frozen, ids, mask, int(arrays['num_virtual_tokens']), heads


def hf_flat_prefix(rows, heads) -> dict:
  """Our per-layer ``PrefixParams`` from PEFT's ``(l, 2·L·t)`` prefix."""
  layers, kv_heads, head_dim = heads
  split = np.reshape(rows, (rows.shape[0], 2 * layers, kv_heads, head_dim))
  return {
    f'layers_{i}': {
      'self_attn': {
        'attention_kv': PrefixParams(
          jnp.asarray(split[:, 2 * i]), jnp.asarray(split[:, 2 * i + 1])
        )
      }
    }
    for i in range(layers)
  }


def hf_logits(model):
  """Our logits ``(w, ids, positions, mask)``, RoPE at ``positions``."""
  return lambda w, ids, positions, mask: model.apply(
    {'params': w}, ids, positions, attention_mask=mask
  )


def test_flat_prefix_matches_hf_peft():
  """PEFT's ``prefix_projection=False`` on a tiny GQA Llama (row 1 padded):
  our flat prefix from PEFT's embedding, split per layer as above, gives
  HF's logits at the default positions (the tokens after the prefix); with
  positions shifted by ``l`` once more they differ. PEFT's saved adapter
  (``prompt_embeddings``) is that embedding."""
  arrays, model, frozen, ids, mask, length, heads = hf_prefix_setup()
  rows = arrays['flat/prompt_encoder.default.embedding.weight']
  np.testing.assert_array_equal(arrays['flat/prompt_embeddings'], rows)
  tree = pj.by_rules([(HF_KV, f'prefix_tuning(length={length}, bottleneck=None)')])
  params = hf_flat_prefix(rows, heads)
  run = jax.jit(pj.adapted(tree, hf_logits(model)))
  positions = np.arange(ids.shape[1], dtype=np.int32)
  want = arrays['flat/logits']
  got = run(frozen, params, None, ids, positions, mask)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  shifted = run(frozen, params, None, ids, positions + length, mask)
  assert np.abs(shifted - want).max() > 1e-2


def test_mlp_prefix_matches_hf_peft_prefix_projection():
  """PEFT's ``prefix_projection=True``: our shared ``PrefixMlp`` and
  per-layer ``PrefixHead`` from PEFT's ``transform`` (weights transposed,
  the output layer sliced per layer) give HF's logits, and the flat prefix
  our plan derives equals PEFT's saved adapter ``prompt_embeddings``, the
  MLP's output that PEFT writes to ``adapter_model.safetensors``."""
  arrays, model, frozen, ids, mask, length, heads = hf_prefix_setup()
  state = {
    k.removeprefix('mlp/prompt_encoder.default.'): v
    for k, v in arrays.items()
    if k.startswith('mlp/prompt_encoder.default.')
  }
  hidden = state['transform.0.weight'].shape[0]
  width = 2 * heads[1] * heads[2]
  params = {
    '@shared': {
      'prefix_tuning': PrefixMlp(
        jnp.asarray(state['embedding.weight']),
        jnp.asarray(state['transform.0.weight'].T),
        jnp.asarray(state['transform.0.bias']),
      )
    },
    **{
      f'layers_{i}': {
        'self_attn': {
          'attention_kv': PrefixHead(
            jnp.asarray(state['transform.2.weight'].T[:, i * width : (i + 1) * width]),
            jnp.asarray(state['transform.2.bias'][i * width : (i + 1) * width]),
          )
        }
      }
      for i in range(heads[0])
    },
  }
  tree = pj.by_rules([(HF_KV, f'prefix_tuning(length={length}, bottleneck={hidden})')])
  positions = np.arange(ids.shape[1], dtype=np.int32)
  got = jax.jit(pj.adapted(tree, hf_logits(model)))(
    frozen, params, None, ids, positions, mask
  )
  np.testing.assert_allclose(got, arrays['mlp/logits'], rtol=1e-5, atol=1e-5)
  plan = tree.plan(frozen, params, None).hooks
  saved = hf_flat_prefix(arrays['mlp/prompt_embeddings'], heads)
  for i in range(heads[0]):
    derived = plan[f'layers_{i}/self_attn/attention_kv'].params
    want = saved[f'layers_{i}']['self_attn']['attention_kv']
    for got_part, want_part in zip(derived, want, strict=True):
      np.testing.assert_allclose(
        np.reshape(got_part, want_part.shape), want_part, rtol=1e-5, atol=1e-5
      )
