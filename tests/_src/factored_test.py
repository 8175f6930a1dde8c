"""pj.adapted: the factored path equals the weight-space path, costs fewer FLOPs."""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import peft_jax as pj
from peft_jax.models import llama
from tests import references
from tests.models import llama_hooks_test as tiny_llama

SPECS = [
  'lora(rank=2, b_init="normal")',
  'lora(rank=3, rslora=True, b_init="normal")',
  'ia3()',
  'ssl()',
  'ssb()',
  'full()',
]


class LinenModel(nn.Module):
  """Dense, Einsum, remat, nested jit and a custom_jvp activation."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(6, name='dense')(x))
    x = nn.Einsum((6, 5), '...i,ij->...j', name='einsum')(x)
    x = nn.remat(nn.Dense)(5, name='remat_dense')(jnp.tanh(x))
    return jax.jit(lambda y: nn.gelu(y))(x) @ jnp.ones((5, 2))


def perturb(params, seed=1):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [
    t + 0.2 * jax.random.normal(k, t.shape) for t, k in zip(leaves, keys, strict=True)
  ]
  return treedef.unflatten(noisy)


def check_equal_paths(adapter, fn, frozen, *args):
  params, buffers = adapter.init(jax.random.key(0), frozen)
  params = perturb(params)
  weight_space = lambda p: fn(adapter.apply(frozen, p, buffers), *args)
  fast = lambda p: pj.adapted(adapter, fn, factored=True)(frozen, p, buffers, *args)
  # Each path is one jitted program, its outputs and gradient together:
  # op-by-op dispatch of a whole model costs more than it checks.
  fast_out, fast_grad = references.outputs_and_grad(fast)(params)
  want_out, want_grad = references.outputs_and_grad(weight_space)(params)
  np.testing.assert_allclose(fast_out, want_out, rtol=1e-5, atol=1e-5)
  # A gradient entry sums terms as large as the leaf's largest entries, so
  # float32 round-off (which differs with XLA's fusion choices) scales with
  # the leaf: absolute tolerance 1e-5 of its largest magnitude.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(b).max()))
    ),
    fast_grad,
    want_grad,
  )


@pytest.mark.parametrize('spec', SPECS)
def test_linen_model_outputs_and_gradients_match(spec):
  model = LinenModel()
  x = jax.random.normal(jax.random.key(3), (4, 3, 7))
  frozen = model.init(jax.random.key(2), x)['params']
  adapter = pj.by_rules([('.*/kernel', spec)])
  check_equal_paths(adapter, lambda p, x: model.apply({'params': p}, x), frozen, x)


@pytest.mark.parametrize('spec', [*SPECS[:2], 'ssb()'])
def test_nnx_model_outputs_and_gradients_match(spec):
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(2)])
      self.out = nnx.Einsum('bi,io->bo', (4, 3), (3,), rngs=rngs)

    def __call__(self, x):
      for layer in self.layers:
        x = jax.nn.silu(layer(x))
      return self.out(x)

  graphdef, state = nnx.split(Model(nnx.Rngs(0)))
  adapter = pj.by_rules([('layers/.*/kernel|out/kernel', spec)])
  fn = lambda s, x: nnx.merge(graphdef, s)(x)
  check_equal_paths(adapter, fn, state, jnp.ones((2, 4)))


def test_adapted_kernel_inside_scan_and_cond_stays_factored():
  def fn(params, x):
    def body(h, _):
      return jnp.tanh(h @ params['shared']), None

    h, _ = jax.lax.scan(body, x, None, length=3)
    return jax.lax.cond(h.sum() > 0, lambda w: h @ w, lambda w: -h @ w, params['head'])

  frozen = {'shared': jnp.eye(4) * 0.5, 'head': jnp.ones((4, 2))}
  adapter = pj.by_rules([('shared|head', 'lora(rank=1, b_init="normal")')])
  check_equal_paths(adapter, fn, frozen, jnp.ones((2, 4)))
  params, buffers = adapter.init(jax.random.key(0), frozen)
  fast = pj.adapted(adapter, fn, factored=True)
  jaxpr = str(jax.make_jaxpr(fast)(frozen, params, buffers, jnp.ones((2, 4))))
  assert 'dot_general' in jaxpr and 'f32[4,4] = add' not in jaxpr  # w' never formed


def test_other_uses_fall_back_to_weight_space_with_a_warning():
  def tied_lm(params, ids):
    h = params['embedding'][ids]  # gather: materialised
    return h @ params['embedding'].T  # x @ wᵀ: materialised

  frozen = {'embedding': jax.random.normal(jax.random.key(0), (10, 4))}
  adapter = pj.by_rules([('embedding', 'lora(rank=2, b_init="normal")')])
  with pytest.warns(pj.FactoredFallbackWarning, match='embedding is used by'):
    check_equal_paths(adapter, tied_lm, frozen, jnp.array([1, 2, 3]))


def test_llama_generate_stays_factored_inside_its_while_loop():
  """``llama.generate``'s decoding ``while_loop`` closes over the kernels: it
  is entered (no fallback warning), and gives the weight-space tokens."""
  model, frozen = tiny_llama.tiny('scan')
  rule = (f'layers/{tiny_llama.SEVEN}', f'stacked({tiny_llama.LORA!r})')
  tree = pj.by_rules([rule])
  params, buffers = jax.jit(tree.init)(jax.random.key(0), frozen)
  params = references.perturb(params, 1)
  prompt = tiny_llama.ids((2, 4), seed=1)
  generate = lambda w, ids: llama.generate(model, w, ids, 5)
  with warnings.catch_warnings():
    warnings.simplefilter('error', pj.FactoredFallbackWarning)
    fast = jax.jit(pj.adapted(tree, generate, factored=True))(
      frozen, params, buffers, prompt
    )
  want = generate(jax.jit(tree.apply)(frozen, params, buffers), prompt)
  np.testing.assert_array_equal(fast, want)
  assert not np.array_equal(want, generate(frozen, prompt))  # the adapter acts


def test_projections_sharing_an_input_keep_one_copy_of_it_for_the_backward():
  """q/k/v read one normed ``x``, gate/up another: under a scan over layers,
  the backward pass keeps one ``(layers, tokens, d)`` stack of each input
  that a factored projection reads (the attention and MLP inputs, o_proj's),
  not one per projection (6, before the flattened input was shared); and
  no tracer of the scan's body outlives it (JAX's leak checker)."""
  model, frozen = tiny_llama.tiny('scan')
  rule = (f'layers/{tiny_llama.SEVEN}', f'stacked({tiny_llama.LORA!r})')
  tree = pj.by_rules([rule])
  params, buffers = jax.jit(tree.init)(jax.random.key(0), frozen)
  tokens = tiny_llama.ids()
  fast = pj.adapted(tree, tiny_llama.logits(model), factored=True)
  # Traced only: the residuals' shapes, with nothing computed or compiled.
  residuals = lambda p: jax.tree.leaves(
    jax.vjp(lambda p: fast(frozen, p, buffers, tokens), p)[1]
  )
  with jax.checking_leaks():
    kept = [x.shape for x in jax.eval_shape(residuals, params)]
  layers, n = tiny_llama.CONFIG.num_layers, tokens.size
  assert kept.count((layers, n, tiny_llama.D)) == 3, kept
  assert kept.count((layers, n, tiny_llama.FFN)) == 1, kept  # down_proj's input


def test_adapted_needs_a_tree_adapter():
  with pytest.raises(pj.PeftError, match='needs a tree-level adapter'):
    pj.adapted(pj.lora(), lambda p, x: x)({'w': jnp.ones((2, 2))}, {}, {}, 1.0)


def test_linear_only_methods_run_factored_on_the_weight_space_path_too():
  frozen = {'dense': {'kernel': jax.random.normal(jax.random.key(0), (4, 3))}}
  adapter = pj.by_rules([('.*/kernel', 'parallel_adapter(rank=2)')])
  params, buffers = adapter.init(jax.random.key(1), frozen)
  params = perturb(params)
  x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
  fn = lambda w, x: x @ w['dense']['kernel']
  a, b = (np.float64(t) for t in params['dense']['kernel'])
  expected = x @ np.float64(frozen['dense']['kernel']) + np.maximum(x @ a, 0) @ b
  for factored in (False, True):
    got = pj.adapted(adapter, fn, factored=factored)(frozen, params, buffers, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_linear_only_method_on_a_non_matmul_use_is_a_clear_error():
  frozen = {'table': jnp.ones((4, 3))}
  adapter = pj.by_rules([('table', 'parallel_adapter(rank=2)')])
  params, buffers = adapter.init(jax.random.key(0), frozen)
  gather = lambda w, ids: w['table'][ids]
  with pytest.raises(pj.PeftError, match=r'table: .* has no weight-space form'):
    pj.adapted(adapter, gather)(frozen, params, buffers, jnp.array([0, 1]))


def train_step_flops(factored: bool) -> float:
  d, n = 256, 512
  frozen = {f'layer_{i}': {'kernel': jnp.ones((d, d)) / d} for i in range(4)}
  adapter = pj.by_rules([('.*/kernel', 'lora(rank=8)')])

  def loss_fn(params, batch, rng):
    del rng
    h = batch
    for i in range(4):
      h = jnp.tanh(h @ params[f'layer_{i}']['kernel'])
    return jnp.mean(h**2), {}

  optimizer = optax.sgd(0.1)
  params, buffers = adapter.init(jax.random.key(0), frozen)
  state = pj.TrainState.create(params, buffers, optimizer, jax.random.key(1))
  step = pj.make_train_step(loss_fn, adapter, optimizer, factored=factored)
  compiled = jax.jit(step).lower(state, frozen, jnp.ones((n, d))).compile()
  return compiled.cost_analysis()['flops']


def test_factored_lora_over_batch_and_seq_does_not_transpose_the_output_gradient():
  """The branch runs over one token axis: ``∂b = (x a)ᵀ g`` over (batch, seq)
  made XLA:CPU transpose the whole ``g``, as the weight-space step's
  ``∂W = xᵀ g`` still does (the control: the check can tell)."""
  x, t = jnp.ones((4, 64, 32)), jnp.ones((4, 64, 48))
  adapter = pj.by_rules([('w', 'lora(rank=4)')])
  frozen = {'w': jnp.ones((32, 48))}
  params, buffers = adapter.init(jax.random.key(0), frozen)
  fn = lambda weights: jnp.sum(jnp.tanh(x @ weights['w']) * t)

  def copies(factored):
    loss = lambda p: pj.adapted(adapter, fn, factored=factored)(frozen, p, buffers)
    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    return references.layout_copy_sizes(hlo)

  assert t.size in copies(factored=False)
  assert t.size not in copies(factored=True)


def test_factored_lora_step_needs_clearly_fewer_flops():
  # Matmul FLOPs of 4 layers, n tokens, d x d kernels: forward 2nd², input
  # gradients 2nd² (3 of 4 layers), weight gradients 2nd² (weight space only).
  weight_space, factored = train_step_flops(False), train_step_flops(True)
  assert factored < 0.75 * weight_space, (factored, weight_space)


@pytest.mark.parametrize('inner', ['lora(rank=2, b_init="normal")', 'ssb()'])
def test_stacked_adapters_on_nn_scan_layers_stay_factored(inner):
  class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
      return jnp.tanh(nn.remat(nn.Dense)(4, name='dense')(h)), None

  class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
      layers = nn.scan(
        Block, variable_axes={'params': 0}, split_rngs={'params': True}, length=3
      )
      return layers(name='layers')(x, None)[0]

  model = Scanned()
  x = jax.random.normal(jax.random.key(0), (2, 4))
  frozen = model.init(jax.random.key(1), x)['params']
  assert frozen['layers']['dense']['kernel'].shape == (3, 4, 4)
  adapter = pj.by_rules([('layers/dense/kernel', f'stacked({inner!r})')])
  fn = lambda p, x: model.apply({'params': p}, x)
  check_equal_paths(adapter, fn, frozen, x)
  params, buffers = adapter.init(jax.random.key(0), frozen)
  fast = pj.adapted(adapter, fn, factored=True)
  with warnings.catch_warnings():
    warnings.simplefilter('error', pj.FactoredFallbackWarning)
    jaxpr = str(jax.make_jaxpr(fast)(frozen, params, buffers, x))
  assert 'f32[4,4] = mul' not in jaxpr and 'f32[3,4,4] = add' not in jaxpr


@pytest.mark.parametrize('inner', ['lora(rank=2, b_init="normal")', 'ssb()'])
def test_dense_general_kernels_stay_factored_with_matrix_view(inner):
  class MultiHead(nn.Module):
    @nn.compact
    def __call__(self, x):
      q = nn.DenseGeneral((2, 3), name='query')(x)  # kernel (4, 2, 3)
      return nn.DenseGeneral(4, axis=(-2, -1), name='out')(jnp.tanh(q))  # (2, 3, 4)

  model = MultiHead()
  x = jax.random.normal(jax.random.key(0), (5, 4))
  frozen = model.init(jax.random.key(1), x)['params']
  adapter = pj.by_rules(
    [
      ('query/kernel', f'matrix_view({inner!r}, n_in=1)'),
      ('out/kernel', f'matrix_view({inner!r}, n_in=2)'),
    ]
  )
  fn = lambda p, x: model.apply({'params': p}, x)
  with warnings.catch_warnings():
    warnings.simplefilter('error', pj.FactoredFallbackWarning)
    check_equal_paths(adapter, fn, frozen, x)


@functools.cache
def shipped_bert():
  """``(model, frozen, ids, mask)``: a tiny BERT classifier, initialised
  once (jitted) for both methods' tests."""
  from peft_jax.models import bert

  config = bert.BertConfig(
    vocab_size=40, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24
  )
  model = bert.BertForSequenceClassification(config, num_labels=3)
  ids = jax.random.randint(jax.random.key(0), (2, 6), 1, 40)
  mask = jnp.ones_like(ids).at[1, 4:].set(0)
  frozen = jax.jit(model.init)(jax.random.key(1), ids, mask)['params']
  return model, frozen, ids, mask


# An additive and a rescaling method; the contract test covers every method.
# The shipped MiniLM: a real model (the tiny-model tests above are the fast ones).
@pytest.mark.slow
@pytest.mark.parametrize('spec', ['lora(rank=2, b_init="normal")', 'dora(rank=2)'])
def test_shipped_bert_factored_equals_weight_space(spec):
  model, frozen, ids, mask = shipped_bert()
  adapter = pj.by_rules(
    [('bert/encoder/.*/(query|key|value|output|intermediate)/kernel', spec)]
  )
  fn = lambda p, ids, mask: model.apply({'params': p}, ids, mask)
  with warnings.catch_warnings():
    warnings.simplefilter('error', pj.FactoredFallbackWarning)
    check_equal_paths(adapter, fn, frozen, ids, mask)
