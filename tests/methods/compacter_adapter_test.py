"""Compacter as sequential adapters with one shared PHM rule: the LPHM weight
against explicit Kronecker sums, the adapter against a float64 NumPy formula,
BERT through ``by_rules`` against a Flax interception, the shared rule's
gradient against the sum of per-point gradients of a hand-written model with
one copy of ``A`` per point, and per-layer slicing under ``nn.scan``."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

import peft_jax as pj
from peft_jax._src import paths, phm
from peft_jax.methods.compacter_adapter import (
  CompacterAdapterParams,
  CompacterFactors,
  CompacterRule,
)
from tests import references
from tests.models import llama_hooks_test as tiny_llama

CONFIG = references.TINY_BERT
B, T, D, L = 2, 5, 16, 2
N, REDUCTION = 4, 2
M = D // REDUCTION
SPEC = f'compacter_adapter(reduction_factor={REDUCTION}, n={N})'
SITES = '.*/(attention/attention_output|ffn_output)'


def f64(x) -> np.ndarray:
  return np.asarray(x, np.float64)


def lphm_np(a, s, t) -> np.ndarray:
  """``Σ_i A_i ⊗ (S_i T_i)`` with explicit Kronecker products, float64."""
  a, s, t = f64(a), f64(s), f64(t)
  return sum(np.kron(a[i], s[i] @ t[i]) for i in range(len(a)))


def compacter_np(h, a, own: CompacterFactors) -> np.ndarray:
  """``h + GELU(h W_down + b_d) W_up + b_u`` (exact GELU), float64."""
  h = f64(h)
  pre = h @ lphm_np(a, own.down_s, own.down_t) + f64(own.down_bias)
  gelu = 0.5 * pre * (1 + scipy.special.erf(pre / np.sqrt(2)))
  return h + gelu @ lphm_np(a, own.up_s, own.up_t) + f64(own.up_bias)


def setup():
  return references.tiny_bert_classifier(B, T)


def logits_fn(model):
  return lambda w, ids, mask: model.apply({'params': w}, ids, mask)


def dense_sites(params) -> dict[tuple, CompacterFactors]:
  """``{Dense module path: its point's own parameters}``: the attention
  output and FFN output projections whose outputs are the hook values."""
  sites = {}
  for i in range(L):
    layer = params['bert']['encoder'][f'layer_{i}']
    prefix = ('bert', 'encoder', f'layer_{i}')
    sites[(*prefix, 'attention', 'output')] = layer['attention']['attention_output']
    sites[(*prefix, 'output')] = layer['ffn_output']
  return sites


def intercepting(block, adapters: dict[tuple, tuple]):
  """Replaces the output ``y`` of each Dense at the given module paths by
  ``block(y, *adapters[path])``, by Flax method interception (independent of
  hook points)."""

  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    path = tuple(context.module.path)
    if context.method_name == '__call__' and path in adapters:
      return jnp.asarray(block(y, *adapters[path]), y.dtype)
    return y

  return nn.intercept_methods(interceptor)


@pytest.mark.parametrize('n, p, q, r', [(2, 3, 5, 1), (4, 2, 3, 2), (3, 1, 4, 1)])
def test_lphm_weight_is_the_kronecker_sum(n, p, q, r):
  rng = np.random.default_rng(n + p + q + r)
  a, s, t = (rng.normal(size=shape) for shape in ((n, n, n), (n, p, r), (n, r, q)))
  got = phm.lphm_weight(jnp.float32(a), jnp.float32(s), jnp.float32(t))
  assert got.shape == (n * p, n * q)
  np.testing.assert_allclose(got, lphm_np(a, s, t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('n, rank, reduction', [(2, 1, 2), (4, 1, 2), (2, 3, 1)])
def test_adapter_equals_the_numpy_formula(n, rank, reduction):
  adapter = pj.compacter_adapter(reduction_factor=reduction, n=n, rank=rank)
  value = jax.ShapeDtypeStruct((2, 3, 8), jnp.float32)
  own, buffers = adapter.init(jax.random.key(0), value)
  shared = adapter.shared.init(jax.random.key(1), value)
  own, shared = references.perturb((own, shared), n + rank)
  h = jax.random.normal(jax.random.key(2), value.shape)
  params = adapter.shared.derive(shared, own)
  assert isinstance(params, CompacterAdapterParams)
  got = jax.jit(adapter.apply)(h, params, buffers)
  np.testing.assert_allclose(got, compacter_np(h, shared.a, own), rtol=1e-4, atol=1e-4)


def test_derive_attaches_the_one_rule_to_every_layer():
  adapter = pj.get(SPEC)
  value = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
  own, _ = adapter.init(jax.random.key(0), value)
  stacked = jax.tree.map(lambda x: jnp.stack([x, 2 * x, 3 * x]), own)
  shared = adapter.shared.init(jax.random.key(1), value)
  derived = adapter.shared.derive(shared, stacked)
  assert derived.a.shape == (3, N, N, N)
  for i in range(3):
    np.testing.assert_array_equal(derived.a[i], shared.a)
  for field in CompacterFactors._fields:
    np.testing.assert_array_equal(getattr(derived, field), getattr(stacked, field))


def test_init_and_counts_follow_adapter_transformers():
  n, d, m = 8, 256, 64
  adapter = pj.compacter_adapter(reduction_factor=4, n=n)
  value = jax.ShapeDtypeStruct((2, 3, d), jnp.float32)
  own, buffers = adapter.init(jax.random.key(0), value)
  shared = adapter.shared.init(jax.random.key(1), value)
  assert isinstance(own, CompacterFactors) and buffers is None
  assert isinstance(shared, CompacterRule) and shared.a.shape == (n, n, n)
  np.testing.assert_allclose(np.std(f64(shared.a)), 1e-4, rtol=0.1)
  np.testing.assert_array_equal(own.down_bias, np.zeros(m))
  np.testing.assert_array_equal(own.up_bias, np.zeros(d))
  shapes = {
    'down_s': (n, d // n, 1),
    'down_t': (n, 1, m // n),
    'up_s': (n, m // n, 1),
    'up_t': (n, 1, d // n),
  }
  for field, shape in shapes.items():
    leaf = f64(getattr(own, field))
    bound = np.sqrt(6 / (shape[1] + shape[2]))  # Glorot-uniform per A_i slot.
    assert leaf.shape == shape and np.all(np.abs(leaf) <= bound), field
    assert np.abs(leaf).max() > 0.8 * bound, field
  assert pj.count(own) == adapter.num_params(value) == 2 * (d + m) + d + m
  assert pj.count(shared) == adapter.shared.num_params(value) == n**3
  # The tiny A puts the adapter near the identity.
  h = jax.random.normal(jax.random.key(2), value.shape)
  out = adapter.apply(h, adapter.shared.derive(shared, own), buffers)
  assert np.abs(out - h).max() < 1e-5


@pytest.mark.slow
def test_bert_keeps_one_shared_rule_and_equals_an_interception():
  model, frozen, ids, mask = setup()
  hooks = pj.hook_points(model, ids, mask)
  tree = pj.by_rules([(SITES, SPEC)])
  assert not tree.mergeable
  params, buffers = tree.init(jax.random.key(3), frozen, hooks)
  assert buffers == {}
  assert list(params['@shared']) == ['compacter_adapter']
  rule = params['@shared']['compacter_adapter']
  assert isinstance(rule, CompacterRule) and rule.a.shape == (N, N, N)
  assert pj.count(params) == 2 * L * (2 * (D + M) + D + M) + N**3
  params = references.perturb(params, 4)
  a = params['@shared']['compacter_adapter'].a
  sites = {path: (a, own) for path, own in dense_sites(params).items()}
  with intercepting(compacter_np, sites):
    want = model.apply({'params': frozen}, ids, mask)
  for factored in (False, True):
    got = jax.jit(pj.adapted(tree, logits_fn(model), factored=factored))(
      frozen, params, buffers, ids, mask
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  plain = model.apply({'params': frozen}, ids, mask)
  assert np.abs(plain - want).max() > 1e-3  # The adapters matter.


def block_by_hand(h, a, f: CompacterFactors):
  """The adapter in jnp with ``jnp.kron`` sums (not ``phm.lphm_weight``)."""
  kron_sum = lambda s, t: sum(jnp.kron(a[i], s[i] @ t[i]) for i in range(len(a)))
  pre = h @ kron_sum(f.down_s, f.down_t) + f.down_bias
  return h + jax.nn.gelu(pre, approximate=False) @ kron_sum(f.up_s, f.up_t) + f.up_bias


def test_shared_rule_gets_the_summed_gradient_of_every_point():
  """One shared A: its gradient is the sum over the four points of the
  gradients of a model that gives each point its own copy of A."""
  model, frozen, ids, mask = setup()
  hooks = pj.hook_points(model, ids, mask)
  tree = pj.by_rules([(SITES, SPEC)])
  params, buffers = tree.init(jax.random.key(5), frozen, hooks)
  params = references.perturb(params, 6)
  loss_of = lambda logits: jnp.sum(jnp.sin(3 * logits))
  got = jax.jit(
    jax.grad(
      lambda p: loss_of(
        pj.adapted(tree, logits_fn(model))(frozen, p, buffers, ids, mask)
      )
    )
  )(params)

  def per_point_loss(rules, factors):
    adapters = {path: (rules[path], factors[path]) for path in factors}
    with intercepting(block_by_hand, adapters):
      return loss_of(model.apply({'params': frozen}, ids, mask))

  factors = dense_sites(params)
  a = params['@shared']['compacter_adapter'].a
  rule_grads, factor_grads = jax.jit(jax.grad(per_point_loss, argnums=(0, 1)))(
    {path: a for path in factors}, factors
  )
  assert len(rule_grads) == 2 * L
  per_point = [f64(g) for g in rule_grads.values()]
  assert all(np.abs(g).max() > 1e-4 for g in per_point)
  assert not np.allclose(per_point[0], per_point[1])
  np.testing.assert_allclose(
    got['@shared']['compacter_adapter'].a, sum(per_point), rtol=1e-4, atol=1e-6
  )
  for path, want in factor_grads.items():
    for g, w in zip(
      jax.tree.leaves(dense_sites(got)[path]), jax.tree.leaves(want), strict=True
    ):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_scanned_llama_slices_each_layer_and_shares_one_rule():
  """Under ``nn.scan`` the per-layer factors carry the layer axis and the
  shared rule does not; logits and the rule's gradient equal the unrolled
  model's with the same parameters layer by layer."""
  tokens = tiny_llama.ids()
  points = ('self_attn/attention_output', 'mlp/ffn_output')
  rules = [('.*(attention_output|ffn_output)', 'compacter_adapter(reduction_factor=4)')]
  runs = {}
  for layout in ('unrolled', 'scan_remat'):
    model, frozen = tiny_llama.tiny(layout)
    hooks = pj.hook_points(model, tokens)
    tree = pj.by_rules(rules)
    # The scanned layout's init only shows its shapes: traced, not run.
    params, _ = tiny_llama.init(tree, frozen, hooks, 7, run=layout == 'unrolled')
    runs[layout] = (tree, model, frozen, params)
  tree, model, frozen, params = runs['unrolled']
  params = references.perturb(params, 8)
  entries = {'@shared/compacter_adapter': params['@shared']['compacter_adapter']}
  for point in points:
    per_layer = [paths.subtree(params, f'layers_{i}/{point}') for i in range(L)]
    entries.update(tiny_llama.stack_entries(per_layer, 'scan_remat', point))
  scan_params = paths.nest(entries)
  s_tree, s_model, s_frozen, s_init = runs['scan_remat']
  assert jax.tree.map(jnp.shape, s_init) == jax.tree.map(jnp.shape, scan_params)
  assert s_init['@shared']['compacter_adapter'].a.shape == (4, 4, 4)
  assert paths.subtree(s_init, 'layers/mlp/ffn_output').down_s.shape == (L, 4, 8, 1)

  def logits_and_grad(tree, model, frozen):
    run = pj.adapted(tree, tiny_llama.logits(model))
    return references.outputs_and_grad(lambda p: run(frozen, p, None, tokens))

  want, want_grad = logits_and_grad(tree, model, frozen)(params)
  scanned = logits_and_grad(s_tree, s_model, s_frozen)
  got, got_grad = scanned(scan_params)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    got_grad['@shared']['compacter_adapter'].a,
    want_grad['@shared']['compacter_adapter'].a,
    rtol=1e-4,
    atol=1e-6,
  )
  swapped = jax.tree.map(lambda x: x[::-1], paths.subtree(scan_params, 'layers'))
  other, _ = scanned({**scan_params, 'layers': swapped})
  assert np.abs(other - want).max() > 1e-3


@pytest.mark.parametrize(
  ('point', 'spec', 'match'),
  [
    (
      '.*/ffn_output',
      'compacter_adapter(n=3, reduction_factor=2)',
      'n=3 must divide d=16',
    ),
    (
      '.*/ffn_output',
      'compacter_adapter(n=8, reduction_factor=4)',
      r'n=8 must divide d=16 and m = d // reduction_factor = 16 // 4 = 4 > 0',
    ),
    ('.*/ffn_output', 'compacter_adapter()', '16 // 32 = 0'),
    ('.*/ffn_output', 'compacter_adapter(n=0)', 'n=0 must be > 0'),
    ('.*/ffn_output', 'compacter_adapter(phm_init_range=0)', 'must be > 0'),
    ('.*/ffn_output', 'compacter_adapter(rank=1.0)', 'rank=1.0 must be an int'),
    ('.*/attention_kv', 'compacter_adapter(reduction_factor=2)', r'\(batch, seq, d\)'),
  ],
)
def test_bad_specs_and_points_are_one_line_errors(point, spec, match):
  model, frozen, ids, mask = setup()
  hooks = pj.hook_points(model, ids, mask)
  with pytest.raises(pj.PeftError, match=match) as error:
    pj.by_rules([(point, spec)]).init(jax.random.key(0), frozen, hooks)
  assert '\n' not in str(error.value)
