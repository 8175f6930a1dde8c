"""AdaLoRA's budget schedule against hand-computed scores, budgets and masks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_jax as pj
from peft_jax.methods.adalora import AdaLoraParams, adalora
from peft_jax.methods.adalora_schedule import (
  AdaLoraScheduleState,
  adalora_schedule,
  budget,
  triplet_scores,
)
from tests.references import compiled_programs
from tests.schedules.wrapping import KINDS, wrapped

ADALORA = adalora(rank=3, alpha=3)
SHAPES = {'m1': (4, 5), 'm2': (6, 3)}
# T = 20, t_i = 4, t_f = 6, Δ = 2: middle phase 4 < t <= 14; b0 = 6, b_T = 2.
KWARGS = dict(total_steps=20, init_warmup=4, final_warmup=6, mask_interval=2)


def tiny_problem():
  """Two rank-3 adalora leaves and one lora leaf (not governed)."""
  frozen = {name: {'kernel': jnp.ones(shape)} for name, shape in SHAPES.items()}
  frozen['other'] = {'kernel': jnp.ones((5, 4))}
  adapter = pj.by_rules([('m./kernel', ADALORA), ('other/kernel', 'lora(rank=2)')])
  return adapter, frozen


def random_like(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: jnp.asarray(
      rng.uniform(0.5, 2.0, x.shape) * rng.choice([-1, 1], x.shape)
    ),
    tree,
  )


def leaf(tree, name):
  return tree[name]['kernel']


def test_scores_after_two_updates_match_hand_computation():
  adapter, frozen = tiny_problem()
  schedule = adalora_schedule(adapter, **KWARGS, target_rank=1)
  params0, buffers = adapter.init(jax.random.key(0), frozen)
  thetas = [random_like(params0, 1), random_like(params0, 2)]
  grads = [random_like(params0, 3), random_like(params0, 4)]
  state = schedule.init(frozen, params0, buffers)
  assert isinstance(state, AdaLoraScheduleState)
  for step, (theta, grad) in enumerate(zip(thetas, grads, strict=True), start=1):
    out, out_buffers, opt_state, state = schedule.update(
      state, frozen, theta, buffers, grad, (), step
    )
    jax.tree.map(np.testing.assert_array_equal, out, theta)  # t <= t_i: no mask.
    assert out_buffers == buffers and opt_state == ()
  assert 'other' not in state.avg
  for name in SHAPES:
    assert isinstance(leaf(state.avg, name), AdaLoraParams)
    for k in 'abe':
      # Spec §3.1: I = |w·g|, Ī ← .85 Ī + .15 I, Ū ← .85 Ū + .15 |I − Ī| (new Ī).
      avg = unc = 0.0
      for theta, grad in zip(thetas, grads, strict=True):
        sens = np.abs(
          np.float64(getattr(leaf(theta, name), k))
          * np.float64(getattr(leaf(grad, name), k))
        )
        avg = 0.85 * avg + 0.15 * sens
        unc = 0.85 * unc + 0.15 * np.abs(sens - avg)
      np.testing.assert_allclose(getattr(leaf(state.avg, name), k), avg, rtol=1e-5)
      np.testing.assert_allclose(getattr(leaf(state.unc, name), k), unc, rtol=1e-5)
    avg, unc = leaf(state.avg, name), leaf(state.unc, name)
    score = {
      k: np.float64(getattr(avg, k)) * np.float64(getattr(unc, k)) for k in 'abe'
    }
    # PyTorch layout: mean over row i of A = aᵀ and over column i of B = bᵀ.
    expected = score['e'] + score['a'].T.mean(axis=1) + score['b'].T.mean(axis=0)
    np.testing.assert_allclose(triplet_scores(avg, unc), expected, rtol=1e-5)


@pytest.mark.parametrize(
  'step,target,expected',
  [
    (0, 2, 6),
    (4, 2, 6),  # t <= t_i: b0.
    (5, 2, 4),  # ⌊2 + 4·0.9³⌋ = ⌊4.916⌋
    (6, 2, 4),  # ⌊2 + 4·0.8³⌋ = ⌊4.048⌋
    (7, 2, 3),  # ⌊2 + 4·0.7³⌋ = ⌊3.372⌋
    (9, 2, 2),  # ⌊2 + 4·0.5³⌋ = ⌊2.5⌋
    (9, 3, 3),  # ⌊3 + 3·0.125⌋
    (14, 2, 2),
    (15, 2, 2),  # final phase: b_T.
    (20, 2, 2),
  ],
)
def test_budget_is_the_cubic_schedule(step, target, expected):
  got = budget(
    step, initial=6, target=target, total_steps=20, init_warmup=4, final_warmup=6
  )
  assert int(got) == expected
  assert int(
    jax.jit(lambda t: budget(t, initial=6, target=target, **BUDGET))(step)
  ) == (expected)


BUDGET = dict(total_steps=20, init_warmup=4, final_warmup=6)


def hand_state_and_theta(adapter, frozen):
  """Scores S = Ī (Ū = 1) with triplet sums m1: [5, 1, 3], m2: [0.5, 4, 2]."""
  parts = {  # (e, column means of a, row means of b) per leaf.
    'm1': ([4.0, 1.0, 2.0], [0.5, 0.0, 0.5], [0.5, 0.0, 0.5]),
    'm2': ([0.5, 3.0, 1.0], [0.0, 0.5, 0.5], [0.0, 0.5, 0.5]),
  }
  params, buffers = adapter.init(jax.random.key(0), frozen)
  theta = random_like(params, 7)
  avg = {}
  for name, (e, a, b) in parts.items():
    d_in, d_out = SHAPES[name]
    avg[name] = {
      'kernel': AdaLoraParams(
        e=jnp.array(e),
        a=jnp.tile(jnp.array(a), (d_in, 1)),
        b=jnp.tile(jnp.array(b)[:, None], (1, d_out)),
      )
    }
  state = AdaLoraScheduleState(avg=avg, unc=jax.tree.map(jnp.ones_like, avg))
  # Gradients with |θ·g| = Ī: the EMA keeps Ī and scales Ū by 0.85, so a
  # middle-phase update keeps the order of the triplet scores.
  grads = jax.tree.map(jnp.zeros_like, theta)
  for name in SHAPES:
    grads[name]['kernel'] = jax.tree.map(jnp.divide, leaf(avg, name), leaf(theta, name))
  return theta, buffers, grads, state


@pytest.mark.parametrize(
  'step,masked_m1,masked_m2,frozen_scores',
  [
    (4, [], [], False),  # warm-up: never masked (4 mod 2 = 0).
    (6, [1], [0], False),  # b(6) = 4: the 2 smallest S_i (1 and 0.5).
    (7, [], [], False),  # 7 mod Δ ≠ 0.
    (15, [1, 2], [0, 2], True),  # final: b_T = 2, τ = 3, every step.
    (17, [1, 2], [0, 2], True),
  ],
)
def test_masks_the_lowest_scoring_triplets(step, masked_m1, masked_m2, frozen_scores):
  adapter, frozen = tiny_problem()
  schedule = adalora_schedule(adapter, **KWARGS, target_rank=1)
  theta, buffers, grads, state = hand_state_and_theta(adapter, frozen)
  out, _, _, new_state = schedule.update(state, frozen, theta, buffers, grads, (), step)
  for name, masked in (('m1', masked_m1), ('m2', masked_m2)):
    expected = np.array(leaf(theta, name).e)
    expected[masked] = 0
    np.testing.assert_array_equal(leaf(out, name).e, expected)
    np.testing.assert_array_equal(leaf(out, name).a, leaf(theta, name).a)
    np.testing.assert_array_equal(leaf(out, name).b, leaf(theta, name).b)
  jax.tree.map(np.testing.assert_array_equal, out['other'], theta['other'])
  unc_scale = 1.0 if frozen_scores else 0.85  # Scores stop updating after T − t_f.
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6),
    new_state,
    state._replace(unc=jax.tree.map(lambda u: unc_scale * u, state.unc)),
  )


def test_target_total_rank_sets_the_final_budget():
  adapter, frozen = tiny_problem()
  schedule = adalora_schedule(adapter, **KWARGS, target_total_rank=3)
  theta, buffers, grads, state = hand_state_and_theta(adapter, frozen)
  out, _, _, _ = schedule.update(state, frozen, theta, buffers, grads, (), 15)
  kept = [int(jnp.sum(leaf(out, name).e != 0)) for name in SHAPES]
  assert kept == [2, 1]  # S = 5, 3 (m1) and 4 (m2) survive.


def mlp_problem():
  keys = jax.random.split(jax.random.key(0), 3)
  frozen = {
    'body': {'kernel': jax.random.normal(keys[0], (6, 8))},
    'mid': {'kernel': jax.random.normal(keys[1], (8, 8)) / 3},
    'head': {'kernel': jax.random.normal(keys[2], (8, 3))},
  }

  def loss_fn(params, batch, rng):
    del rng
    h = jnp.tanh(batch['x'] @ params['body']['kernel'])
    h = jnp.tanh(h @ params['mid']['kernel'])
    logits = h @ params['head']['kernel']
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch['y']
    ).mean(), {}

  return frozen, loss_fn


def batch(step):
  key = jax.random.key(step)
  return {
    'x': jax.random.normal(key, (16, 6)),
    'y': jax.random.randint(jax.random.fold_in(key, 1), (16,), 0, 3),
  }


def test_training_ends_with_the_target_number_of_non_zero_e():
  frozen, loss_fn = mlp_problem()
  adapter = pj.by_rules(
    [('(body|head)/kernel', adalora(rank=3, alpha=6)), ('mid/kernel', 'lora(rank=2)')]
  )
  schedule = adalora_schedule(
    adapter,
    total_steps=24,
    init_warmup=4,
    final_warmup=8,
    mask_interval=2,
    target_rank=1,
  )
  optimizer = optax.adam(1e-2)
  state = pj.TrainState.create(
    *adapter.init(jax.random.key(1), frozen),
    optimizer,
    jax.random.key(2),
    schedule=schedule,
    frozen=frozen,
  )
  step = jax.jit(pj.make_train_step(loss_fn, adapter, optimizer, schedule=schedule))
  non_zero = {}
  with compiled_programs() as compiled:
    for t in range(1, 25):
      state, _ = step(state, frozen, batch(t))
      e = jnp.concatenate([state.params[n]['kernel'].e for n in ('body', 'head')])
      non_zero[t] = np.asarray(e != 0)
  assert non_zero[4].sum() == 6  # Warm-up: nothing masked.
  assert non_zero[24].sum() == 2  # b_T = target_rank × 2 leaves.
  for t in range(17, 25):  # Final phase: frozen scores, the same triplets.
    np.testing.assert_array_equal(non_zero[t], non_zero[24])
  assert compiled.count('jit(step)') == 1, compiled


@pytest.mark.parametrize(
  'kwargs,message',
  [
    ({}, 'give exactly one of target_rank and target_total_rank'),
    ({'target_rank': 1, 'target_total_rank': 2}, 'give exactly one of'),
    ({'target_rank': 0}, 'target_rank=0 must be > 0'),
    ({'target_rank': 1, 'total_steps': 10}, 'total_steps=10 must exceed'),
    ({'target_rank': 1, 'init_warmup': -1}, 'init_warmup=-1 must be >= 0'),
    ({'target_rank': 1, 'final_warmup': 1.5}, 'final_warmup=1.5 must be an int'),
    ({'target_rank': 1, 'mask_interval': 0}, 'mask_interval=0 must be > 0'),
    ({'target_rank': 1, 'beta1': 1.0}, r'beta1=1.0 must be in \[0, 1\)'),
    ({'target_rank': 1, 'beta2': -0.1}, r'beta2=-0.1 must be in \[0, 1\)'),
  ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, message):
  adapter, _ = tiny_problem()
  with pytest.raises(pj.PeftError, match=message):
    adalora_schedule(adapter, **{**KWARGS, **kwargs})


def test_bad_adapters_and_targets_are_clear_errors():
  adapter, frozen = tiny_problem()
  params, buffers = adapter.init(jax.random.key(0), frozen)
  with pytest.raises(pj.PeftError, match='target total rank 8 exceeds the initial'):
    adalora_schedule(adapter, **KWARGS, target_rank=4).init(frozen, params, buffers)
  per_leaf = ADALORA
  with pytest.raises(pj.PeftError, match='needs a tree-level adapter'):
    adalora_schedule(per_leaf, **KWARGS, target_rank=1).init(frozen, params, buffers)


@pytest.mark.parametrize(
  'spec',
  ['lora(rank=2)', 'flexlora(rank=2)', "stacked('lora(rank=2)')"],
)
def test_a_tree_without_adalora_leaves_is_a_one_line_error(spec):
  frozen = {'m': {'kernel': jnp.ones((2, 6, 5))}}
  if not spec.startswith('stacked'):
    frozen = {'m': {'kernel': jnp.ones((6, 5))}}
  others = pj.by_rules([('m/kernel', spec)])
  schedule = adalora_schedule(others, **KWARGS, target_rank=1)
  with pytest.raises(pj.PeftError, match=r'no leaf of .* has AdaLoraParams') as error:
    schedule.init(frozen, *others.init(jax.random.key(0), frozen))
  assert '\n' not in str(error.value)


GOVERNED = ('w0', 'w1', 'w2')


@pytest.mark.parametrize('kind', KINDS)
def test_wrapped_adalora_is_governed_like_plain_leaves(kind):
  """mpc, a hand-built copy, matrix_view and stacked (3 layers = 3 matrices)."""
  spec = 'adalora(rank=3, alpha=3)'
  frozen = {name: {'kernel': jnp.ones((4, 5))} for name in GOVERNED}
  frozen['other'] = {'kernel': jnp.ones((5, 4))}
  others = [('other/kernel', 'lora(rank=2)')]
  plain = pj.by_rules([('(w0|w1|w2)/kernel', spec), *others])
  wrap = wrapped(kind, spec, frozen, GOVERNED, others)
  params0, buffers = plain.init(jax.random.key(0), frozen)
  jax.tree.map(  # The shapes of the init (traced, not run).
    lambda x, y: np.testing.assert_array_equal(x.shape, y.shape),
    jax.eval_shape(wrap.adapter.init, jax.random.key(0), wrap.frozen)[0],
    wrap.to(params0),
  )
  schedules = [
    adalora_schedule(a, **KWARGS, target_rank=1) for a in (plain, wrap.adapter)
  ]
  plain_state = schedules[0].init(frozen, params0, buffers)
  state = schedules[1].init(wrap.frozen, wrap.to(params0), buffers)
  plain_update, update = (jax.jit(s.update) for s in schedules)
  for step in range(1, 17):
    theta, grads = random_like(params0, step), random_like(params0, 100 + step)
    expected, _, _, plain_state = plain_update(
      plain_state, frozen, theta, buffers, grads, (), step
    )
    out, _, _, state = update(
      state, wrap.frozen, wrap.to(theta), buffers, wrap.to(grads), (), step
    )
    jax.tree.map(np.testing.assert_array_equal, wrap.back(out), expected)
    jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6),
      AdaLoraScheduleState(*map(wrap.back, state)),
      plain_state,
    )
  # Final phase: b_T = target_rank × 3 matrices triplets survive.
  assert sum(int(jnp.sum(expected[n]['kernel'].e != 0)) for n in GOVERNED) == 3
