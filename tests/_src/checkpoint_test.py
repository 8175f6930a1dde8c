"""Orbax checkpoints resume a run exactly; adapter files round-trip, and
rebuild their adapter from the rules they record."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors import numpy as safetensors_numpy

import peft_jax as pj
from peft_jax._src import selectors
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
  assert loaded_meta == {
    **meta,
    'format_version': 1,
    'peft_jax_version': loaded_meta['peft_jax_version'],
  }
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


# ---------------------------------------------------------------------------
# Self-describing files: the rules in the metadata, one call to load.


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name='norm')(nn.Dense(8, name='dense')(x))
    h = pj.hook_point(self, 'ffn_output', h)
    return nn.Dense(3, name='head')(jax.nn.relu(h))


def net_rules(head_mask):
  return [
    # Adapter values whose init holds the mask (pj.get of the name would
    # draw random entries): recorded by name, the indices are in the file.
    *pj.sparse_rules({'head': {'kernel': head_mask}}),
    ('dense/kernel', 'lora(rank=2, alpha=4)'),  # a spec string
    (pj.is_layer_norm, pj.ln_tuning()),  # a registered predicate, an Adapter
    ('head/bias', None),  # frozen (is_bias would take it)
    (pj.is_bias, 'bitfit()'),  # a registered predicate, a spec string
    ('ffn_output', pj.houlsby(reduction_factor=2)),  # an ActivationAdapter
  ]


def perturbed(tree, seed):
  """Every float leaf of ``tree`` moved by N(0, 0.5²): no identity at init
  (NumPy draws: no compile per leaf shape)."""
  rng = np.random.default_rng(seed)

  def move(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    return jnp.asarray(x + 0.5 * rng.normal(size=x.shape).astype(x.dtype))

  return jax.tree.map(move, tree)


def test_a_file_rebuilds_its_adapter_from_the_rules_it_records(tmp_path):
  model, x = Net(), jnp.ones((2, 5))
  frozen = model.init(jax.random.key(0), x)['params']
  hooks = pj.hook_points(model, x)
  mask = np.zeros((8, 3), bool)
  mask[[0, 5, 7], [2, 0, 1]] = True
  rules = net_rules(mask)
  tree = pj.by_rules(rules)
  params, buffers = tree.init(jax.random.key(1), frozen, hooks)
  params = perturbed(params, 2)
  forward = lambda w, x: model.apply({'params': w}, x)
  fresh = jax.random.normal(jax.random.key(3), (4, 5))  # inputs never seen
  want = pj.adapted(tree, forward)(frozen, params, buffers, fresh)

  path = str(tmp_path / 'adapter.safetensors')
  pj.save_adapter(path, params, buffers, {'base_model': 'net'}, rules=rules)
  loaded = pj.load_adapter_file(path, frozen, hooks)

  got = pj.adapted(loaded.adapter, forward)(
    frozen, loaded.params, loaded.buffers, fresh
  )
  np.testing.assert_array_equal(got, want)
  assert loaded.adapter.name == tree.name
  assert jax.tree.structure(loaded.params) == jax.tree.structure(params)
  recorded = loaded.metadata['adapters']
  assert recorded[0][0] == 'head/kernel' and recorded[0][1].startswith('sparse(k=3')
  assert recorded[2][0] == {'predicate': 'is_layer_norm'}
  assert recorded[3] == ['head/bias', None]
  assert recorded[4] == [{'predicate': 'is_bias'}, pj.bitfit().name]
  assert recorded[5][1] == pj.houlsby(reduction_factor=2).name
  assert loaded.metadata['base_model'] == 'net'
  assert loaded.metadata['format_version'] == 1
  assert loaded.metadata['peft_jax_version']


def test_rules_round_trip_through_json():
  rules = [
    ('a/.*', pj.stacked(pj.lora(rank=2))),  # a wrapper around an adapter object
    (pj.is_bias, None),
  ]
  data = pj.serialize_rules(rules)
  assert data == [
    ['a/.*', pj.stacked('lora(rank=2)').name],
    [{'predicate': 'is_bias'}, None],
  ]
  assert pj.deserialize_rules(data) == [('a/.*', data[0][1]), (pj.is_bias, None)]


def one_line_error(call, match):
  with pytest.raises(pj.PeftError, match=match) as info:
    call()
  assert '\n' not in str(info.value)


@pytest.mark.parametrize(
  'rule, message',
  [
    (
      (lambda name, leaf: leaf.ndim == 1, 'bitfit()'),
      'rule 1: selector <lambda> is a predicate that is not registered, so an '
      'adapter file cannot record it; use a regex selector, or register it with '
      '@pj.register_selector',
    ),
    (
      ('body/kernel', pj.lora(rank=2)._replace(name='')),
      r"rule 1 \('body/kernel'\): a hand-built adapter \(no name\), so an adapter "
      'file cannot record it; give a spec string, or register a method',
    ),
    (
      ('body/kernel', pj.lora(rank=2)._replace(apply=lambda w, p, b: w)),
      r"rule 1 \('body/kernel'\): adapter \"lora\(rank=2, .*\)\" differs from what "
      'pj.get of its name builds',
    ),
  ],
)
def test_a_rule_a_file_cannot_record_is_a_one_line_error(tmp_path, rule, message):
  _, state, _ = fresh()
  path = tmp_path / 'adapter.safetensors'
  rules = [('head/kernel', 'lora(rank=1)'), rule]
  save = lambda: pj.save_adapter(str(path), state.params, state.buffers, rules=rules)
  one_line_error(save, message)
  assert not path.exists()


def test_a_registered_predicate_is_recorded_by_name(tmp_path, monkeypatch):
  monkeypatch.setattr(selectors, '_SELECTORS', dict(selectors._SELECTORS))

  @pj.register_selector('is_head_kernel')
  def is_head_kernel(name, leaf):
    return name == 'head/kernel'

  assert 'is_head_kernel' in pj.selector_names()
  assert pj.get_selector('is_head_kernel') is is_head_kernel
  one_line_error(
    lambda: pj.register_selector('is_head_kernel')(is_head_kernel),
    'already registered',
  )
  frozen = frozen_mlp()
  rules = [(is_head_kernel, 'lora(rank=1)')]
  params, buffers = pj.by_rules(rules).init(jax.random.key(0), frozen)
  path = str(tmp_path / 'adapter.safetensors')
  pj.save_adapter(path, perturbed(params, 1), buffers, rules=rules)
  loaded = pj.load_adapter_file(path, frozen)
  assert loaded.metadata['adapters'][0][0] == {'predicate': 'is_head_kernel'}
  want = pj.merge(pj.by_rules(rules), frozen, perturbed(params, 1), buffers)
  got = pj.merge(loaded.adapter, frozen, loaded.params, loaded.buffers)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_loading_a_file_without_rules_or_with_unknown_ones_is_a_clear_error(tmp_path):
  frozen, state, _ = fresh()
  path = str(tmp_path / 'adapter.safetensors')
  pj.save_adapter(path, state.params, state.buffers, {'name': 'x'})
  one_line_error(
    lambda: pj.load_adapter_file(path, frozen),
    "records no rules \\('adapters'\\); save it with pj.save_adapter\\(..., rules=",
  )
  one_line_error(
    lambda: pj.deserialize_rules([[{'predicate': 'is_biass'}, 'bitfit()']]),
    "rule 0: unknown selector 'is_biass'; did you mean is_bias",
  )
  one_line_error(
    lambda: pj.load_adapter_file(str(tmp_path / 'missing.safetensors'), frozen),
    'missing.safetensors is not a file; expected an adapter file',
  )
  pj.save_adapter(path, state.params, state.buffers, rules=[('head/.*', 'full()')])
  one_line_error(
    lambda: pj.load_adapter_file(path, frozen),
    'adapter.safetensors: the params do not match this adapter',
  )
  newer = str(tmp_path / 'newer.safetensors')
  metadata = {'peft_jax': json.dumps({'format_version': 2, 'adapters': []})}
  safetensors_numpy.save_file({}, newer, metadata=metadata)
  one_line_error(
    lambda: pj.load_adapter(newer),
    'format_version 2 is newer than this peft_jax reads \\(1\\); upgrade',
  )


def small_state(dtype=jnp.float32):
  params = {'w': jnp.arange(12.0, dtype=dtype).reshape(3, 4)}
  return pj.TrainState.create(params, {}, optax.adam(1e-3), jax.random.key(0))


def saved_steps(directory, *steps):
  """A manager over ``directory`` holding ``small_state`` at ``steps``
  (values shifted by the step, so each step is recognisable)."""
  manager = pj.checkpoint_manager(str(directory))
  state = small_state()
  for step in steps:
    params = {'w': state.params['w'] + step}
    pj.save_checkpoint(
      manager, state._replace(params=params, step=jnp.int32(step)), {'at': step}
    )
  return manager, state


def largest_data_file(step_dir):
  files = [p for p in (step_dir / 'state').rglob('d/*') if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def test_a_damaged_step_is_moved_aside_and_the_next_older_one_restored(tmp_path):
  directory = tmp_path / 'checkpoints'
  manager, target = saved_steps(directory, 1, 2)
  path = largest_data_file(directory / '2')
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01  # one flipped bit: orbax itself reads it back
  path.write_bytes(bytes(data))
  reports = []
  state, metadata = pj.restore_newest_good(manager, target, report=reports.append)
  assert metadata == {'at': 1} and int(state.step) == 1
  np.testing.assert_array_equal(state.params['w'], target.params['w'] + 1)
  (report,) = reports
  assert report.startswith(f'checkpoint step 2 in {directory} is damaged (state/')
  assert report.endswith(
    f'differs from what was saved (CRC-32)); moved to {directory}.damaged/2'
  )
  assert manager.all_steps() == [1] and (tmp_path / 'checkpoints.damaged/2').is_dir()
  with pytest.raises(pj.DamagedCheckpoint, match=r'step 2 .* is damaged'):
    pj.restore_checkpoint(
      pj.checkpoint_manager(str(tmp_path / 'checkpoints.damaged')), target
    )


def test_with_every_step_damaged_nothing_is_restored_or_deleted(tmp_path):
  directory = tmp_path / 'checkpoints'
  manager, target = saved_steps(directory, 1, 2)
  for step in (1, 2):
    path = largest_data_file(directory / str(step))
    path.write_bytes(path.read_bytes()[:10])
  with pytest.raises(pj.PeftError, match='refusing to start over silently'):
    pj.restore_newest_good(manager, target, report=lambda line: None)
  assert sorted(p.name for p in (tmp_path / 'checkpoints.damaged').iterdir()) == [
    '1',
    '2',
  ]
  assert pj.restore_newest_good(manager, target) is None  # nothing left to try


def test_a_non_finite_state_is_never_saved(tmp_path):
  manager, state = saved_steps(tmp_path, 1)
  bad = state._replace(
    params={'w': state.params['w'].at[0, 0].set(jnp.inf)}, step=jnp.int32(2)
  )
  with pytest.raises(
    pj.PeftError, match=r'not saving step 2: params/w holds non-finite'
  ):
    pj.save_checkpoint(manager, bad, {})
  # bfloat16 is not a NumPy inexact dtype: its NaNs must be found all the same.
  bf16 = small_state(jnp.bfloat16)
  w = bf16.params['w'].at[1, 1].set(jnp.nan)
  with pytest.raises(pj.PeftError, match=r'not saving step 3: params/w holds'):
    pj.save_checkpoint(manager, bf16._replace(params={'w': w}, step=jnp.int32(3)), {})
  assert manager.all_steps() == [1]


def test_restore_keeps_the_stored_dtype_unless_cast_and_names_a_shape_misfit(tmp_path):
  manager, _ = saved_steps(tmp_path, 1)
  as_bf16 = small_state(jnp.bfloat16)
  kept, _ = pj.restore_checkpoint(manager, as_bf16)
  cast, _ = pj.restore_checkpoint(manager, as_bf16, cast=True)
  assert (
    kept.params['w'].dtype == jnp.float32 and cast.params['w'].dtype == jnp.bfloat16
  )
  np.testing.assert_array_equal(kept.params['w'], np.arange(12.0).reshape(3, 4) + 1)
  other = small_state()._replace(params={'w': jnp.zeros((4, 3))})
  with pytest.raises(
    pj.PeftError,
    match=r'holds params/w of shape \(3, 4\); this training state has \(4, 3\)',
  ):
    pj.restore_checkpoint(manager, other)
  refuse = lambda metadata: (_ for _ in ()).throw(pj.PeftError(f'not mine: {metadata}'))
  with pytest.raises(pj.PeftError, match=r"not mine: \{'at': 1\}"):
    pj.restore_checkpoint(manager, small_state(), accept=refuse)


def test_adapter_file_errors_name_the_path_and_the_rule_that_differs(tmp_path):
  frozen = frozen_mlp()
  rules = [('body/kernel', 'lora(rank=2, alpha=4)')]
  adapter = pj.by_rules(rules)
  params, buffers = adapter.init(jax.random.key(0), frozen)
  path = str(tmp_path / 'a.safetensors')
  pj.save_adapter(path, params, buffers, rules=rules)
  assert (tmp_path / 'a.safetensors').stat().st_mode & 0o777 == 0o666 & ~current_umask()
  like = (params, buffers)
  pj.load_adapter(path, like, rules=rules)  # the same rules: fine
  with pytest.raises(
    pj.PeftError,
    match=r'a.safetensors was saved with rule 0 .*alpha=4.*, but is used with '
    r'.*alpha=64',
  ):
    pj.load_adapter(path, like, rules=[('body/kernel', 'lora(rank=2, alpha=64)')])
  missing = str(tmp_path / 'nope.safetensors')
  with pytest.raises(pj.PeftError, match=r'nope.safetensors is not a file'):
    pj.load_adapter(missing)
  (tmp_path / 'cut.safetensors').write_bytes(
    (tmp_path / 'a.safetensors').read_bytes()[:40]
  )
  with pytest.raises(
    pj.PeftError, match=r'cut.safetensors is not a readable safetensors file'
  ):
    pj.load_adapter(str(tmp_path / 'cut.safetensors'))
  with pytest.raises(
    pj.PeftError,
    match=r'cannot write .*/no/dir/a.safetensors: its directory .* does not exist',
  ):
    pj.save_adapter(str(tmp_path / 'no/dir/a.safetensors'), params, buffers)


def current_umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask
