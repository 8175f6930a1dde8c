"""Orbax checkpoints resume a run exactly; adapter files round-trip."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_jax as pj
from tests import references
from tests._src.step_test import batches, frozen_mlp, loss_fn

# body: an SVD method with float buffers; head: FlexLoRA (bool buffers); bias.
RULES = [
  ('body/kernel', 'pissa(rank=2)'),
  ('head/kernel', 'flexlora(rank=1, max_rank=2)'),
  ('head/bias', 'bitfit()'),
]


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
  params, buffers = adapter.init(jax.random.key(0), frozen)
  state = pj.TrainState.create(params, buffers, optimizer, jax.random.key(5))

  def noisy_loss(params, batch, rng):  # uses the RNG, so resuming must restore it
    noise = 0.1 * jax.random.normal(rng, batch['x'].shape)
    return loss_fn(params, {**batch, 'x': batch['x'] + noise}, rng)

  step = jax.jit(pj.make_train_step(noisy_loss, adapter, optimizer))
  return frozen, state, step


def test_resume_reaches_the_same_adapter_as_an_uninterrupted_run(tmp_path):
  with references.compilation_cache(tmp_path / 'xla'):  # fresh() compiles 3 times
    check_resume(tmp_path)


def check_resume(tmp_path):
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
  jax.tree.map(np.testing.assert_array_equal, resumed.buffers, uninterrupted.buffers)
  assert jax.tree.structure(resumed) == jax.tree.structure(uninterrupted)
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
  meta = {'rules': [list(rule) for rule in RULES]}
  pj.save_adapter(str(path), state.params, state.buffers, meta)
  like = jax.eval_shape(pj.by_rules(RULES).init, jax.random.key(0), frozen)
  params, buffers, loaded_meta = pj.load_adapter(str(path), like)
  assert loaded_meta == meta
  assert jax.tree.structure((params, buffers)) == jax.tree.structure(like)
  jax.tree.map(np.testing.assert_array_equal, params, state.params)
  jax.tree.map(np.testing.assert_array_equal, buffers, state.buffers)
  active = buffers['head']['kernel'].active
  assert active.dtype == np.bool_  # buffers keep their dtype
  n_bytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.buffers)))
  assert path.stat().st_size < n_bytes + 2048
  to_jnp = lambda t: jax.tree.map(jnp.asarray, t)
  merged = pj.by_rules(RULES).apply(frozen, to_jnp(params), to_jnp(buffers))
  expected = pj.by_rules(RULES).apply(frozen, state.params, state.buffers)
  jax.tree.map(np.testing.assert_array_equal, merged, expected)


def test_loading_into_a_different_adapter_is_a_clear_error(tmp_path):
  frozen, state, _ = fresh()
  path = tmp_path / 'adapter.safetensors'
  pj.save_adapter(str(path), state.params, state.buffers, {})
  other = [('.*/kernel', 'lora(rank=3)')]
  like = jax.eval_shape(pj.by_rules(other).init, jax.random.key(0), frozen)
  with pytest.raises(pj.PeftError, match='the params do not match this adapter'):
    pj.load_adapter(str(path), like)
  params, buffers, _ = pj.load_adapter(str(path))  # untyped: nested dicts
  assert set(params['body']['kernel']) == {'a', 'b'}
  assert set(buffers['body']['kernel']) == {'a0', 'b0'}
