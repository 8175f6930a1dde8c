"""FlexLoRA: the masked AdaLoRA layer, entropies, prune/grow, kept optimizer state."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_jax as pj
from peft_jax.methods.flexlora import flexlora
from peft_jax.methods.mpc import pattern_penalty
from peft_jax.schedules.flexlora import (
  cubic_budget,
  entropy,
  flexlora_schedule,
  reset_moments,
)

D_IN, D_OUT = 9, 6


def random_theta(seed, active):
  rng = np.random.default_rng(seed)
  n_slots = len(active)
  return {
    'a': rng.normal(size=(D_IN, n_slots)).astype(np.float32),
    'b': rng.normal(size=(n_slots, D_OUT)).astype(np.float32),
    'e': rng.normal(size=n_slots).astype(np.float32),
    'buffers': {'active': np.float32(active)},
  }


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
  theta = random_theta(2, active)
  # Spec: h = W x + (α/(r₀+1e-5))·B diag(e) A x over the active triplets, with
  # r₀ the initial rank even after the active count changed (α ≤ 0 → r₀).
  W, A, B = (np.float64(m).T for m in (w, theta['a'], theta['b']))
  keep = np.flatnonzero(active)
  s = (alpha if alpha > 0 else rank) / (rank + 1e-5)
  e = np.diag(np.float64(theta['e'])[keep])
  expected = W + s * B[:, keep] @ e @ A[keep]
  adapter = flexlora(rank, alpha, max_rank=len(active))
  np.testing.assert_allclose(adapter.apply(w, theta).T, expected, rtol=1e-5, atol=1e-5)
  x = np.random.default_rng(3).normal(size=(4, D_IN))
  np.testing.assert_allclose(
    adapter.factored(np.float32(x), w, theta), x @ expected.T, rtol=1e-4, atol=1e-4
  )
  np.testing.assert_allclose(
    adapter.unapply(adapter.apply(w, theta), theta), w, rtol=1e-5, atol=1e-5
  )


def test_init_is_normal_factors_zero_e_and_the_first_slots_active():
  w = jax.random.normal(jax.random.key(1), (512, 256))
  adapter = flexlora(8, max_rank=12)
  theta = adapter.init(jax.random.key(0), w)
  assert theta['a'].shape == (512, 12) and theta['b'].shape == (12, 256)
  for name in ('a', 'b'):
    np.testing.assert_allclose(
      np.std(np.asarray(theta[name], np.float64)), 0.02, rtol=0.03
    )
  np.testing.assert_array_equal(theta['e'], 0)
  np.testing.assert_array_equal(theta['buffers']['active'], [1] * 8 + [0] * 4)
  np.testing.assert_array_equal(adapter.apply(w, theta), w)


@pytest.mark.parametrize(
  'rank,max_rank,shape,slots',
  [(3, None, (9, 6), 6), (4, None, (9, 6), 6), (2, None, (9, 6), 4), (3, 4, (9, 6), 4)],
)
def test_count_is_every_allocated_slot(rank, max_rank, shape, slots):
  adapter = flexlora(rank, max_rank=max_rank)
  theta = adapter.init(jax.random.key(0), jnp.ones(shape))
  assert theta['e'].shape == (slots,)
  # Inactive slots are allocated and trainable-but-masked: they are counted.
  assert pj.count(theta) == adapter.num_params(shape) == slots * (sum(shape) + 1)


@pytest.mark.parametrize('form', ['mean', 'squared'])
def test_orthogonality_penalty_covers_the_active_slots_only(form):
  active = [1, 0, 1, 1, 0]
  theta = random_theta(4, active)
  adapter = flexlora(3, max_rank=5, reg_orth_coef=0.3, reg_form=form)
  keep = np.flatnonzero(active)
  expected = 0.3 * pattern_penalty(theta['a'][:, keep], theta['b'][keep], 'o', form)
  w = jnp.zeros((D_IN, D_OUT))
  np.testing.assert_allclose(adapter.regularizer(w, theta), expected, rtol=1e-5)
  grads = jax.grad(adapter.regularizer, argnums=1)(w, theta)
  inactive = np.array([1, 4])
  np.testing.assert_array_equal(grads['a'][:, inactive], 0)
  np.testing.assert_array_equal(grads['b'][inactive], 0)
  assert flexlora(3, reg_orth_coef=0).regularizer is None


def test_entropy_matches_hand_computation():
  # p = [9/25, 16/25, 0] over r = 3 active slots (the 4th is inactive).
  h = -(0.36 * math.log(0.36 + 1e-8) + 0.64 * math.log(0.64 + 1e-8)) / math.log(3)
  got = entropy(jnp.array([3.0, -4.0, 0.0, 7.0]), jnp.array([1.0, 1, 1, 0]))
  np.testing.assert_allclose(got, h, rtol=1e-6)
  uniform = entropy(jnp.array([2.0, -2.0, 2.0, 9.0]), jnp.array([1.0, 1, 1, 0]))
  np.testing.assert_allclose(uniform, 1.0, rtol=1e-6)
  single = entropy(jnp.array([2.0, 5.0]), jnp.array([1.0, 0]))  # r = 1: no / log 1.
  np.testing.assert_allclose(single, 0.0, atol=1e-7)
  np.testing.assert_array_equal(entropy(jnp.zeros(3), jnp.ones(3)), 0.0)


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


@functools.cache
def problem():
  """Four flexlora leaves (R = 4) and one lora leaf (not governed)."""
  frozen = {name: {'kernel': jnp.ones((D_IN, D_OUT))} for name in LEAVES}
  frozen['other'] = {'kernel': jnp.ones((D_IN, 4))}
  adapter = pj.by_rules(
    [('l./kernel', flexlora(3, 3.0, max_rank=4)), ('other/kernel', 'lora(rank=2)')]
  )
  return adapter, frozen


def four_leaves():
  adapter, frozen = problem()
  theta = adapter.init(jax.random.key(0), frozen)
  for name, (active, e) in LEAVES.items():
    leaf = theta[name]['kernel']
    leaf['e'] = jnp.array(e)
    leaf['buffers'] = {'active': jnp.array(active, jnp.float32)}
  return adapter, frozen, theta


@functools.cache
def jitted_update(budget, prune_by):
  """One compiled update per schedule, shared by the tests (steps are traced)."""
  schedule = flexlora_schedule(
    problem()[0], **SCHEDULE, budget=budget, prune_by=prune_by
  )
  return jax.jit(schedule.update)


def filled(opt_state, seed):
  """``opt_state`` with every float array replaced by random values."""
  leaves, treedef = jax.tree.flatten(opt_state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten(
    [
      jax.random.normal(k, x.shape, x.dtype)
      if jnp.issubdtype(x.dtype, jnp.floating)
      else x
      for k, x in zip(keys, leaves, strict=True)
    ]
  )


def random_adam_state(theta):
  return filled(optax.adam(1e-3).init(theta), 1)


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
  _, frozen, theta = four_leaves()
  opt_state = random_adam_state(theta)
  out, _, _ = jitted_update(budget, prune_by)((), frozen, theta, theta, opt_state, 5)
  for name in LEAVES:
    got = out[name]['kernel']['buffers']['active']
    np.testing.assert_array_equal(got, active.get(name, LEAVES[name][0]), err_msg=name)
  total = lambda t: sum(
    float(jnp.sum(t[n]['kernel']['buffers']['active'])) for n in LEAVES
  )
  assert total(out) == total(theta) == 11
  if budget == 2:  # The regrown slot is new: N(0, 1) factors and e = 0.
    leaf = out['l1']['kernel']
    assert leaf['e'][2] == 0 and np.all(
      leaf['a'][:, 2] != theta['l1']['kernel']['a'][:, 2]
    )


def test_grow_has_zero_impact_and_prune_removes_one_triplet():
  adapter, frozen, theta = four_leaves()
  opt_state = random_adam_state(theta)
  out, _, _ = jitted_update(1, 'signed')((), frozen, theta, theta, opt_state, 5)
  before, after = adapter.apply(frozen, theta), adapter.apply(frozen, out)
  grown = out['l0']['kernel']
  assert np.all(grown['a'][:, 3] != theta['l0']['kernel']['a'][:, 3])
  np.testing.assert_allclose(after['l0']['kernel'], before['l0']['kernel'], atol=1e-6)
  leaf = theta['l1']['kernel']
  s = 3.0 / (3 + 1e-5)
  removed = s * leaf['e'][2] * np.outer(leaf['a'][:, 2], leaf['b'][2])
  np.testing.assert_allclose(
    after['l1']['kernel'], before['l1']['kernel'] - removed, rtol=1e-5, atol=1e-5
  )


def test_nothing_happens_off_event_steps():
  _, frozen, theta = four_leaves()
  for step in (2, 4, 6, 15, 17):
    opt_state = random_adam_state(theta)
    out = jitted_update(2, 'signed')((), frozen, theta, theta, opt_state, step)
    jax.tree.map(np.testing.assert_array_equal, out, ((theta, opt_state, ())))


def adam_state(opt_state):
  is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)
  (found,) = [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
  return found


def test_only_the_moments_of_touched_slots_are_reset():
  _, frozen, theta = four_leaves()
  opt_state = random_adam_state(theta)
  _, out, _ = jitted_update(1, 'signed')((), frozen, theta, theta, opt_state, 5)
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
        expected['a'][:, slot], expected['b'][slot], expected['e'][slot] = 0, 0, 0
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
  _, _, theta = four_leaves()
  opt_state = filled(optimizer.init(theta), 2)
  slot = jnp.arange(4) == 1
  touched = {'l0/kernel/a': slot[None, :], 'l0/kernel/e': slot}
  out = reset_moments(opt_state, theta, touched)
  per_parameter = lambda node: jax.tree.structure(node) == jax.tree.structure(theta)
  moments = lambda state: [
    node
    for node in jax.tree.leaves(state, is_leaf=per_parameter)
    if per_parameter(node)
  ]
  assert len(moments(out)) == n_moments
  for old, new in zip(moments(opt_state), moments(out), strict=True):
    expected = jax.tree.map(np.array, old)
    expected['l0']['kernel']['a'][:, 1] = 0
    expected['l0']['kernel']['e'][1] = 0
    jax.tree.map(np.testing.assert_array_equal, new, expected)
  others = lambda state: [
    x for x in jax.tree.leaves(state, is_leaf=per_parameter) if not per_parameter(x)
  ]
  jax.tree.map(np.testing.assert_array_equal, others(out), others(opt_state))


def test_training_conserves_the_total_rank_and_compiles_once():
  adapter, frozen, theta = four_leaves()
  frozen = jax.tree.map(
    lambda w: jax.random.normal(jax.random.key(w.size), w.shape) / 3, frozen
  )
  targets = {
    name: jax.random.normal(jax.random.key(i), (8, w['kernel'].shape[1]))
    for i, (name, w) in enumerate(frozen.items())
  }

  def loss_fn(params, x, rng):  # One regression per leaf.
    del rng
    errors = [jnp.mean((x @ params[n]['kernel'] - t) ** 2) for n, t in targets.items()]
    return sum(errors), {}

  optimizer = optax.adam(1e-2)
  schedule = flexlora_schedule(adapter, **SCHEDULE, budget=1)
  state = pj.TrainState.create(
    theta, optimizer, jax.random.key(2), schedule=schedule, frozen=frozen
  )
  step = jax.jit(pj.make_train_step(loss_fn, adapter, optimizer, schedule=schedule))
  x = jax.random.normal(jax.random.key(4), (8, D_IN))
  totals, fresh = [], []
  for t in range(1, 17):
    state, metrics = step(state, frozen, x)
    assert np.isfinite(metrics['loss'])
    leaves = [state.params[n]['kernel'] for n in LEAVES]
    totals.append(sum(float(leaf['buffers']['active'].sum()) for leaf in leaves))
    # A slot grown at this update still has e = 0 (every other active e moved).
    if any(
      np.any((leaf['buffers']['active'] > 0) & (leaf['e'] == 0)) for leaf in leaves
    ):
      fresh.append(t)
  assert fresh == [5, 8, 11, 14]  # The event steps.
  assert totals == [11] * 16
  assert step._cache_size() == 1


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
  adapter, _, _ = four_leaves()
  with pytest.raises(pj.PeftError, match=message):
    flexlora_schedule(adapter, **{**SCHEDULE, **kwargs})


def test_a_tree_without_flexlora_leaves_is_an_error():
  _, frozen, _ = four_leaves()
  lora_only = pj.by_rules([('.*/kernel', 'lora(rank=2)')])
  with pytest.raises(pj.PeftError, match=r'uses flexlora\(\.\.\.\)'):
    flexlora_schedule(lora_only, **SCHEDULE).init(
      frozen, lora_only.init(jax.random.key(0), frozen)
    )
