"""DiffPruning's fix: exactly the top-k mask, then ‖θ − θ0‖₀ ≤ k through training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_jax as pj
from peft_jax.methods.diff_pruning import DiffPruningParams, diff_pruning
from peft_jax.methods.diff_pruning_schedule import diff_pruning_schedule
from tests.references import compiled_programs
from tests.schedules.wrapping import wrapped

SPEC = 'diff_pruning(p=0.1, alpha_init=0.5)'


def np_deterministic_gate(alpha, l=-1.5, r=1.5):  # noqa: E741
  return np.clip((r - l) / (1 + np.exp(-np.float64(alpha))) + l, 0, 1)


def np_top_k(score, k):
  """The mask of the ``k`` largest entries (the scores are distinct)."""
  flat = np.asarray(score, np.float64).ravel()
  mask = np.zeros(flat.size, bool)
  mask[np.argsort(-flat)[:k]] = True
  return mask.reshape(np.shape(score))


def random_tree(seed, names=('w0', 'w1'), shape=(6, 4)):
  """Frozen kernels with diff_pruning leaves whose d and α look trained."""
  rng = np.random.default_rng(seed)
  normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  frozen = {name: {'kernel': normal(*shape)} for name in names}
  frozen['other'] = {'kernel': normal(4, 3)}
  adapter = pj.by_rules(
    [(f'({"|".join(names)})/kernel', SPEC), ('other/kernel', 'lora(rank=2)')]
  )
  params, buffers = adapter.init(jax.random.key(0), frozen)
  for name in names:
    params[name]['kernel'] = DiffPruningParams(
      w=normal(*shape), alpha=jnp.asarray(rng.uniform(-3, 3, size=shape), jnp.float32)
    )
  return adapter, frozen, params, buffers


@pytest.mark.parametrize('score', ['alpha', 'diff'])
def test_the_fix_keeps_exactly_the_top_k_and_folds_the_gate(score):
  adapter, frozen, params, buffers = random_tree(0)
  schedule = diff_pruning_schedule(adapter, burn_in_steps=7, score=score)
  update = jax.jit(schedule.update)
  state = schedule.init(frozen, params, buffers)
  for step in (6, 8):  # No fix before or after the burn-in step.
    out = update(state, frozen, params, buffers, params, (), step)
    jax.tree.map(np.testing.assert_array_equal, out, (params, buffers, (), ()))
  new_params, new_buffers, _, _ = update(state, frozen, params, buffers, params, (), 7)
  apply = jax.jit(adapter.apply)
  k = int(np.floor(0.1 * 24))
  for name in ('w0', 'w1'):
    leaf, got = params[name]['kernel'], new_buffers[name]['kernel']
    diff = np_deterministic_gate(leaf.alpha) * np.float64(leaf.w)
    mask = np_top_k(np.abs(leaf.alpha if score == 'alpha' else diff), k)
    np.testing.assert_array_equal(got.mask, mask)
    assert int(np.sum(got.mask)) == k and bool(got.fixed)
    fixed = new_params[name]['kernel']
    np.testing.assert_allclose(fixed.w, np.where(mask, diff, 0), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(fixed.alpha, leaf.alpha)
    # The evaluation-form weights of the kept entries are unchanged by the fix.
    before = apply(frozen, params, buffers)[name]['kernel']
    after = apply(frozen, new_params, new_buffers)[name]['kernel']
    np.testing.assert_allclose(
      np.asarray(after)[mask], np.asarray(before)[mask], atol=1e-6
    )
    np.testing.assert_array_equal(
      np.asarray(after)[~mask], frozen[name]['kernel'][~mask]
    )
  jax.tree.map(np.testing.assert_array_equal, new_params['other'], params['other'])


def mlp_problem(spec, seed=0):
  """A 2-layer tanh MLP of kernels ``(6, 16)``, ``(16, 3)``, a squared loss."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape, scale=1.0: (scale * rng.normal(size=shape)).astype(np.float32)
  frozen = {
    'l1': {'kernel': normal(6, 16, scale=6**-0.5)},
    'l2': {'kernel': normal(16, 3, scale=0.25)},
  }
  batch = (normal(32, 6), normal(32, 3))

  def loss_fn(weights, batch, rng):
    del rng
    h = jnp.tanh(batch[0] @ weights['l1']['kernel'])
    return jnp.mean((h @ weights['l2']['kernel'] - batch[1]) ** 2), {}

  adapter = pj.by_rules([('l[12]/kernel', spec)], regularizer='sum')
  return adapter, frozen, loss_fn, batch


def start(adapter, frozen, optimizer, schedule=None, shift=0.0):
  """The step-0 ``TrainState`` (parameters moved by ``shift``), in one compile."""

  def create(key):
    params, buffers = adapter.init(key, frozen)
    return pj.TrainState.create(
      jax.tree.map(lambda x: x + shift, params),
      buffers,
      optimizer,
      jax.random.fold_in(key, 1),
      schedule=schedule,
      frozen=frozen,
    )

  return jax.jit(create)(jax.random.key(1))


def changed(apply, frozen, params, buffers):
  """``{leaf: ‖θ − θ0‖₀}`` of the evaluation-form weights ``apply(...)``."""
  weights = apply(frozen, params, buffers)
  return {n: int(np.sum(weights[n]['kernel'] != frozen[n]['kernel'])) for n in frozen}


def test_after_burn_in_theta_is_p_sparse_through_adamw_with_decay_and_clipping():
  adapter, frozen, loss_fn, batch = mlp_problem('diff_pruning(p=0.05, l0_coef=1e-3)')
  budget = {n: int(np.floor(0.05 * frozen[n]['kernel'].size)) for n in frozen}
  assert budget == {'l1': 4, 'l2': 2}
  schedule = diff_pruning_schedule(adapter, burn_in_steps=20)
  optimizer = optax.chain(
    optax.clip_by_global_norm(0.1), optax.adamw(1e-2, weight_decay=0.1)
  )
  state = start(adapter, frozen, optimizer, schedule)
  step = jax.jit(
    pj.make_train_step(loss_fn, adapter, optimizer, schedule=schedule), donate_argnums=0
  )
  apply = jax.jit(adapter.apply)
  losses = []
  with compiled_programs() as compiled:
    for t in range(1, 51):
      state, metrics = step(state, frozen, batch)
      losses.append(float(metrics['loss']))
      counts = changed(apply, frozen, state.params, state.buffers)
      if t == 19:  # Dense before the fix.
        assert all(counts[n] > 3 * budget[n] for n in frozen), counts
        assert metrics['regularizer'] > 0
      if t >= 20:
        assert all(counts[n] <= budget[n] for n in frozen), (t, counts)
  assert compiled.count('jit(step)') == 1, compiled
  for n in frozen:
    buffers = state.buffers[n]['kernel']
    assert bool(buffers.fixed) and int(np.sum(buffers.mask)) == budget[n]
    assert not bool(buffers.noise.active)  # Stored buffers stay inactive.
    delta = np.asarray(apply(frozen, state.params, state.buffers)[n]['kernel'])
    assert not np.any((delta != frozen[n]['kernel']) & ~np.asarray(buffers.mask))
  assert float(metrics['regularizer']) == 0.0
  assert losses[-1] < losses[20]  # The kept entries still train.


def test_the_gate_is_random_in_the_step_only():
  """With a zero learning rate the training loss varies from step to step (the
  gate is sampled), while the stored buffers give one deterministic loss."""
  adapter, frozen, loss_fn, batch = mlp_problem('diff_pruning(p=0.05, alpha_init=1.0)')
  optimizer = optax.sgd(0.0)
  state = start(adapter, frozen, optimizer, shift=0.5)  # d ≠ 0.
  params, buffers = state.params, state.buffers
  step = jax.jit(pj.make_train_step(loss_fn, adapter, optimizer))
  losses = []
  with compiled_programs() as compiled:
    for _ in range(3):
      state, metrics = step(state, frozen, batch)
      losses.append(float(metrics['loss']))
  assert len(set(losses)) == 3
  evaluate = jax.jit(lambda p, b: loss_fn(adapter.apply(frozen, p, b), batch, None)[0])
  assert evaluate(state.params, state.buffers) == evaluate(params, buffers)
  assert compiled.count('jit(step)') == 1, compiled


@pytest.mark.parametrize(
  'kind', ['hand_built', 'matrix_view', 'stacked', 'stacked_matrix_view']
)
def test_each_layer_keeps_its_own_top_k_however_the_method_is_wrapped(kind):
  names = ('w0', 'w1')
  _, frozen, params, _ = random_tree(3, names)
  others = [('other/kernel', 'lora(rank=2)')]
  adapter, wrapped_frozen, to, back = wrapped(kind, SPEC, frozen, names, others)
  schedule = diff_pruning_schedule(adapter, burn_in_steps=3)
  wrapped_params, wrapped_buffers = adapter.init(jax.random.key(0), wrapped_frozen)
  # The plain values, in the wrapped layout (a matrix_view leaf is the matrix).
  as_wrapped = jax.tree.map(
    lambda like, x: jnp.reshape(x, like.shape), wrapped_params, to(params)
  )
  state = schedule.init(wrapped_frozen, as_wrapped, wrapped_buffers)
  _, out, _, _ = jax.jit(schedule.update)(
    state, wrapped_frozen, as_wrapped, wrapped_buffers, as_wrapped, (), 3
  )
  out = back(out)
  for name in names:
    alpha = params[name]['kernel'].alpha
    mask = np.reshape(out[name]['kernel'].mask, alpha.shape)
    np.testing.assert_array_equal(mask, np_top_k(np.abs(alpha), 2))


def test_bad_schedules_are_one_line_errors():
  adapter, frozen, params, buffers = random_tree(0)
  for kwargs, message in (
    ({'burn_in_steps': 0}, 'burn_in_steps=0 must be > 0'),
    ({'burn_in_steps': 2.5}, 'burn_in_steps=2.5 must be an int'),
    ({'score': 'grad'}, "score='grad' is not one of 'alpha', 'diff'"),
  ):
    with pytest.raises(pj.PeftError, match=message) as error:
      diff_pruning_schedule(adapter, **kwargs)
    assert '\n' not in str(error.value)
  others = pj.by_rules([('.*/kernel', 'lora(rank=2)')])
  with pytest.raises(pj.PeftError, match=r'no leaf of .* has DiffPruningParams'):
    diff_pruning_schedule(others).init(frozen, *others.init(jax.random.key(0), frozen))
  with pytest.raises(pj.PeftError, match='needs a tree-level adapter'):
    diff_pruning_schedule(diff_pruning()).init(frozen, params, buffers)
