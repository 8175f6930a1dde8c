"""Hook points and activation adapters end to end on BERT: discovery, prompt
tuning and Houlsby adapters against independent computations, jit safety."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_jax as pj
from peft_jax._src.bottleneck import BottleneckParams
from peft_jax.methods.prompt_tuning import PromptParams
from peft_jax.models import bert
from tests import references

CONFIG = references.TINY_BERT
B, T, P, D = 2, 5, 3, 16
HOULSBY = 'houlsby(reduction_factor=4)'
HOULSBY_RULE = ('.*/(attention_output|ffn_output)', HOULSBY)


def setup():
  return references.tiny_bert_classifier(B, T)


def logits_fn(model):
  return lambda w, ids, mask: model.apply({'params': w}, ids, mask)


def test_hook_points_are_discovered_with_their_shapes():
  model, _, ids, mask = setup()
  hooks = pj.hook_points(model, ids, mask)
  layer = 'bert/encoder/layer_1'
  assert hooks['bert/embeddings/input_embeddings'] == pj.HookPoint(
    (
      jax.ShapeDtypeStruct((B, T, D), jnp.float32),
      jax.ShapeDtypeStruct((B, T), ids.dtype),
    )
  )
  shapes = lambda name: jax.tree.map(lambda x: x.shape, hooks[name].value)
  assert shapes(f'{layer}/attention/attention_kv') == pj.AttentionKV(
    keys=(B, T, 2, 8), values=(B, T, 2, 8), mask_bias=(B, 1, 1, T), inputs=(B, T, D)
  )
  assert shapes(f'{layer}/attention/attention_output') == (B, T, D)
  assert shapes(f'{layer}/ffn_intermediate') == (B, T, 32)
  assert shapes(f'{layer}/ffn_output') == (B, T, D)
  assert shapes(f'{layer}/attention/attention_block') == ((B, T, D), (B, T, D))
  assert shapes(f'{layer}/ffn_block') == ((B, T, D), (B, T, D))
  assert all(point.stack == () for point in hooks.values())
  assert len(hooks) == 1 + 2 * 6


def test_without_activation_adapters_hooks_change_nothing():
  model, frozen, ids, mask = setup()
  tree = pj.by_rules([('.*/query/kernel', 'lora(rank=2)')])
  params, buffers = tree.init(jax.random.key(0), frozen)
  np.testing.assert_array_equal(
    pj.adapted(tree, logits_fn(model))(frozen, params, buffers, ids, mask),
    model.apply({'params': frozen}, ids, mask),
  )


def test_prompt_of_token_embeddings_equals_feeding_those_tokens():
  model, frozen, ids, mask = setup()
  hooks = pj.hook_points(model, ids, mask)
  tree = pj.by_rules(
    [('bert/embeddings/input_embeddings', f'prompt_tuning(length={P})')]
  )
  params, buffers = tree.init(jax.random.key(2), frozen, hooks)
  prefix = np.array([7, 8, 9])
  table = frozen['bert']['embeddings']['word_embeddings']['embedding']
  params = {'bert': {'embeddings': {'input_embeddings': PromptParams(table[prefix])}}}
  # BERT adds position and type embeddings after the hook: positions 0..P-1
  # go to the prompt, as to real tokens fed in front; the encoder drops the
  # prompt positions from its output.
  encoder = bert.BertModel(CONFIG)
  hidden = lambda w, ids, mask: encoder.apply({'params': w['bert']}, ids, mask)
  full_ids = jnp.concatenate([jnp.broadcast_to(prefix, (B, P)), ids], axis=1)
  full_mask = jnp.concatenate([jnp.ones((B, P), mask.dtype), mask], axis=1)
  want = hidden(frozen, full_ids, full_mask)[:, P:]
  for factored in (False, True):
    got = pj.adapted(tree, hidden, factored=factored)(
      frozen, params, buffers, ids, mask
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_houlsby_adapters_equal_a_hand_written_interception():
  model, frozen, ids, mask = setup()
  hooks = pj.hook_points(model, ids, mask)
  tree = pj.by_rules([HOULSBY_RULE])
  params, buffers = tree.init(jax.random.key(3), frozen, hooks)
  assert buffers == {}
  params = references.perturb(params, 4)
  by_dense = {}
  for i in range(CONFIG.num_layers):
    layer = params['bert']['encoder'][f'layer_{i}']
    prefix = ('bert', 'encoder', f'layer_{i}')
    by_dense[(*prefix, 'attention', 'output')] = layer['attention']['attention_output']
    by_dense[(*prefix, 'output')] = layer['ffn_output']
  with references.intercepting_houlsby(by_dense):
    want = model.apply({'params': frozen}, ids, mask)
  for factored in (False, True):
    got = jax.jit(pj.adapted(tree, logits_fn(model), factored=factored))(
      frozen, params, buffers, ids, mask
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  d, r = D, D // 4
  assert pj.count(params) == 2 * CONFIG.num_layers * (2 * d * r + r + d)


def test_a_cached_jit_trace_cannot_drop_the_adapter():
  model, frozen, ids, mask = setup()
  hooks = pj.hook_points(model, ids, mask)
  jitted = jax.jit(logits_fn(model))
  plain = jitted(frozen, ids, mask)  # traced and cached without any adapter
  tree = pj.by_rules([HOULSBY_RULE])
  params, buffers = tree.init(jax.random.key(3), frozen, hooks)
  params = references.perturb(params, 5)
  eager = pj.adapted(tree, logits_fn(model))(frozen, params, buffers, ids, mask)
  cached = pj.adapted(tree, jitted)(frozen, params, buffers, ids, mask)
  np.testing.assert_allclose(cached, eager, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(cached - plain)).max() > 1e-3
  # And the other way round: the plain model afterwards is the plain model.
  np.testing.assert_array_equal(jitted(frozen, ids, mask), plain)


def test_activation_and_weight_adapters_share_one_tree_and_train():
  model, frozen, ids, mask = setup()
  hooks = pj.hook_points(model, ids, mask)
  rules = [
    ('bert/embeddings/input_embeddings', f'prompt_tuning(length={P})'),
    HOULSBY_RULE,
    ('.*/(query|value)/kernel', 'lora(rank=2)'),
    ('classifier/.*', 'full()'),
  ]
  tree = pj.by_rules(rules)
  params, buffers = tree.init(jax.random.key(0), frozen, hooks)
  lines = []
  pj.describe(rules, frozen, hooks, print_fn=lines.append)
  assert f'trainable {pj.count(params):,} of' in lines[0]
  embeddings = params['bert']['embeddings']['input_embeddings']
  assert isinstance(embeddings, PromptParams) and embeddings.prompt.shape == (P, D)
  layer = params['bert']['encoder']['layer_0']
  assert isinstance(layer['ffn_output'], BottleneckParams)
  assert set(layer['attention']) == {'attention_output', 'query', 'value'}
  labels = jnp.array([0, 1])

  def loss_fn(weights, batch, rng):
    del rng
    out = model.apply({'params': weights}, batch['ids'], batch['mask'])
    return optax.softmax_cross_entropy_with_integer_labels(out, batch['y']).mean(), {}

  optimizer = optax.adam(3e-2)
  for factored in (False, True):
    # Donation frees the state's arrays: start each run from a copy.
    start = jax.tree.map(jnp.copy, (params, buffers))
    state = pj.TrainState.create(*start, optimizer, jax.random.key(1))
    step = jax.jit(
      pj.make_train_step(loss_fn, tree, optimizer, factored=factored),
      donate_argnums=0,
    )
    batch = {'ids': ids, 'mask': mask, 'y': labels}
    losses = []
    for _ in range(15):
      state, metrics = step(state, frozen, batch)
      losses.append(float(metrics['loss']))
    assert losses[-1] < 0.5 * losses[0], losses
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), state.params, params)
    assert all(jax.tree.leaves(moved))  # every parameter got updates


def test_parameters_for_a_point_the_rules_do_not_select_are_an_error():
  model, frozen, ids, mask = setup()
  hooks = pj.hook_points(model, ids, mask)
  tree = pj.by_rules([('.*ffn_output', HOULSBY)])
  params, buffers = tree.init(jax.random.key(0), frozen, hooks)
  other = pj.by_rules([('bert/encoder/layer_0/ffn_output', HOULSBY)])
  with pytest.raises(pj.PeftError, match='neither an adapted leaf'):
    pj.adapted(other, logits_fn(model))(frozen, params, buffers, ids, mask)


def test_hook_point_needs_the_calling_module():
  with pytest.raises(pj.PeftError, match='needs the calling Linen module'):
    pj.hook_point('encoder/layer_0', 'ffn_output', jnp.ones(3))


def test_activation_methods_reject_the_wrong_kind_of_point():
  model, frozen, ids, mask = setup()
  hooks = pj.hook_points(model, ids, mask)
  with pytest.raises(pj.PeftError, match='prompt_tuning acts at an input_embeddings'):
    pj.by_rules([('.*/ffn_output', 'prompt_tuning()')]).init(
      jax.random.key(0), frozen, hooks
    )
  with pytest.raises(pj.PeftError, match='houlsby acts on a \\(batch, seq, d\\)'):
    pj.by_rules([('.*input_embeddings', HOULSBY)]).init(
      jax.random.key(0), frozen, hooks
    )
