"""FlexLoRA: the masked AdaLoRA layer, entropies, prune/grow, kept optimizer state."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_jax as pj
from peft_jax._src.schedules import reset_moments
from peft_jax.methods.flexlora import FlexLoraBuffers, FlexLoraParams, flexlora
from peft_jax.methods.flexlora_schedule import cubic_budget, entropy, flexlora_schedule
from tests.methods.spec_checks import assert_factored_and_inverse
from tests.references import compiled_programs
from tests.schedules.wrapping import KINDS, map_params_like, wrapped

D_IN, D_OUT = 9, 6


def random_theta(seed, active):
  rng = np.random.default_rng(seed)
  n_slots = len(active)
  params = FlexLoraParams(
    a=rng.normal(size=(D_IN, n_slots)).astype(np.float32),
    b=rng.normal(size=(n_slots, D_OUT)).astype(np.float32),
    e=rng.normal(size=n_slots).astype(np.float32),
  )
  return params, FlexLoraBuffers(active=np.array(active, bool))


@pytest.mark.parametrize(
  'rank,alpha,active',
  [
    (3, 6.0, [1, 1, 1, 0, 0]),
    (3, 6.0, [1, 0, 1, 1, 1]),
    (2, 0.0, [0, 1, 0, 0]),
    (1, 2.0, [1]),
  ],
)
def test_apply_and_factored_match_spec(rank, alpha, active):
  w = np.random.default_rng(1).normal(size=(D_IN, D_OUT)).astype(np.float32)
  params, buffers = random_theta(2, active)
  # Spec: h = W x + (α/(r₀+1e-5))·B diag(e) A x over the active triplets, with
  # r₀ the initial rank even after the active count changed (α ≤ 0 → r₀).
  W, A, B = (np.float64(m).T for m in (w, params.a, params.b))
  keep = np.flatnonzero(active)
  s = (alpha if alpha > 0 else rank) / (rank + 1e-5)
  e = np.diag(np.float64(params.e)[keep])
  expected = W + s * B[:, keep] @ e @ A[keep]
  adapter = flexlora(rank, alpha, max_rank=len(active))
  np.testing.assert_allclose(
    adapter.apply(w, params, buffers).T, expected, rtol=1e-5, atol=1e-5
  )
  x = np.random.default_rng(3).normal(size=(4, D_IN))
  assert_factored_and_inverse(adapter, w, params, expected, x, buffers)
  # The effective factors: inactive slots zeroed, s·down·diag(e)·up = w' − w.
  down, up = adapter.factors(params, buffers)
  np.testing.assert_array_equal(down[:, keep], params.a[:, keep])
  np.testing.assert_array_equal(up[keep], params.b[keep])
  inactive = np.flatnonzero(np.logical_not(active))
  np.testing.assert_array_equal(down[:, inactive], 0)
  np.testing.assert_array_equal(up[inactive], 0)


def test_init_is_normal_factors_zero_e_and_the_first_slots_active():
  w = np.random.default_rng(1).normal(size=(512, 256)).astype(np.float32)
  adapter = flexlora(8, max_rank=12)
  params, buffers = adapter.init(jax.random.key(0), w)
  assert isinstance(params, FlexLoraParams) and isinstance(buffers, FlexLoraBuffers)
  assert params.a.shape == (512, 12) and params.b.shape == (12, 256)
  for x in (params.a, params.b):
    np.testing.assert_allclose(np.std(np.asarray(x, np.float64)), 0.02, rtol=0.03)
  np.testing.assert_array_equal(params.e, 0)
  assert buffers.active.dtype == bool
  np.testing.assert_array_equal(buffers.active, [True] * 8 + [False] * 4)
  np.testing.assert_array_equal(adapter.apply(w, params, buffers), w)


@pytest.mark.parametrize(
  'rank,max_rank,shape,slots',
  [(3, None, (9, 6), 6), (4, None, (9, 6), 6), (2, None, (9, 6), 4), (3, 4, (9, 6), 4)],
)
def test_count_is_every_allocated_slot(rank, max_rank, shape, slots):
  adapter = flexlora(rank, max_rank=max_rank)
  params, buffers = adapter.init(jax.random.key(0), jnp.ones(shape))
  assert params.e.shape == buffers.active.shape == (slots,)
  # Inactive slots are allocated and trainable-but-masked: they are counted.
  assert pj.count(params) == adapter.num_params(shape) == slots * (sum(shape) + 1)


@pytest.mark.parametrize('form', ['mean', 'squared'])
def test_orthogonality_penalty_covers_the_active_slots_only(form):
  active = [1, 0, 1, 1, 0]
  params, buffers = random_theta(4, active)
  adapter = flexlora(3, max_rank=5, reg_orth_coef=0.3, reg_form=form)
  # Spec layout over the r = 3 active triplets: A = a[:, I]ᵀ, B = b[I]ᵀ.
  keep = np.flatnonzero(active)
  A, B = np.float64(params.a[:, keep]).T, np.float64(params.b[keep]).T
  norms = [np.linalg.norm(A @ A.T - np.eye(3)), np.linalg.norm(B.T @ B - np.eye(3))]
  penalty = sum(n**2 for n in norms) if form == 'squared' else np.mean(norms)
  w = jnp.zeros((D_IN, D_OUT))
  got = adapter.regularizer(w, params, buffers)
  assert got.shape == ()  # One term per matrix.
  np.testing.assert_allclose(got, 0.3 * penalty, rtol=1e-5)
  grads = jax.grad(adapter.regularizer, argnums=1)(w, params, buffers)
  inactive = np.array([1, 4])
  np.testing.assert_array_equal(grads.a[:, inactive], 0)
  np.testing.assert_array_equal(grads.b[inactive], 0)
  assert np.all(grads.a[:, keep] != 0)
  assert flexlora(3, reg_orth_coef=0).regularizer is None


def test_the_tree_averages_the_penalty_terms_of_stacked_layers():
  """'mean' (AdaLoRA's code): γ/(2L) Σ ‖·‖_F over the 2L residuals of L matrices."""
  layers = [random_theta(5, [1, 1, 0, 1]), random_theta(6, [0, 1, 1, 0])]
  norms = []
  for params, buffers in layers:
    keep = np.flatnonzero(buffers.active)
    A, B = np.float64(params.a[:, keep]).T, np.float64(params.b[keep]).T
    eye = np.eye(len(keep))
    norms += [np.linalg.norm(A @ A.T - eye), np.linalg.norm(B.T @ B - eye)]
  stack = lambda *x: np.stack(x)
  params, buffers = (jax.tree.map(stack, *parts) for parts in zip(*layers, strict=True))
  frozen = {'s': {'kernel': jnp.zeros((2, D_IN, D_OUT))}}
  spec = "stacked('flexlora(3, max_rank=4, reg_orth_coef=0.3)')"
  tree = pj.by_rules([('s/kernel', spec)])
  nest = lambda x: {'s': {'kernel': x}}
  np.testing.assert_allclose(
    tree.regularizer(frozen, nest(params), nest(buffers)),
    0.3 * np.mean(norms),
    rtol=1e-5,
  )


def test_entropy_matches_hand_computation():
  # p = [9/25, 16/25, 0] over r = 3 active slots (the 4th is inactive).
  h = -(0.36 * math.log(0.36 + 1e-8) + 0.64 * math.log(0.64 + 1e-8)) / math.log(3)
  mask = lambda *m: jnp.array(m, bool)
  got = entropy(jnp.array([3.0, -4.0, 0.0, 7.0]), mask(1, 1, 1, 0))
  np.testing.assert_allclose(got, h, rtol=1e-6)
  uniform = entropy(jnp.array([2.0, -2.0, 2.0, 9.0]), mask(1, 1, 1, 0))
  np.testing.assert_allclose(uniform, 1.0, rtol=1e-6)
  single = entropy(jnp.array([2.0, 5.0]), mask(1, 0))  # r = 1: no / log 1.
  np.testing.assert_allclose(single, 0.0, atol=1e-7)
  np.testing.assert_array_equal(entropy(jnp.zeros(3), mask(1, 1, 1)), 0.0)


@pytest.mark.parametrize(
  'step,expected', [(0, 4), (5, 4), (7, 3), (8, 2), (9, 1), (10, 0), (12, 0)]
)
def test_cubic_budget(step, expected):
  # round(4·(1 − p³)), p = t/10: 3.5 → 4 (half to even, as Python), 2.628,
  # 1.952, 1.084.
  got = cubic_budget(step, budget=4, total_steps=20, init_warmup=0, final_warmup=10)
  assert int(got) == expected


# T = 20, t_i = 2, t_f = 5, Δ = 3: events at t = 5, 8, 11, 14.
SCHEDULE = dict(total_steps=20, init_warmup=2, final_warmup=5, interval=3)
LEAVES = {  # name: (active, e)
  'l0': ([1, 1, 1, 0], [1.0, -1.0, 1.0, 0.0]),  # H = 1, the highest; can grow.
  'l1': ([1, 1, 1, 0], [5.0, 0.1, -0.2, 0.0]),  # lowest H: prunes first.
  'l2': ([1, 0, 0, 0], [3.0, 0.0, 0.0, 0.0]),  # r = 1: never pruned or grown.
  'l3': ([1, 1, 1, 1], [1.0, 1.0, 1.0, 0.9]),  # H just below 1; full.
}


SPEC = 'flexlora(rank=3, alpha=3.0, max_rank=4)'
OTHERS = [('other/kernel', 'lora(rank=2)')]


@functools.cache
def problem():
  """Four flexlora leaves (R = 4) and one lora leaf (not governed)."""
  frozen = {name: {'kernel': jnp.ones((D_IN, D_OUT))} for name in LEAVES}
  frozen['other'] = {'kernel': jnp.ones((D_IN, 4))}
  adapter = pj.by_rules([('l./kernel', SPEC), *OTHERS])
  return adapter, frozen


def four_leaves():
  adapter, frozen = problem()
  params, buffers = adapter.init(jax.random.key(0), frozen)
  for name, (active, e) in LEAVES.items():
    params[name]['kernel'] = params[name]['kernel']._replace(e=jnp.array(e))
    buffers[name]['kernel'] = FlexLoraBuffers(active=jnp.array(active, bool))
  return adapter, frozen, params, buffers


@functools.cache
def jitted_update(budget, prune_by):
  """One compiled update per schedule, shared by the tests (steps are traced)."""
  schedule = flexlora_schedule(
    problem()[0], **SCHEDULE, budget=budget, prune_by=prune_by
  )
  return jax.jit(schedule.update)


def filled(opt_state, seed):
  """``opt_state`` with every float array replaced by random values."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: (
      rng.normal(size=x.shape).astype(x.dtype)
      if jnp.issubdtype(x.dtype, jnp.floating)
      else x
    ),
    opt_state,
  )


def random_adam_state(params):
  return filled(optax.adam(1e-3).init(params), 1)


def active_of(buffers, name):
  return buffers[name]['kernel'].active


@pytest.mark.parametrize(
  'budget,prune_by,active',
  [
    # k = min(1, #{r>1} = 3, #{1<r<R} = 2) = 1: l1 drops its argmin e (slot 2,
    # e = −0.2), l0 activates its free slot 3.
    (1, 'signed', {'l0': [1, 1, 1, 1], 'l1': [1, 1, 0, 0], 'l3': [1, 1, 1, 1]}),
    # The paper's reading: argmin |e| is slot 1 (0.1).
    (1, 'abs', {'l0': [1, 1, 1, 1], 'l1': [1, 0, 1, 0], 'l3': [1, 1, 1, 1]}),
    # k = 2: prune l1 and l3 (slot 3, e = 0.9); grow l0 and l1 (l1 regrows
    # the slot it just dropped, its first free one).
    (2, 'signed', {'l0': [1, 1, 1, 1], 'l1': [1, 1, 1, 0], 'l3': [1, 1, 1, 0]}),
  ],
)
def test_event_prunes_lowest_and_grows_highest_entropy(budget, prune_by, active):
  _, frozen, params, buffers = four_leaves()
  opt_state = random_adam_state(params)
  out, out_buffers, _, _ = jitted_update(budget, prune_by)(
    (), frozen, params, buffers, params, opt_state, 5
  )
  for name in LEAVES:
    got = active_of(out_buffers, name)
    assert got.dtype == bool
    expected = active.get(name, LEAVES[name][0])
    np.testing.assert_array_equal(got, np.array(expected, bool), err_msg=name)
  total = lambda b: sum(int(jnp.sum(active_of(b, n))) for n in LEAVES)
  assert total(out_buffers) == total(buffers) == 11
  if budget == 2:  # The regrown slot is new: N(0, 1) factors and e = 0.
    leaf = out['l1']['kernel']
    assert leaf.e[2] == 0 and np.all(leaf.a[:, 2] != params['l1']['kernel'].a[:, 2])


def test_grow_has_zero_impact_and_prune_removes_one_triplet():
  adapter, frozen, params, buffers = four_leaves()
  opt_state = random_adam_state(params)
  out, out_buffers, _, _ = jitted_update(1, 'signed')(
    (), frozen, params, buffers, params, opt_state, 5
  )
  before = adapter.apply(frozen, params, buffers)
  after = adapter.apply(frozen, out, out_buffers)
  grown = out['l0']['kernel']
  assert np.all(grown.a[:, 3] != params['l0']['kernel'].a[:, 3])
  np.testing.assert_allclose(after['l0']['kernel'], before['l0']['kernel'], atol=1e-6)
  leaf = params['l1']['kernel']
  s = 3.0 / (3 + 1e-5)
  removed = s * leaf.e[2] * np.outer(leaf.a[:, 2], leaf.b[2])
  np.testing.assert_allclose(
    after['l1']['kernel'], before['l1']['kernel'] - removed, rtol=1e-5, atol=1e-5
  )


def test_nothing_happens_off_event_steps():
  _, frozen, params, buffers = four_leaves()
  for step in (2, 4, 6, 15, 17):
    opt_state = random_adam_state(params)
    out = jitted_update(2, 'signed')(
      (), frozen, params, buffers, params, opt_state, step
    )
    jax.tree.map(np.testing.assert_array_equal, out, (params, buffers, opt_state, ()))


def adam_state(opt_state):
  is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)
  (found,) = [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
  return found


def test_only_the_moments_of_touched_slots_are_reset():
  _, frozen, params, buffers = four_leaves()
  opt_state = random_adam_state(params)
  _, _, out, _ = jitted_update(1, 'signed')(
    (), frozen, params, buffers, params, opt_state, 5
  )
  before, after = adam_state(opt_state), adam_state(out)
  assert int(after.count) == int(before.count)
  dropped_or_grown = {'l0': 3, 'l1': 2}  # budget=1, signed: see above.
  for moment in ('mu', 'nu'):
    old, new = getattr(before, moment), getattr(after, moment)
    jax.tree.map(np.testing.assert_array_equal, new['other'], old['other'])
    for name in LEAVES:
      expected = jax.tree.map(np.array, old[name]['kernel'])
      if name in dropped_or_grown:
        slot = dropped_or_grown[name]
        expected.a[:, slot], expected.b[slot], expected.e[slot] = 0, 0, 0
      jax.tree.map(np.testing.assert_array_equal, new[name]['kernel'], expected)


@pytest.mark.parametrize(
  'optimizer,n_moments',
  [
    (optax.adamw(1e-3, weight_decay=0.1), 2),  # mu, nu
    (optax.amsgrad(1e-3), 3),  # mu, nu, nu_max
    (optax.sgd(1e-3, momentum=0.9), 1),  # trace
    (optax.lion(1e-3), 1),  # mu
  ],
  ids=['adamw', 'amsgrad', 'sgd_momentum', 'lion'],
)
def test_reset_moments_zeroes_touched_entries_of_every_moment(optimizer, n_moments):
  _, _, params, _ = four_leaves()
  opt_state = filled(optimizer.init(params), 2)
  slot = jnp.arange(4) == 1
  touched = {'l0/kernel/a': slot[None, :], 'l0/kernel/e': slot}
  out = reset_moments(opt_state, params, touched)
  per_parameter = lambda node: jax.tree.structure(node) == jax.tree.structure(params)
  moments = lambda state: [
    node
    for node in jax.tree.leaves(state, is_leaf=per_parameter)
    if per_parameter(node)
  ]
  assert len(moments(out)) == n_moments
  for old, new in zip(moments(opt_state), moments(out), strict=True):
    expected = jax.tree.map(np.array, old)
    expected['l0']['kernel'].a[:, 1] = 0
    expected['l0']['kernel'].e[1] = 0
    jax.tree.map(np.testing.assert_array_equal, new, expected)
  others = lambda state: [
    x for x in jax.tree.leaves(state, is_leaf=per_parameter) if not per_parameter(x)
  ]
  jax.tree.map(np.testing.assert_array_equal, others(out), others(opt_state))


@pytest.mark.parametrize(
  'kind,factored', [('plain', False), ('plain', True), ('stacked', False)]
)
def test_training_conserves_the_total_rank_and_compiles_once(kind, factored):
  adapter, frozen, params, buffers = four_leaves()
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  frozen = jax.tree.map(lambda w: normal(*w.shape) / 3, frozen)
  targets = {name: normal(8, w['kernel'].shape[1]) for name, w in frozen.items()}
  same = lambda tree: tree
  to = back = same
  if kind == 'stacked':
    adapter, frozen, to, back = wrapped(kind, SPEC, frozen, tuple(LEAVES), OTHERS)

  def loss_fn(weights, x, rng):  # One regression per leaf.
    del rng
    weights = back(weights)
    errors = [jnp.mean((x @ weights[n]['kernel'] - t) ** 2) for n, t in targets.items()]
    return sum(errors), {}

  optimizer = optax.adam(1e-2)
  schedule = flexlora_schedule(adapter, **SCHEDULE, budget=1)
  state = pj.TrainState.create(
    to(params),
    to(buffers),
    optimizer,
    jax.random.key(2),
    schedule=schedule,
    frozen=frozen,
  )
  step = jax.jit(
    pj.make_train_step(
      loss_fn, adapter, optimizer, factored=factored, schedule=schedule
    )
  )
  x = normal(8, D_IN)
  totals, fresh = [], []
  with compiled_programs() as compiled:
    for t in range(1, 17):
      state, metrics = step(state, frozen, x)
      assert np.isfinite(metrics['loss'])
      params, buffers = back(state.params), back(state.buffers)
      leaves = [params[n]['kernel'] for n in LEAVES]
      actives = [active_of(buffers, n) for n in LEAVES]
      totals.append(sum(int(active.sum()) for active in actives))
      # A slot grown at this update still has e = 0 (every other active e moved).
      if any(
        np.any(active & (leaf.e == 0))
        for leaf, active in zip(leaves, actives, strict=True)
      ):
        fresh.append(t)
  assert fresh == [5, 8, 11, 14]  # The event steps.
  assert totals == [11] * 16
  assert compiled.count('jit(step)') == 1, compiled


@pytest.mark.parametrize('kind', KINDS)
def test_wrapped_flexlora_is_governed_like_plain_leaves(kind):
  """mpc, a hand-built copy, matrix_view, and stacked (each layer one matrix)."""
  plain, frozen, params, buffers = four_leaves()
  wrap = wrapped(kind, SPEC, frozen, tuple(LEAVES), OTHERS)
  opt_state = random_adam_state(params)
  jax.tree.map(  # The shapes of the init (traced, not run).
    lambda x, y: np.testing.assert_array_equal(x.shape, y.shape),
    jax.eval_shape(wrap.adapter.init, jax.random.key(0), wrap.frozen),
    (wrap.to(params), wrap.to(buffers)),
  )
  schedule = flexlora_schedule(wrap.adapter, **SCHEDULE, budget=2)
  state = schedule.init(wrap.frozen, wrap.to(params), wrap.to(buffers))
  out_params, out_buffers, out_opt, _ = jax.jit(schedule.update)(
    state,
    wrap.frozen,
    wrap.to(params),
    wrap.to(buffers),
    wrap.to(params),
    map_params_like(wrap.to, opt_state, params),
    5,
  )
  out_opt = map_params_like(wrap.back, out_opt, out_params)
  out_params, out_buffers = wrap.back(out_params), wrap.back(out_buffers)
  # By hand (budget 2, see above): l1 and l3 prune, l0 and l1 grow.
  expected = {'l0': [1, 1, 1, 1], 'l1': [1, 1, 1, 0], 'l2': [1, 0, 0, 0]}
  expected['l3'] = [1, 1, 1, 0]
  for name, active in expected.items():
    np.testing.assert_array_equal(active_of(out_buffers, name), np.array(active, bool))
  # The same event as on plain leaves: grown values, kept and reset moments.
  plain_out = jitted_update(2, 'signed')(
    (), frozen, params, buffers, params, opt_state, 5
  )
  jax.tree.map(
    np.testing.assert_array_equal, (out_params, out_buffers, out_opt), plain_out[:3]
  )
  weights = wrap.adapter.apply(wrap.frozen, *map(wrap.to, plain_out[:2]))
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(np.reshape(x, y.shape), y, rtol=1e-6),
    wrap.back(weights),
    plain.apply(frozen, *plain_out[:2]),
  )


@pytest.mark.parametrize(
  'kwargs,message',
  [
    ({'rank': 0}, 'rank=0 must be > 0'),
    ({'max_rank': 2}, 'max_rank=2 must be >= rank=3'),
    ({'max_rank': 7}, r'max_rank=7 exceeds min\(d_in, d_out\)=6'),
    ({'rank': 7}, r'rank=7 exceeds min\(d_in, d_out\)=6'),
    ({'init_std': 0.0}, 'init_std=0.0 must be > 0'),
    ({'reg_orth_coef': -1.0}, 'reg_orth_coef=-1.0 must be >= 0'),
    ({'reg_form': 'sum'}, "reg_form='sum' is not one of"),
    ({'alpha': 'big'}, "alpha='big' must be a number"),
    ({'param_dtype': 'int8'}, 'not a floating dtype'),
  ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, message):
  with pytest.raises(pj.PeftError, match=message):
    flexlora(**{'rank': 3, **kwargs}).init(jax.random.key(0), jnp.ones((D_IN, D_OUT)))


@pytest.mark.parametrize(
  'kwargs,message',
  [
    ({'total_steps': 7}, r'total_steps=7 must exceed init_warmup \+ final_warmup = 7'),
    ({'interval': 0}, 'interval=0 must be > 0'),
    ({'budget': 0}, 'budget=0 must be > 0'),
    ({'init_warmup': -2}, 'init_warmup=-2 must be >= 0'),
    ({'cubic': 1}, 'cubic=1 must be True or False'),
    ({'prune_by': 'energy'}, "prune_by='energy' is not one of 'signed', 'abs'"),
  ],
)
def test_bad_schedules_are_clear_errors(kwargs, message):
  adapter, _, _, _ = four_leaves()
  with pytest.raises(pj.PeftError, match=message):
    flexlora_schedule(adapter, **{**SCHEDULE, **kwargs})


@pytest.mark.parametrize('spec', ['lora(rank=2)', 'adalora(rank=2)'])
def test_a_tree_without_flexlora_leaves_is_a_one_line_error(spec):
  _, frozen, _, _ = four_leaves()
  others = pj.by_rules([('.*/kernel', spec)])
  with pytest.raises(pj.PeftError, match=r'no leaf of .* has FlexLoraParams') as error:
    flexlora_schedule(others, **SCHEDULE).init(
      frozen, *others.init(jax.random.key(0), frozen)
    )
  assert '\n' not in str(error.value)
  with pytest.raises(pj.PeftError, match='needs a tree-level adapter'):
    flexlora_schedule(flexlora(3), **SCHEDULE).init(frozen, {}, {})
