"""Orbax checkpoints resume a run exactly; adapter files round-trip."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_jax as pj
from tests._src.step_test import batches, frozen_mlp, loss_fn

RULES = [('.*/kernel', 'lora(rank=2)'), ('head/bias', 'bitfit()')]


def train(state, frozen, step, data, start, stop, manager=None, save_at=()):
  for position in range(start, stop):
    state, _ = step(state, frozen, data[position])
    if manager is not None and position + 1 in save_at:
      pj.save_checkpoint(
        manager, state, {'data_position': position + 1, 'config': {'rules': 'x'}}
      )
  return state


def fresh():
  adapter = pj.by_rules(RULES)
  optimizer = optax.adamw(1e-2)
  frozen = frozen_mlp()
  state = pj.TrainState.create(
    adapter.init(jax.random.key(0), frozen), optimizer, jax.random.key(5)
  )

  def noisy_loss(params, batch, rng):  # uses the RNG, so resuming must restore it
    noise = 0.1 * jax.random.normal(rng, batch['x'].shape)
    return loss_fn(params, {**batch, 'x': batch['x'] + noise}, rng)

  step = jax.jit(pj.make_train_step(noisy_loss, adapter, optimizer))
  return frozen, state, step


def test_resume_reaches_the_same_adapter_as_an_uninterrupted_run(tmp_path):
  data = batches(10)
  frozen, state, step = fresh()
  uninterrupted = train(state, frozen, step, data, 0, 10)

  frozen, state, step = fresh()
  manager = pj.checkpoint_manager(tmp_path / 'ckpt', max_to_keep=2)
  train(state, frozen, step, data, 0, 6, manager, save_at=(2, 4, 6))
  assert manager.all_steps() == [4, 6]  # max_to_keep

  _, template, step = fresh()  # a new process would start here
  restored, metadata = pj.restore_checkpoint(
    pj.checkpoint_manager(tmp_path / 'ckpt'), template
  )
  assert int(restored.step) == 6 and metadata['data_position'] == 6
  assert metadata['config'] == {'rules': 'x'}
  resumed = train(restored, frozen, step, data, metadata['data_position'], 10)

  assert int(resumed.step) == int(uninterrupted.step) == 10
  jax.tree.map(np.testing.assert_array_equal, resumed.params, uninterrupted.params)
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.tree.leaves(resumed.opt_state),
    jax.tree.leaves(uninterrupted.opt_state),
  )


def test_restore_without_checkpoint_is_a_clear_error(tmp_path):
  _, state, _ = fresh()
  manager = pj.checkpoint_manager(tmp_path / 'empty')
  with pytest.raises(pj.PeftError, match='no checkpoint in'):
    pj.restore_checkpoint(manager, state)


def test_adapter_file_round_trip_is_small_and_exact(tmp_path):
  frozen, state, _ = fresh()
  path = tmp_path / 'adapter.safetensors'
  meta = {'rules': [['.*/kernel', 'lora(rank=2)']]}
  pj.save_adapter(str(path), state.params, meta)
  theta, loaded_meta = pj.load_adapter(str(path))
  assert loaded_meta == meta
  jax.tree.map(np.testing.assert_array_equal, theta, state.params)
  n_bytes = 4 * pj.count(state.params)
  assert path.stat().st_size < n_bytes + 1024
  merged = pj.by_rules(RULES).apply(frozen, jax.tree.map(jnp.asarray, theta))
  assert jax.tree.map(jnp.shape, merged) == jax.tree.map(jnp.shape, frozen)
