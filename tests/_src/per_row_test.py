"""pj.adapted_per_row: each row of a mixed batch equals that row run alone.

Expected values run each row by itself, plainly, on its own merged weights
(``pj.merge``; the frozen weights for id -1): never through the code under
test. Logits agree to float32 round-off (rtol 1e-5, atol 1e-5: the batched
and the single-row matmuls sum in different orders); generated tokens are
equal.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax.models import llama
from tests import references
from tests.models import llama_hooks_test as tiny_llama

N = 3  # adapters
IDS = np.array([2, -1, 0, 1, 0])  # every adapter, the base model, a repeat
LORA = 'lora(rank=2, alpha=4)'
SEVEN = tiny_llama.SEVEN
LLAMA_RULES = {
  'unrolled': (f'layers_\\d+/{SEVEN}', LORA),
  'scan': (f'layers/{SEVEN}', f'stacked({LORA!r})'),
}


def adapters(tree, frozen, seed=0):
  """N adapters' ``(params, buffers)``: random, every ``b`` nonzero (so each
  adapter changes the model, and differently)."""
  inits = [jax.jit(tree.init)(jax.random.key(seed + i), frozen) for i in range(N)]
  return [(references.perturb(p, seed + i), b) for i, (p, b) in enumerate(inits)]


def stacked(pairs):
  return pj.stack_trees([p for p, _ in pairs]), pj.stack_trees([b for _, b in pairs])


def weights_of_row(tree, frozen, pairs, adapter_id):
  """Row's weights: adapter ``adapter_id`` merged, or the frozen ones for -1."""
  if adapter_id == -1:
    return frozen
  return jax.jit(pj.merge, static_argnums=0)(tree, frozen, *pairs[adapter_id])


def per_row(tree, fn, frozen, pairs, ids, *args):
  """``adapted_per_row`` on the stacked adapters, with any factored-path
  fallback an error."""
  with warnings.catch_warnings():
    warnings.simplefilter('error', pj.FactoredFallbackWarning)
    return pj.adapted_per_row(tree, fn)(frozen, *stacked(pairs), ids, *args)


def one_line_error(call, match):
  with pytest.raises(pj.PeftError, match=match) as info:
    call()
  assert '\n' not in str(info.value)


@pytest.mark.parametrize('layout', ['unrolled', 'scan'])
def test_llama_generate_and_logits_per_row_equal_each_merged_model(layout):
  model, frozen = tiny_llama.tiny(layout)
  tree = pj.by_rules([LLAMA_RULES[layout]])
  pairs = adapters(tree, frozen)
  prompts, new = tiny_llama.ids((len(IDS), 4), seed=1), 5
  generate = lambda w, ids: llama.generate(model, w, ids, new)
  tokens = per_row(tree, generate, frozen, pairs, IDS, prompts)
  logits = per_row(tree, tiny_llama.logits(model), frozen, pairs, IDS, prompts)
  assert tokens.shape == (len(IDS), new) and logits.shape[0] == len(IDS)
  forward = tiny_llama.forward(model)
  want_tokens = []
  for row, adapter_id in enumerate(IDS):
    weights = weights_of_row(tree, frozen, pairs, adapter_id)
    prompt = prompts[row : row + 1]
    want_tokens.append(np.asarray(llama.generate(model, weights, prompt, new))[0])
    np.testing.assert_array_equal(tokens[row], want_tokens[-1])
    want = forward(weights, prompt)[0]
    np.testing.assert_allclose(logits[row], want, rtol=1e-5, atol=1e-5)
  # The check is not trivial: the adapters answer differently.
  assert len({tuple(t) for t in want_tokens}) > 2


def test_bert_classifier_logits_per_row_equal_each_merged_model():
  model, frozen, ids, mask = references.tiny_bert_classifier(batch=len(IDS))
  tree = pj.by_rules([('.*/(query|value|intermediate)/kernel', LORA)])
  pairs = adapters(tree, frozen, seed=7)
  fn = lambda w, ids, mask: model.apply({'params': w}, ids, mask)
  logits = per_row(tree, fn, frozen, pairs, IDS, ids, mask)
  forward = jax.jit(fn)
  want = []
  for row, adapter_id in enumerate(IDS):
    weights = weights_of_row(tree, frozen, pairs, adapter_id)
    want.append(forward(weights, ids[row : row + 1], mask[row : row + 1])[0])
  np.testing.assert_allclose(logits, np.stack(want), rtol=1e-5, atol=1e-5)
  assert np.abs(want[0] - want[2]).max() > 1e-3  # adapters 2 and 0 differ


def dense_setup(spec):
  frozen = {'w': jax.random.normal(jax.random.key(0), (6, 4))}
  tree = pj.by_rules([('w', spec)])
  return tree, frozen, adapters(tree, frozen), lambda w, x: jnp.tanh(x @ w['w'])


@pytest.mark.parametrize('spec', ['dora(rank=2)', 'pissa(rank=2)'])
def test_base_rows_are_refused_where_zero_parameters_change_the_weight(spec):
  tree, frozen, pairs, fn = dense_setup(spec)
  x = np.ones((len(IDS), 6), np.float32)
  one_line_error(
    lambda: per_row(tree, fn, frozen, pairs, IDS, x),
    r'^w: (dora|pissa)\(.*\) is not the identity at zero parameters',
  )
  # Rows with adapters need no such check and equal each merged model.
  ids = np.array([1, 0, 2])
  got = per_row(tree, fn, frozen, pairs, ids, x[:3])
  for row, adapter_id in enumerate(ids):
    want = fn(pj.merge(tree, frozen, *pairs[adapter_id]), x[row : row + 1])[0]
    np.testing.assert_allclose(got[row], want, rtol=1e-5, atol=1e-6)


def test_bad_adapter_ids_are_one_line_errors():
  tree, frozen, pairs, fn = dense_setup(LORA)
  x = np.ones((2, 6), np.float32)
  run = lambda ids: per_row(tree, fn, frozen, pairs, ids, x)
  one_line_error(lambda: run(np.array([0, 3])), r'adapter_ids\[1\] is 3; .*\[-1, 3\)')
  one_line_error(lambda: run(np.array([-2, 0])), r'adapter_ids\[0\] is -2')
  one_line_error(lambda: run(np.array([0, 1, 2])), r'shape \(3,\); expected \(2,\)')
  one_line_error(lambda: run(np.array([[0], [1]])), r'shape \(2, 1\)')
  one_line_error(lambda: run(np.array([0.0, 1.0])), 'dtype float64; expected integer')
  g = pj.adapted_per_row(tree, fn)
  params, buffers = stacked(pairs)
  one_line_error(
    lambda: jax.jit(g)(frozen, params, buffers, np.array([0, 1]), x),
    'adapter_ids is traced',
  )
  one_line_error(
    lambda: g(frozen, params, buffers, np.array([0, 1]), x, x[:1]),
    r'args have leading axes of sizes \[1, 2\]',
  )
  one_line_error(
    lambda: g(frozen, params, buffers, np.array([0, 1]), x, 2.0),
    "args leaf '1' is a scalar; expected a leading axis of rows",
  )
  one_line_error(
    lambda: pj.adapted_per_row(pj.lora(), fn), 'needs a tree-level adapter'
  )


def test_base_rows_on_traced_weights_are_refused():
  tree, frozen, pairs, fn = dense_setup(LORA)
  g = pj.adapted_per_row(tree, fn)
  x = np.ones((2, 6), np.float32)
  closed = lambda frozen, params, buffers: g(
    frozen, params, buffers, np.array([-1, 0]), x
  )
  one_line_error(
    lambda: jax.jit(closed)(frozen, *stacked(pairs)), 'the weights are traced'
  )
  # With concrete ids and ids >= 0 only, g runs inside a caller's jit.
  ids = np.array([1, 0])
  inside = jax.jit(lambda f, p, b: g(f, p, b, ids, x))(frozen, *stacked(pairs))
  np.testing.assert_allclose(
    inside, pj.adapted_per_row(tree, fn)(frozen, *stacked(pairs), ids, x), rtol=1e-6
  )


def test_base_rows_are_refused_with_activation_adapters():
  model, frozen, ids, mask = references.tiny_bert_classifier(batch=2)
  hooks = pj.hook_points(model, ids, mask)
  tree = pj.by_rules([('bert/embeddings/input_embeddings', 'prompt_tuning(length=2)')])
  pairs = [tree.init(jax.random.key(i), frozen, hooks) for i in range(N)]
  fn = lambda w, ids, mask: model.apply({'params': w}, ids, mask)
  one_line_error(
    lambda: per_row(tree, fn, frozen, pairs, np.array([0, -1]), ids, mask),
    r'^bert/embeddings/input_embeddings: prompt_tuning\(.*\) adapts activations',
  )
