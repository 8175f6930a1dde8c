"""One battery of checks run over every registered method (optax-style).

Each registered method needs a row: weight-space methods in ``CASES`` (a small
spec and a non-square leaf shape, so a transposed factor cannot pass),
activation methods in ``ACTIVATION_CASES`` (a spec and the value at a hook
point). A new method without a row fails ``test_every_method_has_a_case``.
Besides the per-method checks (shapes, dtypes, identity at init, counts,
factored == merged, gradients), every method must also: compile once for new
parameter values (no retrace), give the same results under a sharded ``jit``
as on one device, and, where it has a regulariser, return finite non-negative
per-matrix terms that the tree combines.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import peft_jax as pj
from peft_jax._src import registry
from tests import references

# name -> (spec, leaf shape, identity at init per the spec)
CASES = {
  'lora': ('lora(rank=3, alpha=6)', (7, 5), True),
  'ia3': ('ia3()', (7, 5), True),
  # A second form of a registered method: the key is not a registry name.
  'ia3/feedforward': ('ia3(feedforward=True)', (7, 5), True),
  'ssl': ('ssl()', (7, 5), True),
  'ssb': ('ssb()', (7, 5), True),
  'full': ('full()', (7, 5), True),
  'bitfit': ('bitfit()', (5,), True),
  # Reconstruction and combination (SVD-based).
  'sam_parser': ('sam_parser()', (7, 5), True),
  'pissa': ('pissa(rank=3, alpha=6)', (7, 5), True),
  'milora': ('milora(rank=3, alpha=6)', (7, 5), True),
  'svdiff': ('svdiff()', (7, 5), True),
  'spectral_adapter': ('spectral_adapter(rank=3, alpha=6)', (7, 5), True),
  'dora': ('dora(rank=3, alpha=6)', (7, 5), True),
  'ln_tuning': ('ln_tuning()', (5,), True),
  # Selective (the SAM paper): k of the 35 entries.
  'sparse': ('sparse(k=6)', (7, 5), True),
  # Projection-based and random baselines of the SAM paper (alpha_init=0.8:
  # at the default 5 the evaluation gate saturates and α gets no gradient).
  'diff_pruning': ('diff_pruning(p=0.2, alpha_init=0.8)', (7, 5), True),
  'child_pruning': ('child_pruning(p=0.2)', (7, 5), True),
  'mixout': ('mixout(p=0.3)', (7, 5), True),
  # Extension: the low-rank family.
  'adalora': ('adalora(rank=3, alpha=6)', (7, 5), True),
  'flora': ('flora(rank=3, alpha=6)', (7, 5), True),
  'moslora': ('moslora(rank=3, alpha=6)', (7, 5), True),
  'trilora': ('trilora(rank=3, alpha=6)', (7, 5), True),
  'liera': ('liera(rank=3, alpha=3)', (7, 5), True),
  'vera': ('vera(rank=4)', (7, 5), True),
  'vera/stored': ('vera(rank=4, shared_shape=(9, 6))', (7, 5), True),
  'fourierft': ('fourierft(n_frequency=6, scaling=2.0)', (7, 5), False),
  'parallel_adapter': ('parallel_adapter(rank=3)', (7, 5), True),
  # UniPELT's gated LoRA: linear form only, the gate reads x.
  'gated_lora': ('gated_lora(rank=3)', (7, 5), True),
  'loha': ('loha(rank=2, alpha=4)', (7, 5), True),
  'lokr': ('lokr(rank=2, alpha=4)', (12, 8), True),
  'compacter': ('compacter(reduction_factor=2, n=2)', (8, 6), True),
  'intrinsic_said': ('intrinsic_said(dim=4)', (7, 5), True),
  # Orthogonal.
  'oft': ('oft(block_size=3)', (6, 5), True),
  'boft': ('boft(block_size=2, n_butterfly_factor=2)', (8, 5), True),
  # With training-time schedules (peft_jax.schedules).
  'lora_dash': ('lora_dash(rank=2, alpha=4, n_directions=2)', (7, 5), True),
  'flexlora': ('flexlora(rank=2, alpha=4, max_rank=3)', (7, 5), True),
}

EMBEDDINGS = (
  jax.ShapeDtypeStruct((2, 5, 12), jnp.float32),
  jax.ShapeDtypeStruct((2, 5), jnp.int32),
)
HIDDEN = jax.ShapeDtypeStruct((2, 5, 12), jnp.float32)
# An attention_kv value: keys, values (b, s, h, d_h) and a mask bias (b, 1, 1, s).
KV = pj.AttentionKV(
  keys=jax.ShapeDtypeStruct((2, 5, 3, 4), jnp.float32),
  values=jax.ShapeDtypeStruct((2, 5, 3, 4), jnp.float32),
  mask_bias=jax.ShapeDtypeStruct((2, 1, 1, 5), jnp.float32),
  inputs=jax.ShapeDtypeStruct((2, 5, 12), jnp.float32),
)
KV_OUT = ((2, 8, 3, 4), (2, 8, 3, 4), (2, 1, 1, 8), (2, 5, 12))
# An adaption_prompt value: the placeholder (prompt (0, d), gate ()).
ADAPTION = (
  jax.ShapeDtypeStruct((0, 12), jnp.float32),
  jax.ShapeDtypeStruct((), jnp.float32),
)
# name -> (spec, value at the hook point, output shapes for that value)
ACTIVATION_CASES = {
  'prompt_tuning': ('prompt_tuning(length=3)', EMBEDDINGS, ((2, 8, 12), (2, 8))),
  'p_tuning': ('p_tuning(length=3, hidden=5)', EMBEDDINGS, ((2, 8, 12), (2, 8))),
  'p_tuning/lstm': (
    "p_tuning(length=3, encoder='lstm', hidden=5)",
    EMBEDDINGS,
    ((2, 8, 12), (2, 8)),
  ),
  'houlsby': ('houlsby(reduction_factor=4)', HIDDEN, (2, 5, 12)),
  'ia3_activations': ('ia3_activations()', HIDDEN, (2, 5, 12)),
  'pfeiffer': ('pfeiffer(reduction_factor=4)', HIDDEN, (2, 5, 12)),
  'pfeiffer/gated': ('pfeiffer(reduction_factor=4, gated=True)', HIDDEN, (2, 5, 12)),
  'scaled_parallel': (
    'scaled_parallel(reduction_factor=4, learned_scale=True)',
    (HIDDEN, HIDDEN),
    ((2, 5, 12), (2, 5, 12)),
  ),
  # The reparametrised prefix: per-point heads plus one shared MLP.
  'prefix_tuning': ('prefix_tuning(length=3, bottleneck=5)', KV, KV_OUT),
  # UniPELT's gated flat prefix: the gate reads AttentionKV.inputs.
  'prefix_tuning/gated': (
    'prefix_tuning(length=3, bottleneck=None, gated=True)',
    KV,
    KV_OUT,
  ),
  # LLaMA-Adapter: the point returns (prompt (l, d), gate ()).
  'adaption_prompt': ('adaption_prompt(length=3)', ADAPTION, ((3, 12), ())),
  # LPHM bottleneck: per-point factors plus one shared rule tensor A.
  'compacter_adapter': (
    'compacter_adapter(reduction_factor=2, n=2)',
    HIDDEN,
    (2, 5, 12),
  ),
}

# Trainable leaves that are inert until a schedule acts: LoRA-Dash's d gets
# zero gradient until lora_dash_schedule selects its directions.
INACTIVE_UNTIL_SCHEDULED = {'lora_dash': ('d',)}
# SVD-initialised methods reproduce w only up to float32 SVD round-off.
SVD_METHODS = ('pissa', 'milora', 'sam_parser', 'svdiff', 'spectral_adapter')


def names_where(predicate):
  return [n for n in sorted(CASES) if predicate(pj.get(CASES[n][0]))]


# `make test` runs the battery on every case; the fast suite (`make
# test-fast`) runs it on these, one or two per kind of implementation
# (additive low-rank, rescaled, rotated, Kronecker, SVD-initialised, copied,
# masked, gated, shared-projection, spectral; soft prompts (p_tuning's encoder
# in `make test`), bottlenecks, gates on activations) and marks the other
# cases slow: the repetition, not the coverage, is what the fast suite
# leaves out.
FAST = {
  'lora',
  'dora',
  'adalora',
  'ia3/feedforward',
  'oft',
  'lokr',
  'pissa',
  'full',
  'bitfit',
  'sparse',
  'diff_pruning',
  'gated_lora',
  'vera/stored',
  'fourierft',
  'prompt_tuning',
  'prefix_tuning/gated',
  'houlsby',
}


def cases(names):
  """``names`` as parameters, those outside ``FAST`` marked slow."""
  return references.slow_unless(names, FAST)


MERGEABLE = names_where(lambda a: a.mergeable)
FACTORED = names_where(lambda a: a.linear is not None)
REGULARIZED = names_where(lambda a: a.regularizer is not None)


def perturbed(params, key):
  """Parameters moved away from their init (so checks are not trivial)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  moved = [
    t + 0.3 * jax.random.normal(k, t.shape, t.dtype)
    for t, k in zip(leaves, keys, strict=True)
  ]
  return treedef.unflatten(moved)


class Setup(NamedTuple):
  adapter: pj.Adapter
  w: jax.Array
  params0: object
  buffers: object
  params: object  # perturbed


def setup(name, dtype=jnp.float32, seed=0) -> Setup:
  spec, shape, _ = CASES[name]
  adapter = pj.get(spec)
  kw, ki, kp = jax.random.split(jax.random.key(seed), 3)
  w = jax.random.normal(kw, shape, jnp.float32).astype(dtype)
  params0, buffers = adapter.init(ki, w)
  return Setup(adapter, w, params0, buffers, perturbed(params0, kp))


def inputs(w, batch, seed):
  return jax.random.normal(jax.random.key(seed), (*batch, w.shape[0]))


def forward(s: Setup, x, params):
  """``x @ w'``: the merged weight if mergeable, else the factored form."""
  if s.adapter.mergeable:
    return x @ s.adapter.apply(s.w, params, s.buffers)
  return s.adapter.linear.factored(x, s.w, params, s.buffers)


def is_typed(params) -> bool:
  return isinstance(params, (tuple, jax.Array)) and not isinstance(params, dict)


def method_name(case: str) -> str:
  """The registry name of a case's method (from its spec)."""
  return registry.parse((CASES.get(case) or ACTIVATION_CASES[case])[0])[0]


def test_every_method_has_a_case():
  assert sorted({method_name(n) for n in [*CASES, *ACTIVATION_CASES]}) == pj.names()


@pytest.mark.parametrize('name', sorted([*CASES, *ACTIVATION_CASES]))
def test_registry_and_factory_give_the_same_adapter_and_names_round_trip(name):
  spec = (CASES.get(name) or ACTIVATION_CASES[name])[0]
  method, args, kwargs = registry.parse(spec)
  adapter = pj.get(spec)
  assert getattr(pj, method)(*args, **kwargs) is adapter
  assert adapter.name.startswith(f'{method}(')
  assert pj.get(adapter.name) is adapter
  rebuilt = registry._METHODS[method](*args, **kwargs)
  assert rebuilt.name == adapter.name


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('name', cases(MERGEABLE))
def test_apply_keeps_shape_and_dtype_and_jits(name, dtype):
  s = setup(name, dtype)
  eager = s.adapter.apply(s.w, s.params, s.buffers)
  jitted = jax.jit(s.adapter.apply)(s.w, s.params, s.buffers)
  assert eager.shape == s.w.shape and eager.dtype == s.w.dtype
  np.testing.assert_allclose(
    np.asarray(eager, np.float32), np.asarray(jitted, np.float32), rtol=1e-6, atol=1e-6
  )


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('name', cases([n for n in MERGEABLE if CASES[n][2]]))
def test_identity_at_init(name, dtype):
  s = setup(name, dtype)
  exact = name not in SVD_METHODS
  atol = 0 if exact else (1e-2 if dtype == jnp.bfloat16 else 1e-5)
  np.testing.assert_allclose(
    np.asarray(s.adapter.apply(s.w, s.params0, s.buffers), np.float32),
    np.asarray(s.w, np.float32),
    atol=atol,
  )


@pytest.mark.parametrize('name', cases([n for n in FACTORED if CASES[n][2]]))
def test_factored_identity_at_init(name):
  s = setup(name)
  x = inputs(s.w, (3,), 5)
  np.testing.assert_allclose(
    s.adapter.linear.factored(x, s.w, s.params0, s.buffers),
    x @ s.w,
    rtol=1e-5,
    atol=1e-5,
  )


@pytest.mark.parametrize('name', cases(sorted(CASES)))
def test_params_are_typed_and_counted_by_the_formula(name):
  s = setup(name)
  assert is_typed(s.params0), type(s.params0)
  assert s.buffers is None or isinstance(s.buffers, tuple), type(s.buffers)
  assert s.adapter.num_params is not None, f'{name} declares no count formula'
  assert pj.count(s.params0) == s.adapter.num_params(s.w.shape)


@pytest.mark.parametrize('name', cases(sorted(CASES)))
def test_init_is_deterministic_and_jittable(name):
  s = setup(name)
  key = jax.random.key(3)
  a = s.adapter.init(key, s.w)
  b = jax.jit(s.adapter.init)(key, s.w)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b
  )


@pytest.mark.parametrize('name', cases([n for n in FACTORED if n in MERGEABLE]))
def test_factored_equals_merged_forward_and_gradients(name):
  s = setup(name)
  x = inputs(s.w, (4, 2), 9)
  target = jax.random.normal(jax.random.key(10), (4, 2, s.w.shape[1]))

  def merged_loss(params, x):
    return jnp.sum(jnp.tanh(x @ s.adapter.apply(s.w, params, s.buffers)) * target)

  def factored_loss(params, x):
    y = s.adapter.linear.factored(x, s.w, params, s.buffers)
    return jnp.sum(jnp.tanh(y) * target)

  np.testing.assert_allclose(
    s.adapter.linear.factored(x, s.w, s.params, s.buffers),
    x @ s.adapter.apply(s.w, s.params, s.buffers),
    rtol=1e-5,
    atol=1e-5,
  )
  grad_merged = jax.jit(jax.grad(merged_loss, argnums=(0, 1)))(s.params, x)
  grad_factored = jax.jit(jax.grad(factored_loss, argnums=(0, 1)))(s.params, x)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
    grad_merged,
    grad_factored,
  )


@pytest.mark.parametrize('name', cases(names_where(lambda a: a.unapply is not None)))
def test_unapply_inverts_apply(name):
  s = setup(name)
  merged = s.adapter.apply(s.w, s.params, s.buffers)
  np.testing.assert_allclose(
    s.adapter.unapply(merged, s.params, s.buffers), s.w, rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize('name', cases(names_where(lambda a: not a.mergeable)))
def test_non_mergeable_methods_refuse_to_merge(name):
  spec, shape, _ = CASES[name]
  tree = pj.by_rules([('leaf', spec)])
  frozen = {'leaf': jnp.ones(shape)}
  params, buffers = tree.init(jax.random.key(0), frozen)
  with pytest.raises(pj.PeftError, match='not mergeable'):
    pj.merge(tree, frozen, params, buffers)


@pytest.mark.parametrize('name', cases(sorted(CASES)))
def test_gradient_reaches_every_trainable_leaf(name):
  s = setup(name)
  if s.w.ndim == 2:
    x = inputs(s.w, (6,), 4)
    out = lambda p: forward(s, x, p)
  else:
    out = lambda p: s.adapter.apply(s.w, p, s.buffers)
  probe = jax.random.normal(jax.random.key(8), jax.eval_shape(out, s.params).shape)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(out(p)) * probe)))(s.params)
  assert jax.tree.structure(grads) == jax.tree.structure(s.params)
  inert = INACTIVE_UNTIL_SCHEDULED.get(name, ())
  for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
    field = jax.tree_util.keystr(path, simple=True)
    assert np.all(np.isfinite(leaf)), field
    if field in inert:
      np.testing.assert_array_equal(leaf, 0, err_msg=field)
    else:
      assert np.any(leaf != 0), field


@pytest.mark.parametrize('name', cases(sorted(CASES)))
def test_works_through_by_rules_and_adapted(name):
  spec, shape, _ = CASES[name]
  frozen = {'block': {'leaf': jnp.ones(shape)}, 'other': jnp.ones(shape)}
  tree = pj.by_rules([('block/leaf', spec)])
  params, buffers = tree.init(jax.random.key(0), frozen)
  if tree.mergeable:
    out = jax.jit(tree.apply)(frozen, params, buffers)
    assert jax.tree.structure(out) == jax.tree.structure(frozen)
    np.testing.assert_array_equal(out['other'], frozen['other'])
  if len(shape) == 2:
    fn = lambda weights, x: x @ weights['block']['leaf']
    x = jnp.ones((3, shape[0]))
    for factored in (False, True):
      y = jax.jit(pj.adapted(tree, fn, factored=factored))(frozen, params, buffers, x)
      assert y.shape == (3, shape[1])


@pytest.mark.parametrize('name', cases(names_where(lambda a: a.factors is not None)))
def test_factors_are_low_rank_down_and_up(name):
  s = setup(name)
  down, up = s.adapter.factors(s.params0, s.buffers)
  assert down.shape[0] == s.w.shape[0] and up.shape[1] == s.w.shape[1]
  assert down.shape[1] == up.shape[0]


@pytest.mark.parametrize('name', cases(sorted(CASES)))
def test_init_arrays_share_no_buffer(name):
  """Donating the train state must never see one buffer twice (or free w)."""
  s = setup(name)
  leaves = jax.tree.leaves((s.params0, s.buffers))
  pointers = [leaf.unsafe_buffer_pointer() for leaf in leaves]
  pointers.append(s.w.unsafe_buffer_pointer())
  assert len(set(pointers)) == len(pointers)


@pytest.mark.parametrize('name', cases(sorted(CASES)))
def test_new_parameter_values_do_not_retrace(name):
  s = setup(name)
  traces = []

  def run(w, params, buffers, x):
    traces.append(None)  # Runs once per trace, not per call.
    if s.adapter.mergeable:
      return s.adapter.apply(w, params, buffers)
    return s.adapter.linear.factored(x, w, params, buffers)

  run = jax.jit(run)
  x = inputs(s.w, (2,), 1)
  first = run(s.w, s.params0, s.buffers, x)
  second = run(s.w, s.params, s.buffers, x)
  assert len(traces) == 1
  assert not np.allclose(first, second)  # New values did reach the program.


@pytest.mark.parametrize('name', cases(REGULARIZED))
def test_regulariser_terms_are_finite_non_negative_and_combined(name):
  s = setup(name)
  terms, grads = jax.jit(
    jax.value_and_grad(lambda p: s.adapter.regularizer(s.w, p, s.buffers))
  )(s.params)
  assert terms.shape == () and terms.dtype == jnp.float32
  assert np.isfinite(terms) and terms >= 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert any(np.any(g != 0) for g in jax.tree.leaves(grads))
  # Two leaves, one stacked over 2 layers: 3 matrices; 'mean' averages them.
  spec = CASES[name][0]
  frozen = {'one': jnp.asarray(s.w), 'two': jnp.stack([s.w, 2 * s.w])}
  rules = [('one', spec), ('two', f'stacked({spec!r})')]
  total = {}
  for reduction in ('sum', 'mean'):
    tree = pj.by_rules(rules, regularizer=reduction)
    params, buffers = tree.init(jax.random.key(1), frozen)
    params = perturbed(params, jax.random.key(2))
    total[reduction] = tree.regularizer(frozen, params, buffers)
  np.testing.assert_allclose(total['mean'], total['sum'] / 3, rtol=1e-6)


def test_every_regularised_method_is_in_the_regulariser_row():
  assert {'adalora', 'flexlora'} <= set(REGULARIZED)


@pytest.mark.parametrize('name', cases(sorted(CASES)))
def test_sharded_jit_equals_one_device(name):
  """The batch split over 8 devices, w and θ replicated: same output and grads."""
  s = setup(name)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
  if s.w.ndim == 2:
    x = inputs(s.w, (8, 3), 6)
    loss = lambda p, x: jnp.sum(jnp.tanh(forward(s, x, p)))
  else:  # Bias and norm leaves: x is a batch of activations to shift.
    x = jax.random.normal(jax.random.key(6), (8, *s.w.shape))
    loss = lambda p, x: jnp.sum(jnp.tanh(x + s.adapter.apply(s.w, p, s.buffers)))
  fn = jax.jit(jax.value_and_grad(loss))
  single = fn(s.params, x)
  sharded = fn(s.params, jax.device_put(x, NamedSharding(mesh, P('data'))))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
    single,
    sharded,
  )


# ---------------------------------------------------------------------------
# Activation methods.


def activation_setup(name, seed=0):
  """``(adapter, value, params0, buffers, params)``; for a method with
  shared parameters, ``params`` are ``(own, shared)`` pairs (``run`` derives
  what ``apply`` takes)."""
  spec, value, _ = ACTIVATION_CASES[name]
  adapter = pj.get(spec)
  params0, buffers = adapter.init(jax.random.key(seed), value)
  if adapter.shared is not None:
    params0 = (params0, adapter.shared.init(jax.random.key(seed + 3), value))
  params = perturbed(params0, jax.random.key(seed + 1))
  concrete = jax.tree.map(
    lambda v: (
      jnp.ones(v.shape, v.dtype)
      if v.dtype == jnp.int32
      else jax.random.normal(jax.random.key(seed + 2), v.shape, v.dtype)
    ),
    value,
  )
  return adapter, concrete, params0, buffers, params


def run(adapter, value, params, buffers):
  """``apply`` at one point, deriving the parameters from ``(own, shared)``."""
  if adapter.shared is not None:
    own, shared = params
    params = adapter.shared.derive(shared, own)
  return adapter.apply(value, params, buffers)


def declared_count(adapter, value) -> int:
  shared = adapter.shared.num_params(value) if adapter.shared else 0
  return adapter.num_params(value) + shared


@pytest.mark.parametrize('name', cases(sorted(ACTIVATION_CASES)))
def test_activation_apply_shapes_dtype_count_and_jit(name):
  adapter, value, params0, buffers, params = activation_setup(name)
  assert is_typed(params0)
  assert pj.count(params0) == declared_count(adapter, ACTIVATION_CASES[name][1])
  out = run(adapter, value, params, buffers)
  jitted = jax.jit(run, static_argnums=0)(adapter, value, params, buffers)
  want = ACTIVATION_CASES[name][2]
  assert jax.tree.map(jnp.shape, out) == want
  assert jax.tree.map(lambda x: x.dtype, out) == jax.tree.map(lambda x: x.dtype, value)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), out, jitted
  )


@pytest.mark.parametrize('name', cases(sorted(ACTIVATION_CASES)))
def test_activation_gradient_reaches_every_parameter_without_retrace(name):
  adapter, value, params0, buffers, params = activation_setup(name)
  traces = []

  def loss(p):
    traces.append(None)
    out = run(adapter, value, p, buffers)
    floats = [x for x in jax.tree.leaves(out) if jnp.issubdtype(x.dtype, jnp.floating)]
    return sum(jnp.sum(jnp.sin(x)) for x in floats)

  grad = jax.jit(jax.grad(loss))
  g0, g1 = grad(params0), grad(params)
  assert len(traces) == 1
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
    assert np.all(np.isfinite(b)) and np.any(b != 0)
    assert not np.allclose(a, b)


class HookedBlock(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    y = pj.hook_point(self, 'output', nn.Dense(12, name='dense')(h))
    _, y = pj.hook_point(self, 'block', (h, y))
    kv = h.reshape(*h.shape[:2], 3, 4)
    k, v, _, _ = pj.hook_point(
      self, 'kv', pj.AttentionKV(kv, kv, jnp.zeros((h.shape[0], 1, 1, h.shape[1])), h)
    )
    y += jnp.mean(k * v, axis=1).reshape(h.shape[0], 1, 12)  # keys may be prepended
    prompt, gate = pj.hook_point(
      self, 'adaption_prompt', (jnp.zeros((0, 12)), jnp.zeros(()))
    )
    y += gate * jnp.sum(prompt, axis=0)  # LLaMA-Adapter's branch, much simplified
    return h + y, None


class HookedModel(nn.Module):
  """Embeddings with a hook, then two scanned layers with four hooks each:
  ``output`` (the sub-layer output), ``block`` (its input and output),
  ``kv`` (keys, values and a mask bias, as ``attention_kv``) and
  ``adaption_prompt`` (a zero-length prompt and a gate, as Llama's)."""

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(20, 12, name='embed')(ids)
    x, mask = pj.hook_point(
      self, 'input_embeddings', (x, jnp.ones(ids.shape, jnp.int32))
    )
    layers = nn.scan(
      HookedBlock, variable_axes={'params': 0}, split_rngs={'params': True}, length=2
    )
    x, _ = layers(name='layers')(x, None)
    return jnp.sum(x * mask[..., None], axis=1)


# The hook point of HookedModel each activation method acts at, if not
# 'layers/output'.
POINTS = {
  'prompt_tuning': 'input_embeddings',
  'p_tuning': 'input_embeddings',
  'p_tuning/lstm': 'input_embeddings',
  'scaled_parallel': 'layers/block',
  'prefix_tuning': 'layers/kv',
  'prefix_tuning/gated': 'layers/kv',
  'adaption_prompt': 'layers/adaption_prompt',
}


@functools.cache
def hooked_model():
  """``(model, ids, frozen, hooks)``: one init for every method's test."""
  model = HookedModel()
  ids = jnp.arange(10).reshape(2, 5)
  frozen = jax.jit(model.init)(jax.random.key(0), ids)['params']
  return model, ids, frozen, pj.hook_points(model, ids)


@pytest.mark.parametrize('name', cases(sorted(ACTIVATION_CASES)))
def test_activation_methods_run_through_by_rules_on_a_scanned_model(name):
  spec = ACTIVATION_CASES[name][0]
  point = POINTS.get(name, 'layers/output')
  model, ids, frozen, hooks = hooked_model()
  assert hooks['layers/output'].stack == (2,)
  tree = pj.by_rules([(point, spec)])
  params, buffers = tree.init(jax.random.key(1), frozen, hooks)
  stack = hooks[point].stack
  adapter = pj.get(spec)
  own = {k: v for k, v in params.items() if k != '@shared'}
  for leaf, one in zip(
    jax.tree.leaves(own),
    jax.tree.leaves(adapter.init(jax.random.key(0), hooks[point].value)[0]),
    strict=True,
  ):
    assert leaf.shape == (*stack, *one.shape)
  if adapter.shared is not None:  # One copy, no layer axis.
    (copy,) = params['@shared'].values()
    one = adapter.shared.init(jax.random.key(0), hooks[point].value)
    assert jax.tree.map(jnp.shape, copy) == jax.tree.map(jnp.shape, one)
  fn = lambda w, ids: model.apply({'params': w}, ids)
  for factored in (False, True):
    out = jax.jit(pj.adapted(tree, fn, factored=factored))(frozen, params, buffers, ids)
    assert out.shape == (2, 12)


def test_fast_cases_exist():
  assert set(CASES) | set(ACTIVATION_CASES) >= FAST
