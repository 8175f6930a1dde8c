"""The pure train step under jit, jit with a data-sharded batch, pmap, shard_map."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import peft_jax as pj

RULES = [('.*/kernel', 'lora(rank=2, alpha=4)'), ('head/bias', 'bitfit()')]
N_DEVICES = 8


def data_mesh():
  # Auto axes: XLA's partitioner inserts the gradient all-reduce. (jax 0.10's
  # make_mesh defaults to Explicit axes, which reject the batch-contracting
  # matmul of a weight gradient without an explicit out_sharding.)
  return jax.make_mesh((N_DEVICES,), ('data',), axis_types=(AxisType.Auto,))


def frozen_mlp():
  k0, k1 = jax.random.split(jax.random.key(0))
  return {
    'body': {'kernel': jax.random.normal(k0, (6, 8)), 'bias': jnp.zeros(8)},
    'head': {'kernel': jax.random.normal(k1, (8, 3)), 'bias': jnp.zeros(3)},
  }


def loss_fn(params, batch, rng):
  del rng
  h = jnp.tanh(batch['x'] @ params['body']['kernel'] + params['body']['bias'])
  logits = h @ params['head']['kernel'] + params['head']['bias']
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['y']).mean()
  return loss, {'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['y'])}


def batches(n, size=16):
  keys = jax.random.split(jax.random.key(42), n)
  return [
    {
      'x': jax.random.normal(k, (size, 6)),
      'y': jax.random.randint(jax.random.fold_in(k, 1), (size,), 0, 3),
    }
    for k in keys
  ]


def setup():
  adapter = pj.by_rules(RULES)
  optimizer = optax.adam(1e-2)
  frozen = frozen_mlp()
  state = pj.TrainState.create(
    adapter.init(jax.random.key(1), frozen), optimizer, jax.random.key(2)
  )
  return adapter, optimizer, frozen, state


def run_jit(n_steps, shard=False):
  adapter, optimizer, frozen, state = setup()
  step = jax.jit(pj.make_train_step(loss_fn, adapter, optimizer), donate_argnums=0)
  mesh = data_mesh()
  losses = []
  for batch in batches(n_steps):
    if shard:
      batch = jax.device_put(batch, NamedSharding(mesh, P('data')))
    state, metrics = step(state, frozen, batch)
    losses.append(float(metrics['loss']))
  return state, losses


def test_loss_falls_and_only_adapter_parameters_change():
  _, _, frozen, state0 = setup()
  frozen_copy = jax.tree.map(np.array, frozen)
  state, losses = run_jit(60)
  assert losses[-1] < 0.7 * losses[0]
  jax.tree.map(np.testing.assert_array_equal, frozen, frozen_copy)
  assert int(state.step) == 60
  assert jax.tree.structure(state.params) == jax.tree.structure(state0.params)


def test_step_is_sgd_on_the_adapter_parameters_only():
  adapter, _, frozen, _ = setup()
  sgd = optax.sgd(0.1)
  state = pj.TrainState.create(
    adapter.init(jax.random.key(1), frozen), sgd, jax.random.key(2)
  )
  batch = batches(1)[0]
  new_state, _ = pj.make_train_step(loss_fn, adapter, sgd)(state, frozen, batch)
  grads = jax.grad(lambda t: loss_fn(adapter.apply(frozen, t), batch, None)[0])(
    state.params
  )
  expected = jax.tree.map(lambda t, g: t - 0.1 * g, state.params, grads)
  jax.tree.map(np.testing.assert_allclose, new_state.params, expected)
  # Adam's moments mirror theta only: no frozen-weight-shaped optimizer state.
  *_, adam_state = setup()
  assert jax.tree.structure(adam_state.opt_state[0].mu) == jax.tree.structure(
    adam_state.params
  )


def test_donation_reuses_state_buffers():
  adapter, optimizer, frozen, state = setup()
  step = jax.jit(pj.make_train_step(loss_fn, adapter, optimizer), donate_argnums=0)
  old = state.params['body']['kernel']['a']
  state, _ = step(state, frozen, batches(1)[0])
  assert old.is_deleted()
  assert not frozen['body']['kernel'].is_deleted()


def test_data_sharded_jit_matches_single_device_jit():
  single, losses = run_jit(5)
  sharded, sharded_losses = run_jit(5, shard=True)
  np.testing.assert_allclose(losses, sharded_losses, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    single.params,
    sharded.params,
  )


def test_pmap_matches_jit_with_a_data_sharded_batch():
  assert jax.device_count() == N_DEVICES
  adapter, optimizer, frozen, state = setup()
  step = jax.pmap(
    pj.make_train_step(loss_fn, adapter, optimizer, axis_name='data'),
    axis_name='data',
    in_axes=(None, None, 0),
    out_axes=(None, None),
  )
  losses = []
  for batch in batches(5):
    per_device = jax.tree.map(lambda x: x.reshape(N_DEVICES, -1, *x.shape[1:]), batch)
    state, metrics = step(state, frozen, per_device)
    losses.append(float(metrics['loss']))
  reference, reference_losses = run_jit(5, shard=True)
  np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    state.params,
    reference.params,
  )


def test_shard_map_matches_jit():
  adapter, optimizer, frozen, state = setup()
  mesh = data_mesh()
  step = jax.jit(
    jax.shard_map(
      pj.make_train_step(loss_fn, adapter, optimizer, axis_name='data'),
      mesh=mesh,
      in_specs=(P(), P(), P('data')),
      out_specs=(P(), P()),
      check_vma=False,
    )
  )
  for batch in batches(5):
    state, _ = step(state, frozen, batch)
  reference, _ = run_jit(5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    state.params,
    reference.params,
  )


@pytest.mark.parametrize('with_regularizer', [False, True])
def test_regularizer_is_added_to_the_objective(with_regularizer):
  base = pj.ssb()
  penalty = lambda w, theta: jnp.sum((theta['l_in'] - 2.0) ** 2)
  leaf = base._replace(regularizer=penalty) if with_regularizer else base
  adapter = pj.by_rules([('body/kernel', leaf)])
  frozen = frozen_mlp()
  state = pj.TrainState.create(
    adapter.init(jax.random.key(0), frozen), optax.sgd(0.1), jax.random.key(0)
  )
  _, metrics = pj.make_train_step(loss_fn, adapter, optax.sgd(0.1))(
    state, frozen, batches(1)[0]
  )
  if with_regularizer:
    np.testing.assert_allclose(metrics['regularizer'], 6 * 1.0, rtol=1e-6)
  else:
    assert 'regularizer' not in metrics


def test_buffers_are_passed_to_apply_but_never_trained():
  """A leaf's theta['buffers'] is non-trainable state (e.g. SVD bases)."""

  def init(key, w):
    del key
    return {'shift': jnp.zeros(w.shape[1]), 'buffers': {'offset': jnp.ones(w.shape[1])}}

  leaf = pj.Adapter(
    init=init,
    apply=lambda w, t: w + t['shift'] + t['buffers']['offset'],
    num_params=lambda shape: shape[1],
  )
  adapter = pj.by_rules([('head/kernel', leaf)])
  frozen = frozen_mlp()
  optimizer = optax.adamw(0.1, weight_decay=0.5)
  theta = adapter.init(jax.random.key(0), frozen)
  assert pj.count(theta) == 3
  assert pj.trainable_mask(theta) == {
    'head': {'kernel': {'shift': True, 'buffers': {'offset': False}}}
  }
  state = pj.TrainState.create(theta, optimizer, jax.random.key(0))
  step = jax.jit(pj.make_train_step(loss_fn, adapter, optimizer))
  for batch in batches(3):
    state, _ = step(state, frozen, batch)
  kernel = state.params['head']['kernel']
  np.testing.assert_array_equal(kernel['buffers']['offset'], 1.0)
  assert np.all(kernel['shift'] != 0)


def test_schedule_updates_run_after_each_step_and_are_checkpointed(tmp_path):
  """A toy schedule: every 2nd step, zero the LoRA factor ``a`` of body/kernel."""

  def update(count, frozen, theta, grads, opt_state, step):
    del frozen, grads
    reset = step % 2 == 0
    a = theta['body']['kernel']['a']
    theta['body']['kernel']['a'] = jax.lax.cond(reset, jnp.zeros_like, lambda x: x, a)
    return theta, opt_state, count + reset.astype(jnp.int32)

  schedule = pj.Schedule(
    init=lambda frozen, theta: jnp.zeros((), jnp.int32), update=update
  )
  adapter, optimizer, frozen, _ = setup()
  state = pj.TrainState.create(
    adapter.init(jax.random.key(1), frozen),
    optimizer,
    jax.random.key(2),
    schedule=schedule,
    frozen=frozen,
  )
  step = jax.jit(pj.make_train_step(loss_fn, adapter, optimizer, schedule=schedule))
  for batch in batches(4):
    state, _ = step(state, frozen, batch)
  assert int(state.schedule_state) == 2
  np.testing.assert_array_equal(state.params['body']['kernel']['a'], 0)
  manager = pj.checkpoint_manager(tmp_path)
  pj.save_checkpoint(manager, state, {})
  restored, _ = pj.restore_checkpoint(manager, state)
  assert int(restored.schedule_state) == 2
