"""N adapters trained as one vmapped program equal each trained alone."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_jax as pj
from peft_jax._src import paths
from tests._src.step_test import batches, frozen_mlp, loss_fn

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


def train_together(adapter, frozen, data, shared_batch):
  optimizers = [
    pj.adamw_per_adapter(lr, wd, shape) for lr, wd in zip(LRS, DECAYS, strict=True)
  ]
  states = pj.stack_states(
    [fresh_state(adapter, frozen, s, o) for s, o in zip(SEEDS, optimizers, strict=True)]
  )
  step = jax.jit(
    pj.make_many_train_step(
      noisy_loss, adapter, optimizers[0], shared_batch=shared_batch
    )
  )
  for batch in data:
    states, metrics = step(states, frozen, batch)
  assert metrics['loss'].shape == (len(SEEDS),)
  return states


def assert_close_params(got, want, **tolerance):
  for (name, g), (_, w) in zip(
    paths.named_leaves(got.params), paths.named_leaves(want.params), strict=True
  ):
    np.testing.assert_allclose(g, w, err_msg=name, **tolerance)


@pytest.mark.parametrize('shared_batch', [True, False])
def test_each_adapter_of_a_vmapped_run_equals_it_trained_alone(shared_batch):
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
  together = train_together(adapter, frozen, stacked, shared_batch)
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


def test_the_frozen_tree_is_an_argument_once_not_n_times():
  adapter, frozen = pj.by_rules(RULES), frozen_mlp()
  optimizer = pj.adamw_per_adapter(1e-2)
  n = 8
  states = pj.stack_states(
    [fresh_state(adapter, frozen, s, optimizer) for s in range(n)]
  )
  step = pj.make_many_train_step(noisy_loss, adapter, optimizer)
  compiled = jax.jit(step).lower(states, frozen, batches(1)[0]).compile()
  frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(frozen))
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(jax.random.key_data(states.rng)))
  state_bytes += sum(
    x.nbytes for x in jax.tree.leaves((states.params, states.buffers, states.opt_state))
  )
  batch_bytes = sum(x.nbytes for x in jax.tree.leaves(batches(1)[0]))
  arguments = compiled.memory_analysis().argument_size_in_bytes
  assert arguments < state_bytes + 2 * frozen_bytes + batch_bytes + 1024


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
