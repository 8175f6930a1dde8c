"""ChildPruning's projection: the top-k |Δ| kept, the invariant after the last one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_jax as pj
from peft_jax.methods.child_pruning import ChildPruningParams, child_pruning
from peft_jax.methods.child_pruning_schedule import child_pruning_schedule
from tests.references import compiled_programs
from tests.schedules.diff_pruning_test import mlp_problem, np_top_k, start
from tests.schedules.wrapping import wrapped

SPEC = 'child_pruning(p=0.25)'
NAMES = ('w0', 'w1')


def random_tree(seed, shape=(6, 4)):
  """Frozen kernels with child_pruning leaves whose Δ looks trained."""
  rng = np.random.default_rng(seed)
  normal = lambda *s: rng.normal(size=s).astype(np.float32)
  frozen = {name: {'kernel': normal(*shape)} for name in NAMES}
  frozen['other'] = {'kernel': normal(4, 3)}
  adapter = pj.by_rules([('(w0|w1)/kernel', SPEC), ('other/kernel', 'lora(rank=2)')])
  params, buffers = jax.jit(adapter.init)(jax.random.key(0), frozen)
  for name in NAMES:
    params[name]['kernel'] = ChildPruningParams(delta=normal(*shape))
  return adapter, frozen, params, buffers


def adam_state(params, seed):
  """An Adam state over ``params`` with random (non-zero) moments."""
  state = optax.adam(1e-3).init(params)
  rng = np.random.default_rng(seed)
  moment = lambda tree: jax.tree.map(
    lambda x: rng.uniform(0.1, 1, size=np.shape(x)).astype(np.float32), tree
  )
  return (state[0]._replace(mu=moment(params), nu=moment(params)), *state[1:])


@pytest.mark.parametrize('reset_moments', [True, False])
def test_a_projection_keeps_exactly_the_top_k_changes(reset_moments):
  adapter, frozen, params, buffers = random_tree(0)
  schedule = child_pruning_schedule(adapter, 5, reset_moments=reset_moments)
  opt_state = adam_state(params, 1)
  out, out_buffers, out_state, _ = jax.jit(schedule.update)(
    (), frozen, params, buffers, params, opt_state, 10
  )
  k = int(np.floor(0.25 * 24))
  for name in NAMES:
    delta = params[name]['kernel'].delta
    keep = np_top_k(np.abs(delta), k)
    got = out[name]['kernel'].delta
    np.testing.assert_array_equal(got, np.where(keep, delta, 0))
    assert np.count_nonzero(got) == k
    for moments in (out_state[0].mu, out_state[0].nu):
      before = opt_state[0].mu if moments is out_state[0].mu else opt_state[0].nu
      old, new = before[name]['kernel'].delta, moments[name]['kernel'].delta
      np.testing.assert_array_equal(new[keep], old[keep])
      np.testing.assert_array_equal(new[~keep], 0 if reset_moments else old[~keep])
  jax.tree.map(np.testing.assert_array_equal, out['other'], params['other'])
  jax.tree.map(np.testing.assert_array_equal, out_buffers, buffers)


@pytest.mark.parametrize(
  'interval,total,events',
  [(4, None, {4, 8, 12}), (4, 10, {4, 8, 10, 12}), (5, 3, {3, 5, 10})],
)
def test_projections_happen_every_interval_and_at_the_last_step(
  interval, total, events
):
  adapter, frozen, params, buffers = random_tree(2)
  schedule = child_pruning_schedule(adapter, interval, total)
  update = jax.jit(schedule.update)
  projected = set()
  for step in range(1, 13):
    out = update((), frozen, params, buffers, params, (), step)[0]
    if np.count_nonzero(out['w0']['kernel'].delta) < 24:
      projected.add(step)
  assert projected == events


def test_after_the_last_projection_theta_is_p_sparse_through_adamw():
  adapter, frozen, loss_fn, batch = mlp_problem('child_pruning(p=0.05)')
  budget = {n: int(np.floor(0.05 * frozen[n]['kernel'].size)) for n in frozen}
  schedule = child_pruning_schedule(adapter, 20, 50)
  optimizer = optax.chain(
    optax.clip_by_global_norm(0.1), optax.adamw(1e-2, weight_decay=0.1)
  )
  state = start(adapter, frozen, optimizer, schedule)
  step = jax.jit(
    pj.make_train_step(loss_fn, adapter, optimizer, schedule=schedule), donate_argnums=0
  )
  apply = jax.jit(adapter.apply)
  with compiled_programs() as compiled:
    for t in range(1, 51):
      state, _ = step(state, frozen, batch)
      weights = apply(frozen, state.params, state.buffers)
      counts = {
        n: int(np.sum(weights[n]['kernel'] != frozen[n]['kernel'])) for n in frozen
      }
      if t in (20, 40, 50):  # Right after a projection.
        assert all(counts[n] <= budget[n] for n in frozen), (t, counts)
      if t in (19, 49):  # Dense training in between.
        assert all(counts[n] > 3 * budget[n] for n in frozen), (t, counts)
  assert compiled.count('jit(step)') == 1, compiled
  for n in frozen:  # The kept entries are the top-k of the last Δ.
    delta = np.asarray(state.params[n]['kernel'].delta)
    assert np.count_nonzero(delta) <= budget[n]
    mu = state.opt_state[1][0].mu[n]['kernel'].delta
    np.testing.assert_array_equal(np.asarray(mu)[delta == 0], 0)  # Moments reset.


@pytest.mark.parametrize(
  'kind', ['hand_built', 'matrix_view', 'stacked', 'stacked_matrix_view']
)
def test_each_layer_is_projected_on_its_own_however_the_method_is_wrapped(kind):
  _, frozen, params, _ = random_tree(3)
  adapter, wrapped_frozen, to, back = wrapped(
    kind, SPEC, frozen, NAMES, [('other/kernel', 'lora(rank=2)')]
  )
  schedule = child_pruning_schedule(adapter, 1)
  wrapped_params, wrapped_buffers = adapter.init(jax.random.key(0), wrapped_frozen)
  as_wrapped = jax.tree.map(
    lambda like, x: jnp.reshape(x, like.shape), wrapped_params, to(params)
  )
  out = jax.jit(schedule.update)(
    (), wrapped_frozen, as_wrapped, wrapped_buffers, as_wrapped, (), 1
  )[0]
  out = back(out)
  for name in NAMES:
    delta = params[name]['kernel'].delta
    got = np.reshape(out[name]['kernel'].delta, delta.shape)
    np.testing.assert_array_equal(got, np.where(np_top_k(np.abs(delta), 6), delta, 0))


def test_bad_schedules_are_one_line_errors():
  adapter, frozen, params, buffers = random_tree(0)
  for args, kwargs, message in (
    ((0,), {}, 'interval=0 must be > 0'),
    ((2.0,), {}, 'interval=2.0 must be an int'),
    ((5, 0), {}, 'total_steps=0 must be > 0'),
    ((5,), {'reset_moments': 1}, 'reset_moments=1 must be True or False'),
  ):
    with pytest.raises(pj.PeftError, match=message) as error:
      child_pruning_schedule(adapter, *args, **kwargs)
    assert '\n' not in str(error.value)
  others = pj.by_rules([('.*/kernel', 'lora(rank=2)')])
  with pytest.raises(pj.PeftError, match=r'no leaf of .* has ChildPruningParams'):
    child_pruning_schedule(others, 5).init(
      frozen, *others.init(jax.random.key(0), frozen)
    )
  with pytest.raises(pj.PeftError, match='needs a tree-level adapter'):
    child_pruning_schedule(child_pruning(), 5).init(frozen, params, buffers)
