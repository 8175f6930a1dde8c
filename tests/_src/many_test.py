"""N adapters trained as one vmapped program equal each trained alone."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import peft_jax as pj
from peft_jax._src import paths
from tests._src.step_test import N_DEVICES, batches, frozen_mlp, loss_fn
from tests.references import compiled_programs

RULES = [('body/kernel', 'lora(rank=2, alpha=4)'), ('head/kernel', 'dora(rank=1)')]
SEEDS = (0, 1, 2)
LRS = (1e-2, 3e-2, 1e-3)
DECAYS = (0.0, 0.1, 0.01)
STEPS = 5


def shape(count):
  """Linear warm-up over 2 updates, then linear decay to 0 at STEPS."""
  count = jnp.asarray(count, jnp.float32)
  return jnp.minimum(count / 2, (STEPS - count) / (STEPS - 2))


def fresh_state(adapter, frozen, seed, optimizer):
  params, buffers = adapter.init(jax.random.key(seed), frozen)
  return pj.TrainState.create(params, buffers, optimizer, jax.random.key(100 + seed))


def noisy_loss(params, batch, rng):  # uses the RNG: each adapter its own
  x = batch['x'] + 0.1 * jax.random.normal(rng, batch['x'].shape)
  return loss_fn(params, {**batch, 'x': x}, rng)


def train_alone(adapter, frozen, seed, optimizer, data):
  state = fresh_state(adapter, frozen, seed, optimizer)
  step = jax.jit(pj.make_train_step(noisy_loss, adapter, optimizer))
  for batch in data:
    state, _ = step(state, frozen, batch)
  return state


def train_together(adapter, frozen, data, shared_batch, adapters_per_pass=None):
  optimizers = [
    pj.adamw_per_adapter(lr, wd, shape) for lr, wd in zip(LRS, DECAYS, strict=True)
  ]
  states = pj.stack_states(
    [fresh_state(adapter, frozen, s, o) for s, o in zip(SEEDS, optimizers, strict=True)]
  )
  step = jax.jit(
    pj.make_many_train_step(
      noisy_loss,
      adapter,
      optimizers[0],
      shared_batch=shared_batch,
      adapters_per_pass=adapters_per_pass,
    )
  )
  for batch in data:
    states, metrics = step(states, frozen, batch)
  assert metrics['loss'].shape == (len(SEEDS),)
  return states


def assert_close_params(got, want, **tolerance):
  assert_close_trees(got.params, want.params, **tolerance)


# adapters_per_pass: None, one vmapped pass; 1, one adapter after another; 2,
# a pass of 2 then the remaining 1 (N = 3).
@pytest.mark.parametrize(
  'shared_batch, adapters_per_pass',
  [(True, None), (False, None), (True, 2), (False, 1)],
)
def test_each_adapter_of_a_vmapped_run_equals_it_trained_alone(
  shared_batch, adapters_per_pass
):
  adapter, frozen = pj.by_rules(RULES), frozen_mlp()
  data = batches(STEPS * len(SEEDS))
  if shared_batch:
    own = lambda i: data[:STEPS]
    stacked = data[:STEPS]
  else:  # adapter i reads batches i, i + N, i + 2N, ...: its own data order
    own = lambda i: data[i :: len(SEEDS)]
    stacked = [
      pj.stack_trees([own(i)[t] for i in range(len(SEEDS))]) for t in range(STEPS)
    ]
  together = train_together(adapter, frozen, stacked, shared_batch, adapters_per_pass)
  for i, (seed, lr, decay) in enumerate(zip(SEEDS, LRS, DECAYS, strict=True)):
    alone = train_alone(
      adapter, frozen, seed, pj.adamw_per_adapter(lr, decay, shape), own(i)
    )
    assert int(pj.take_adapter(together, i).step) == STEPS
    assert_close_params(pj.take_adapter(together, i), alone, rtol=1e-6, atol=1e-7)
    # The per-adapter AdamW is optax.adamw with the scheduled rate.
    reference = optax.adamw(lambda t, lr=lr: lr * shape(t), weight_decay=decay)
    plain = train_alone(adapter, frozen, seed, reference, own(i))
    assert_close_params(alone, plain, rtol=1e-5, atol=1e-7)


def assert_close_trees(got, want, **tolerance):
  for (name, g), (_, w) in zip(
    paths.named_leaves(got), paths.named_leaves(want), strict=True
  ):
    np.testing.assert_allclose(g, w, err_msg=name, **tolerance)


def assert_same_leaves(got, want):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(g, w)


def test_stacked_states_checkpoint_together_and_export_one_adapter(tmp_path):
  adapter, frozen = pj.by_rules(RULES), frozen_mlp()
  optimizers = [pj.adamw_per_adapter(lr) for lr in LRS]
  states = pj.stack_states(
    [fresh_state(adapter, frozen, s, o) for s, o in zip(SEEDS, optimizers, strict=True)]
  )
  step = jax.jit(pj.make_many_train_step(noisy_loss, adapter, optimizers[0]))
  states, _ = step(states, frozen, batches(1)[0])
  manager = pj.checkpoint_manager(str(tmp_path / 'checkpoints'))
  pj.save_checkpoint(manager, states, {'n': 3})
  restored, _ = pj.restore_checkpoint(manager, states)
  assert_same_leaves(restored.params, states.params)
  one = pj.take_adapter(states, 1)
  path = str(tmp_path / 'adapter_1.safetensors')
  pj.save_adapter(path, one.params, one.buffers, rules=RULES)
  loaded = pj.load_adapter_file(path, frozen)
  assert_same_leaves(loaded.params, one.params)


def test_stack_names_the_first_leaf_that_differs():
  frozen = frozen_mlp()
  a = pj.by_rules([('body/kernel', 'lora(rank=2)')]).init(jax.random.key(0), frozen)
  b = pj.by_rules([('body/kernel', 'lora(rank=3)')]).init(jax.random.key(0), frozen)
  with pytest.raises(
    pj.PeftError, match=r'stack_trees: tree 1 has .*body/kernel/a of shape \(6, 3\)'
  ):
    pj.stack_trees([a, b])
  with pytest.raises(pj.PeftError, match='stack_trees: no trees given'):
    pj.stack_trees([])


RANKS = (2, 4, 8)
RANK_ALPHA = 4.0


def wide_mlp(d_in, d_hidden):
  k0, k1, k2 = jax.random.split(jax.random.key(7), 3)
  frozen = {
    'body': {
      'kernel': jax.random.normal(k0, (d_in, d_hidden)),
      'bias': jnp.zeros(d_hidden),
    },
    'head': {'kernel': jax.random.normal(k1, (d_hidden, 3)), 'bias': jnp.zeros(3)},
  }
  data = [
    {'x': jax.random.normal(k, (16, d_in)), 'y': jax.random.randint(k, (16,), 0, 3)}
    for k in jax.random.split(k2, STEPS)
  ]
  return frozen, data


def rank_rules(body):
  return [('body/kernel', body), ('head/kernel', 'dora(rank=1)')]


@pytest.mark.parametrize('factored', [False, True])
def test_adapters_of_ranks_2_4_8_padded_to_8_equal_each_trained_alone(factored):
  frozen, data = wide_mlp(12, 16)
  padded = pj.by_rules(
    rank_rules(f"rank_masked('lora(rank={max(RANKS)}, alpha={RANK_ALPHA})')")
  )
  like = jax.eval_shape(padded.init, jax.random.key(0), frozen)
  states, alone = [], []
  for seed, rank, lr, decay in zip(SEEDS, RANKS, LRS, DECAYS, strict=True):
    optimizer = pj.adamw_per_adapter(lr, decay, shape)
    own = pj.by_rules(rank_rules(f'lora(rank={rank}, alpha={RANK_ALPHA})'))
    params, buffers = own.init(jax.random.key(seed), frozen)
    padded_params, padded_buffers = pj.pad_rank(params, buffers, like)
    rng = jax.random.key(100 + seed)
    states.append(pj.TrainState.create(padded_params, padded_buffers, optimizer, rng))
    state = pj.TrainState.create(params, buffers, optimizer, rng)
    step = jax.jit(pj.make_train_step(noisy_loss, own, optimizer, factored=factored))
    for batch in data:
      state, _ = step(state, frozen, batch)
    alone.append((own, state))
  step = pj.make_many_train_step(noisy_loss, padded, optimizer, factored=factored)
  together = pj.stack_states(states)
  for batch in data:
    together, _ = jax.jit(step)(together, frozen, batch)
  for i, (rank, (own, want)) in enumerate(zip(RANKS, alone, strict=True)):
    got = pj.take_adapter(together, i)
    lora, want_lora = got.params['body']['kernel'], want.params['body']['kernel']
    assert int(got.buffers['body']['kernel'].rank) == rank
    np.testing.assert_array_equal(lora.a[:, rank:], 0)
    np.testing.assert_array_equal(lora.b[rank:], 0)
    tolerance = {'rtol': 1e-5, 'atol': 1e-6}
    np.testing.assert_allclose(lora.a[:, :rank], want_lora.a, **tolerance)
    np.testing.assert_allclose(lora.b[:rank], want_lora.b, **tolerance)
    assert_close_trees(got.params['head'], want.params['head'], **tolerance)
    merged = pj.merge(padded, frozen, got.params, got.buffers)
    assert_close_trees(
      merged, pj.merge(own, frozen, want.params, want.buffers), **tolerance
    )


def adapters_mesh():
  # Auto axes, as step_test's data mesh: the partitioner places the vmapped step.
  return jax.make_mesh((N_DEVICES,), ('adapters',), axis_types=(AxisType.Auto,))


def halve_b_every_2nd_step():
  """A toy schedule whose state differs per adapter: every 2nd update, halve
  body/kernel's LoRA ``b`` and count it."""

  def update(count, frozen, params, buffers, grads, opt_state, step):
    del frozen, grads
    halve = step % 2 == 0
    lora = params['body']['kernel']
    b = jnp.where(halve, 0.5 * lora.b, lora.b)
    params = {**params, 'body': {**params['body'], 'kernel': lora._replace(b=b)}}
    return params, buffers, opt_state, count + halve.astype(jnp.int32)

  return pj.Schedule(
    init=lambda frozen, params, buffers: jnp.zeros((), jnp.int32), update=update
  )


@pytest.mark.parametrize('factored', [False, True])
def test_adapters_sharded_over_a_mesh_equal_the_unsharded_run(factored):
  """N = 8 adapters (head/kernel at ranks 1-3: rank_masked), one per device, with a
  schedule; the step compiles once and keeps every stacked leaf split
  over 'adapters'."""
  adapter = pj.by_rules([RULES[0], ('head/kernel', "rank_masked('lora(rank=3)')")])
  frozen, schedule = frozen_mlp(), halve_b_every_2nd_step()
  optimizers = [pj.adamw_per_adapter(1e-2 * (1 + i)) for i in range(N_DEVICES)]
  states = []
  for i, optimizer in enumerate(optimizers):
    params, buffers = adapter.init(jax.random.key(i), frozen)
    params, buffers = pj.with_rank(params, buffers, 1 + i % 3)
    states.append(
      pj.TrainState.create(
        params, buffers, optimizer, jax.random.key(i), schedule=schedule, frozen=frozen
      )
    )
  states = pj.stack_states(states)
  build = lambda: jax.jit(
    pj.make_many_train_step(
      noisy_loss, adapter, optimizers[0], factored=factored, schedule=schedule
    )
  )
  step, sharded_step = build(), build()
  mesh = adapters_mesh()
  sharded = pj.shard_adapters(states, mesh)
  frozen_replicated = jax.device_put(frozen, NamedSharding(mesh, P()))
  data = batches(4)
  compiled = []
  for batch in data:
    states, _ = step(states, frozen, batch)
    with compiled_programs() as now:  # The sharded step's compiles only.
      sharded, metrics = sharded_step(sharded, frozen_replicated, batch)
    compiled += now
  assert compiled.count('jit(step)') == 1, compiled  # Compiled once.
  assert metrics['loss'].sharding.spec == P('adapters')
  stacked_leaves = jax.tree.leaves(sharded._replace(step=None))
  assert all(leaf.sharding.spec == P('adapters') for leaf in stacked_leaves)
  assert sharded.step.sharding.spec == P()
  compiled = sharded_step.lower(sharded, frozen_replicated, data[0]).compile()
  for collective in ('all-reduce', 'all-gather', 'all-to-all', 'collective-permute'):
    assert collective not in compiled.as_text()  # adapters are independent
  np.testing.assert_array_equal(sharded.schedule_state, 2)
  assert_close_trees(sharded.params, states.params, rtol=1e-5, atol=1e-6)
  # Adapter 5 of the sharded run is the one trained alone with the schedule.
  params, buffers = pj.with_rank(*adapter.init(jax.random.key(5), frozen), 3)
  alone = pj.TrainState.create(
    params, buffers, optimizers[5], jax.random.key(5), schedule=schedule, frozen=frozen
  )
  one_step = jax.jit(
    pj.make_train_step(
      noisy_loss, adapter, optimizers[5], factored=factored, schedule=schedule
    )
  )
  for batch in data:
    alone, _ = one_step(alone, frozen, batch)
  assert_close_params(pj.take_adapter(sharded, 5), alone, rtol=1e-5, atol=1e-6)


def test_shard_adapters_names_bad_input():
  mesh = adapters_mesh()
  with pytest.raises(pj.PeftError, match="axis 'data' is not an axis of the mesh"):
    pj.shard_adapters({'x': jnp.zeros((8, 2))}, mesh, 'data')
  with pytest.raises(
    pj.PeftError, match=r'sizes \[3\]; expected one N, a multiple of mesh axis '
  ):
    pj.shard_adapters({'x': jnp.zeros((3, 2))}, mesh)


def memory(n, factored):
  """``(argument bytes, temp bytes, frozen bytes F)`` of the compiled many-step
  for ``n`` LoRA adapters on a 512×512 kernel and a batch of 2 (F ≈ 1 MiB;
  θ and Adam of one adapter ≈ 24 KiB; one activation 4 KiB)."""
  frozen, data = wide_mlp(512, 512)
  adapter = pj.by_rules([('body/kernel', 'lora(rank=2)')])
  optimizer = pj.adamw_per_adapter(1e-2)
  states = pj.stack_states(
    [fresh_state(adapter, frozen, seed, optimizer) for seed in range(n)]
  )
  step = pj.make_many_train_step(noisy_loss, adapter, optimizer, factored=factored)
  batch = jax.tree.map(lambda x: x[:2], data[0])
  stats = jax.jit(step).lower(states, frozen, batch).compile().memory_analysis()
  frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(frozen))
  return stats.argument_size_in_bytes, stats.temp_size_in_bytes, frozen_bytes


@pytest.mark.parametrize('factored', [False, True])
def test_the_frozen_weights_are_not_copied_n_times(factored):
  """From N = 1 to N = 8 adapters, the compiled step's arguments grow by 7
  adapters' state only (≪ 7 F): the frozen tree is one argument, not one
  per adapter (``in_axes=None``; a per-adapter copy would add 7 F). On the
  factored path its scratch memory (temp) grows by < F/2: activations and
  θ-sized gradients and updates per adapter, no merged weight and no weight
  gradient (a kernel broadcast to N or merged per adapter would add ≥ 7 F).
  In weight space each adapter's merged ``w' = w + s·a@b`` (and the
  gradient with respect to it) is per adapter, so temp grows by several F
  there (measured on CPU: 2 MiB at N = 1, 8 MiB at N = 8, one kernel-sized
  buffer per adapter): the factored path is the one that avoids N merged
  copies."""
  args_1, temp_1, frozen_bytes = memory(1, factored)
  args_8, temp_8, _ = memory(8, factored)
  assert args_8 - args_1 < frozen_bytes / 4
  if factored:
    assert temp_8 - temp_1 < frozen_bytes / 2
  else:
    assert temp_8 - temp_1 > 5 * frozen_bytes
