"""The pure train step under jit, jit with a data-sharded batch, pmap, shard_map."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import peft_jax as pj
from tests.references import compiled_programs

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
  params, buffers = adapter.init(jax.random.key(1), frozen)
  state = pj.TrainState.create(params, buffers, optimizer, jax.random.key(2))
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
  params, buffers = adapter.init(jax.random.key(1), frozen)
  state = pj.TrainState.create(params, buffers, sgd, jax.random.key(2))
  batch = batches(1)[0]
  new_state, _ = pj.make_train_step(loss_fn, adapter, sgd)(state, frozen, batch)
  grads = jax.grad(
    lambda p: loss_fn(adapter.apply(frozen, p, buffers), batch, None)[0]
  )(state.params)
  expected = jax.tree.map(lambda t, g: t - 0.1 * g, state.params, grads)
  jax.tree.map(np.testing.assert_allclose, new_state.params, expected)
  # Adam's moments mirror the parameters only: no frozen-weight-shaped state.
  *_, adam_state = setup()
  assert jax.tree.structure(adam_state.opt_state[0].mu) == jax.tree.structure(
    adam_state.params
  )


def test_donation_reuses_state_buffers():
  adapter, optimizer, frozen, state = setup()
  step = jax.jit(pj.make_train_step(loss_fn, adapter, optimizer), donate_argnums=0)
  old = state.params['body']['kernel'].a
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


def test_state_of_mesh_placed_params_is_all_on_the_mesh_and_compiles_once():
  """The step, key and Adam's counter follow θ onto the mesh: the step's
  output state has the input's shardings, so a second call reuses the
  compiled step."""
  adapter, optimizer, frozen, _ = setup()
  mesh = data_mesh()
  replicated = NamedSharding(mesh, P())
  params, buffers = adapter.init(jax.random.key(1), frozen)
  params = jax.device_put(params, replicated)
  state = pj.TrainState.create(params, buffers, optimizer, jax.random.key(2))
  for leaf in jax.tree.leaves(state):
    assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh
  assert jax.random.key_data(state.rng).tolist() == (
    jax.random.key_data(jax.random.key(2)).tolist()
  )
  step = jax.jit(pj.make_train_step(loss_fn, adapter, optimizer))
  frozen = jax.device_put(frozen, replicated)
  with compiled_programs() as compiled:
    for batch in batches(2):
      state, _ = step(
        state, frozen, jax.device_put(batch, NamedSharding(mesh, P('data')))
      )
  assert compiled.count('jit(step)') == 1, compiled


@pytest.mark.parametrize('factored', [False, True])
@pytest.mark.parametrize('check_vma', [True, False])
@pytest.mark.parametrize('with_regularizer', [False, True])
def test_shard_map_sgd_step_equals_one_device(check_vma, with_regularizer, factored):
  """SGD is sensitive to the gradient's scale (Adam hides most of it):
  with JAX's default check_vma=True, autodiff sums a replicated parameter's
  gradient over the devices, and the step must still take the mean. The
  factored path stays factored through check_vma's ``pvary`` of the
  kernels (warnings are errors in the tests)."""
  penalty = lambda w, params, buffers: jnp.sum((params.a - 2.0) ** 2)
  leaf = pj.lora(rank=2, b_init='normal')
  leaf = leaf._replace(regularizer=penalty) if with_regularizer else leaf
  adapter = pj.by_rules([('body/kernel', leaf), ('head/bias', 'bitfit()')])
  sgd, frozen = optax.sgd(0.1), frozen_mlp()
  params, buffers = adapter.init(jax.random.key(1), frozen)
  state = pj.TrainState.create(params, buffers, sgd, jax.random.key(2))
  batch = batches(1)[0]
  sharded = jax.jit(
    jax.shard_map(
      pj.make_train_step(loss_fn, adapter, sgd, axis_name='data', factored=factored),
      mesh=data_mesh(),
      in_specs=(P(), P(), P('data')),
      out_specs=(P(), P()),
      check_vma=check_vma,
    )
  )
  got, metrics = sharded(state, frozen, batch)
  want, want_metrics = jax.jit(pj.make_train_step(loss_fn, adapter, sgd))(
    state, frozen, batch
  )
  assert abs(float(metrics['grad_norm']) / float(want_metrics['grad_norm']) - 1) < 1e-5
  np.testing.assert_allclose(metrics['loss'], want_metrics['loss'], rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    got.params,
    want.params,
  )


@pytest.mark.parametrize('with_regularizer', [False, True])
def test_regularizer_is_added_to_the_objective(with_regularizer):
  base = pj.lora(rank=2, b_init='normal')
  penalty = lambda w, params, buffers: jnp.sum((params.a - 2.0) ** 2)
  leaf = base._replace(regularizer=penalty) if with_regularizer else base
  adapter = pj.by_rules([('body/kernel', leaf)])
  frozen = frozen_mlp()
  params, buffers = adapter.init(jax.random.key(0), frozen)
  state = pj.TrainState.create(params, buffers, optax.sgd(0.1), jax.random.key(0))
  _, metrics = pj.make_train_step(loss_fn, adapter, optax.sgd(0.1))(
    state, frozen, batches(1)[0]
  )
  if with_regularizer:
    a = np.float64(params['body']['kernel'].a)
    np.testing.assert_allclose(metrics['regularizer'], np.sum((a - 2) ** 2), rtol=1e-6)
  else:
    assert 'regularizer' not in metrics


class ShiftParams(NamedTuple):
  shift: jax.Array


class ShiftBuffers(NamedTuple):
  offset: jax.Array  # float
  keep: jax.Array  # bool mask
  order: jax.Array  # int32 permutation


def test_buffers_of_any_dtype_are_passed_to_apply_but_never_trained():
  def init(key, w):
    del key
    d = w.shape[1]
    buffers = ShiftBuffers(
      offset=jnp.ones(d),
      keep=jnp.arange(d) % 2 == 0,
      order=jnp.arange(d, dtype=jnp.int32)[::-1],
    )
    return ShiftParams(jnp.zeros(d)), buffers

  def apply(w, params, buffers):
    shifted = w + jnp.where(buffers.keep, params.shift + buffers.offset, 0.0)
    return shifted[:, buffers.order]

  leaf = pj.Adapter(init=init, apply=apply, num_params=lambda shape: shape[1])
  adapter = pj.by_rules([('head/kernel', leaf)])
  frozen = frozen_mlp()
  optimizer = optax.adamw(0.1, weight_decay=0.5)
  params, buffers = adapter.init(jax.random.key(0), frozen)
  assert pj.count(params) == 3
  state = pj.TrainState.create(params, buffers, optimizer, jax.random.key(0))
  assert jax.tree.structure(state.opt_state[0].mu) == jax.tree.structure(params)
  step = jax.jit(pj.make_train_step(loss_fn, adapter, optimizer), donate_argnums=0)
  for batch in batches(3):
    state, _ = step(state, frozen, batch)
  kept = state.buffers['head']['kernel']
  np.testing.assert_array_equal(kept.offset, 1.0)
  np.testing.assert_array_equal(kept.keep, [True, False, True])
  assert kept.order.dtype == jnp.int32 and list(kept.order) == [2, 1, 0]
  shift = state.params['head']['kernel'].shift
  assert np.all(shift[::2] != 0) and np.all(shift[1::2] == 0)  # masked: no gradient


@pytest.mark.parametrize('spec', ['sam_parser()', 'pissa(rank=4)', 'milora(rank=4)'])
def test_adam_state_is_the_size_of_the_trainable_parameters(spec):
  # v1 kept SVD bases in the optimized tree: SAM-PARSER on one 256×256 kernel
  # trained 256 scalars with 263,169 floats of Adam moments.
  frozen = {'k': {'kernel': jax.random.normal(jax.random.key(0), (256, 256))}}
  params, buffers = pj.by_rules([('k/kernel', spec)]).init(jax.random.key(1), frozen)
  trainable = 256 if spec == 'sam_parser()' else 4 * (256 + 256)
  assert pj.count(params) == trainable
  adam = optax.adam(1e-3).init(params)
  moments = sum(x.size for x in jax.tree.leaves((adam[0].mu, adam[0].nu)))
  assert moments == 2 * trainable
  assert sum(x.size for x in jax.tree.leaves(buffers)) > 0


def test_schedule_updates_run_after_each_step_and_are_checkpointed(tmp_path):
  """A toy schedule: every 2nd step, zero the LoRA factor ``a`` of body/kernel."""

  def update(count, frozen, params, buffers, grads, opt_state, step):
    del frozen, grads
    reset = step % 2 == 0
    lora = params['body']['kernel']
    a = jax.lax.cond(reset, jnp.zeros_like, lambda x: x, lora.a)
    params = {**params, 'body': {**params['body'], 'kernel': lora._replace(a=a)}}
    return params, buffers, opt_state, count + reset.astype(jnp.int32)

  schedule = pj.Schedule(
    init=lambda frozen, params, buffers: jnp.zeros((), jnp.int32), update=update
  )
  adapter, optimizer, frozen, _ = setup()
  params, buffers = adapter.init(jax.random.key(1), frozen)
  state = pj.TrainState.create(
    params, buffers, optimizer, jax.random.key(2), schedule=schedule, frozen=frozen
  )
  step = jax.jit(pj.make_train_step(loss_fn, adapter, optimizer, schedule=schedule))
  for batch in batches(4):
    state, _ = step(state, frozen, batch)
  assert int(state.schedule_state) == 2
  np.testing.assert_array_equal(state.params['body']['kernel'].a, 0)
  manager = pj.checkpoint_manager(tmp_path)
  pj.save_checkpoint(manager, state, {})
  restored, _ = pj.restore_checkpoint(manager, state)
  assert int(restored.schedule_state) == 2
