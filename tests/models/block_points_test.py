"""Parallel adapters at the ``attention_block``/``ffn_block`` hook points, end to end.

The independent check: Flax method interception (``nn.intercept_methods``),
a mechanism that knows nothing of hook points, records the input of the
Dense that *reads* each sub-layer's input ``x`` (BERT's ``query`` and
``intermediate``, DeBERTa's ``query_proj`` and ``intermediate/dense``,
Llama's ``q_proj`` and ``gate_proj``) and adds ``s · relu(x W_d + b_d) W_u``,
in float64 NumPy, to the output of the Dense that *writes* the sub-layer's
output ``h`` (the attention output projection and the FFN's last Dense),
before dropout and the residual. The adapted model, run through
``pj.adapted`` with randomised parameters, must give the same logits. That
the two agree shows the points pass the right ``x`` and that the model uses
the returned ``h'`` in the right place.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax._src import paths
from peft_jax.models import bert, deberta, llama
from tests import references
from tests.models import llama_hooks_test as tiny_llama

SPEC = 'scaled_parallel(reduction_factor=4, scale=2.0)'
LEARNED = 'scaled_parallel(reduction_factor=4, learned_scale=True)'
BLOCKS = '.*/(attention_block|ffn_block)'


def parallel_reference(x, h, params, scale) -> np.ndarray:
  """``h + s · relu(x @ down + b_d) @ up`` in float64 NumPy."""
  f64 = lambda t: np.asarray(t, np.float64)
  s = f64(params.scale) if scale is None else scale
  pre = f64(x) @ f64(params.down) + f64(params.down_bias)
  return f64(h) + s * (np.maximum(pre, 0) @ f64(params.up))


def intercepting_parallel(sites: dict[tuple, tuple], scale: float | None):
  """``sites``: ``{writer path: (reader path, params)}``; ``scale`` None reads
  the learned ``params.scale``. Eager only (NumPy inside), one model call
  per context."""
  inputs = {}
  readers = {reader for reader, _ in sites.values()}

  def interceptor(next_fun, args, kwargs, context):
    path = tuple(context.module.path)
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    if path in readers:  # The first call: DeBERTa's query_proj also projects
      inputs.setdefault(path, args[0])  # the relative embeddings afterwards.
    y = next_fun(*args, **kwargs)
    if path in sites:
      reader, params = sites[path]
      return jnp.asarray(parallel_reference(inputs[reader], y, params, scale), y.dtype)
    return y

  return nn.intercept_methods(interceptor)


# ---------------------------------------------------------------------------
# BERT and DeBERTa (unrolled post-LN encoders).

BERT = references.TINY_BERT
DEBERTA = deberta.DebertaV2Config(
  vocab_size=50,
  hidden_size=16,
  num_layers=2,
  num_heads=2,
  intermediate_size=32,
  relative_attention=True,
  position_buckets=4,
  max_relative_positions=8,
  pos_att_type=('c2p', 'p2c'),
  norm_rel_ebd='layer_norm',
  position_biased_input=False,
  type_vocab_size=0,
)
# model -> (prefix of layer paths, {point: (reader, writer) within a layer})
ENCODERS = {
  'bert': (
    bert.BertForSequenceClassification(BERT, num_labels=2, pooling='cls'),
    ('bert', 'encoder'),
    {
      'attention/attention_block': ('attention/query', 'attention/output'),
      'ffn_block': ('intermediate', 'output'),
    },
  ),
  'deberta': (
    deberta.DebertaV2ForSequenceClassification(DEBERTA, num_labels=2),
    ('deberta', 'encoder'),
    {
      'attention/attention_block': (
        'attention/self/query_proj',
        'attention/output/dense',
      ),
      'ffn_block': ('intermediate/dense', 'output/dense'),
    },
  ),
}


@pytest.mark.parametrize('name', sorted(ENCODERS))
def test_scaled_parallel_at_encoder_blocks_equals_an_interception(name):
  model, prefix, points = ENCODERS[name]
  ids = jax.random.randint(jax.random.key(0), (2, 5), 1, 50)
  mask = jnp.ones_like(ids).at[1, -2:].set(0)
  frozen = references.initialised(model)  # Cached: the weights of key(1).
  hooks = pj.hook_points(model, ids, mask)
  tree = pj.by_rules([(BLOCKS, SPEC)])
  params, buffers = tree.init(jax.random.key(2), frozen, hooks)
  params = references.perturb(params, 3)
  sites = {}
  for i in range(2):
    for point, (reader, writer) in points.items():
      layer = (*prefix, f'layer_{i}')
      sites[(*layer, *writer.split('/'))] = (
        (*layer, *reader.split('/')),
        paths.subtree(params, '/'.join([*layer, point])),
      )
  assert len(sites) == 4
  with intercepting_parallel(sites, scale=2.0):
    want = model.apply({'params': frozen}, ids, mask)
  plain = model.apply({'params': frozen}, ids, mask)
  assert np.abs(want - plain).max() > 1e-3
  run = lambda w, ids, mask: model.apply({'params': w}, ids, mask)
  for factored in (False, True):
    got = jax.jit(pj.adapted(tree, run, factored=factored))(
      frozen, params, buffers, ids, mask
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# Llama: unrolled, scanned, scanned with remat; and with a KV cache.

# point -> (reader, writer) within a layer
LLAMA_POINTS = {
  'self_attn/attention_block': ('self_attn/q_proj', 'self_attn/o_proj'),
  'mlp/ffn_block': ('mlp/gate_proj', 'mlp/down_proj'),
}


def per_layer_params(seed):
  """``{point: [layer 0's, layer 1's]}``, random and different per layer."""
  adapter = pj.get(LEARNED)
  value = (jax.ShapeDtypeStruct((1, 1, 32), jnp.float32),) * 2
  return {
    point: [
      references.perturb(adapter.init(jax.random.key(0), value)[0], seed + 10 * j + i)
      for i in range(2)
    ]
    for j, point in enumerate(LLAMA_POINTS)
  }


def laid_out(per_point: dict, layout: str) -> dict:
  """By_rules' sparse params for ``layout``: per layer, or stacked on axis 0."""
  if not tiny_llama.LAYOUTS[layout]:
    flat = {
      f'layers_{i}/{point}': layers[i]
      for point, layers in per_point.items()
      for i in range(2)
    }
  else:
    flat = {
      f'layers/{point}': jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
      for point, layers in per_point.items()
    }
  return paths.nest(flat)


@functools.cache
def llama_intercepted() -> tuple[dict, np.ndarray]:
  """``(per-point, per-layer parameters, the unrolled Llama's logits with the
  reference added by interception)``: once (eagerly) for every layout."""
  per_point = per_layer_params(20)
  sites = {
    (f'layers_{i}', *writer.split('/')): (
      (f'layers_{i}', *reader.split('/')),
      per_point[point][i],
    )
    for point, (reader, writer) in LLAMA_POINTS.items()
    for i in range(2)
  }
  unrolled, frozen_unrolled = tiny_llama.tiny('unrolled')
  with intercepting_parallel(sites, scale=None):
    want = unrolled.apply({'params': frozen_unrolled}, tiny_llama.ids())
  return per_point, want


@pytest.mark.parametrize('layout', sorted(tiny_llama.LAYOUTS))
def test_scaled_parallel_at_llama_blocks_equals_an_interception(layout):
  per_point, want = llama_intercepted()
  model, frozen = tiny_llama.tiny(layout)
  tree = pj.by_rules([(BLOCKS, LEARNED)])
  params, buffers = tree.init(
    jax.random.key(0), frozen, pj.hook_points(model, tiny_llama.ids())
  )
  params_shapes = jax.tree.map(jnp.shape, params)
  assert params_shapes == jax.tree.map(jnp.shape, laid_out(per_point, layout))
  if tiny_llama.LAYOUTS[layout]:  # One entry per point, with the layer axis in front.
    block = params_shapes['layers']['mlp']['ffn_block']
    assert block.down == (2, 32, 8) and block.scale == (2,)
  params = laid_out(per_point, layout)
  run = lambda w, ids: model.apply({'params': w}, ids)
  runs = {f: jax.jit(pj.adapted(tree, run, factored=f)) for f in (False, True)}
  for adapted in runs.values():
    got = adapted(frozen, params, buffers, tiny_llama.ids())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

  # Layer 1 gets its own parameters: layer 0's in both layers differ.
  layer_0 = {point: [layers[0]] * 2 for point, layers in per_point.items()}
  same = runs[False](frozen, laid_out(layer_0, layout), buffers, tiny_llama.ids())
  assert np.abs(np.asarray(same - got)).max() > 1e-3


@pytest.mark.parametrize('layout', ['unrolled', 'scan'])
def test_llama_blocks_with_a_kv_cache_equal_the_full_sequence(layout):
  """Token-by-token decoding through the cache, with parallel adapters at
  both blocks, gives the logits of one pass over the whole sequence."""
  model, frozen = tiny_llama.tiny(layout)
  ids = tiny_llama.ids()
  tree = pj.by_rules([(BLOCKS, LEARNED)])
  params, buffers = tree.init(jax.random.key(0), frozen, pj.hook_points(model, ids))
  params = references.perturb(params, 4)
  full = pj.adapted(tree, lambda w, t: model.apply({'params': w}, t))(
    frozen, params, buffers, ids
  )
  step = jax.jit(
    pj.adapted(tree, lambda w, t, cache: model.apply({'params': w}, t, cache=cache))
  )
  cache = llama.init_cache(tiny_llama.CONFIG, tiny_llama.B, tiny_llama.T)
  for t in range(tiny_llama.T):
    logits, cache = step(frozen, params, buffers, ids[:, t : t + 1], cache)
    np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-4, atol=1e-4)
  plain = model.apply({'params': frozen}, ids)
  assert np.abs(np.asarray(full - plain)).max() > 1e-3
