"""``adapter_shardings`` / ``optimizer_shardings``: θ follows the frozen
weights' shardings on a (data, fsdp, tensor) mesh of 8 simulated devices.

For every registered weight method (the contract test's rows, kernels twice
as large so each axis splits in two): θ initialises already placed (``jit``
with ``out_shardings``), the adapted weight computed from the placed θ equals
the one on one device, and the optimizer state places. The specs are checked
exactly where the formula fixes them (LoRA, DoRA, (IA)³, full, BitFit,
stacked LoRA on a square kernel, where shape matching cannot tell ``d_in``
from ``d_out``); activation-side parameters are replicated.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import peft_jax as pj
from tests.methods.contract_test import CASES, cases

# Shapes twice the contract's, and options that fit them.
SPECS = {'vera/stored': 'vera(rank=4, shared_shape=(14, 10))'}


def mesh():
  return jax.make_mesh(
    (2, 2, 2), ('data', 'fsdp', 'tensor'), axis_types=(AxisType.Auto,) * 3
  )


def placed(frozen: dict, m) -> dict:
  """Kernels on ``P('fsdp', 'tensor')``, vectors on ``P('tensor')``."""
  spec = lambda x: P('fsdp', 'tensor') if x.ndim == 2 else P('tensor')
  return {k: jax.device_put(v, NamedSharding(m, spec(v))) for k, v in frozen.items()}


# The contract test's fast cases in `make test-fast`, every method in `make test`.
@pytest.mark.parametrize('name', cases(sorted(CASES)))
def test_every_method_initialises_placed_and_computes_the_same_weight(name):
  spec, shape, _ = CASES[name]
  spec = SPECS.get(name, spec)
  shape = tuple(2 * d for d in shape)
  w = jax.random.normal(jax.random.key(0), shape)
  adapter = pj.by_rules([('w', spec)])
  m = mesh()
  frozen = placed({'w': w}, m)
  param_shardings, buffer_shardings = pj.adapter_shardings(adapter, frozen)
  init = jax.jit(adapter.init, out_shardings=(param_shardings, buffer_shardings))
  params, buffers = init(jax.random.key(1), frozen)
  for leaf, sharding in zip(
    jax.tree.leaves(params), jax.tree.leaves(param_shardings), strict=True
  ):
    assert leaf.sharding == sharding
  params = jax.tree.map(lambda x: x + 0.1, params)  # away from identity
  x = jax.random.normal(jax.random.key(2), (3, shape[0]))
  forward = pj.adapted(adapter, lambda weights, x: x @ weights['w'])
  placed_out = jax.jit(forward)(frozen, params, buffers, x)
  one_device = forward({'w': w}, *jax.device_get((params, buffers)), x)
  np.testing.assert_allclose(placed_out, one_device, rtol=1e-5, atol=1e-5)
  optimizer = optax.adam(1e-3)
  opt_shardings = pj.optimizer_shardings(optimizer, params, param_shardings)
  opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
  assert jax.tree.structure(opt_state) == jax.tree.structure(
    optimizer.init(jax.device_get(params))
  )


def specs_of(adapter, frozen):
  return jax.tree.map(lambda s: s.spec, pj.adapter_shardings(adapter, frozen)[0])


def test_specs_follow_the_axes_each_parameter_shares_with_its_kernel():
  m = mesh()
  frozen = placed(
    {'square': jnp.ones((8, 8)), 'k': jnp.ones((8, 6)), 'bias': jnp.ones((6,))}, m
  )
  frozen['stack'] = jax.device_put(
    jnp.ones((4, 8, 8)), NamedSharding(m, P(None, 'fsdp', 'tensor'))
  )
  rules = [
    ('square', 'dora(rank=2)'),
    ('k', 'ia3(feedforward=True)'),
    ('bias', 'bitfit()'),
    ('stack', "stacked('lora(rank=2)')"),
  ]
  got = specs_of(pj.by_rules(rules), frozen)
  assert got['square'] == pj.dora(rank=2).init(jax.random.key(0), jnp.ones((8, 8)))[
    0
  ]._replace(a=P('fsdp', None), b=P(None, 'tensor'), m=P('tensor'))
  assert tuple(got['k']) == (P('fsdp'),)  # feed-forward (IA)³ scales d_in
  assert got['bias'] == P('tensor')
  assert (got['stack'].a, got['stack'].b) == (
    P(None, 'fsdp', None),
    P(None, None, 'tensor'),
  )
  full = specs_of(pj.by_rules([('k', 'full()')]), frozen)
  assert full['k'] == P('fsdp', 'tensor')


def test_hook_point_parameters_are_replicated():
  m = mesh()
  frozen = placed({'k': jnp.ones((8, 6))}, m)
  hooks = {'point': pj.HookPoint(jax.ShapeDtypeStruct((2, 5, 12), jnp.float32), ())}
  adapter = pj.by_rules(
    [('point', 'houlsby(reduction_factor=4)'), ('k', 'lora(rank=2)')]
  )
  params_shardings, _ = pj.adapter_shardings(adapter, frozen, hooks)
  specs = jax.tree.map(lambda s: s.spec, params_shardings)
  assert all(spec == P() for spec in jax.tree.leaves(specs['point']))
  assert specs['k'].a == P('fsdp', None)


def test_weights_off_any_mesh_are_a_one_line_error():
  with pytest.raises(
    pj.PeftError, match='no frozen leaf is placed with a NamedSharding'
  ):
    pj.adapter_shardings(pj.by_rules([('k', 'lora(rank=2)')]), {'k': jnp.ones((4, 3))})


def test_a_checkpoint_restores_onto_another_mesh(tmp_path):
  """Saved from θ replicated over 8 data-parallel devices, restored into the
  fresh state of a (data, fsdp, tensor) mesh: same values, the new
  placement (the fresh state is the template)."""
  rules = [('k', 'lora(rank=2)'), ('bias', 'bitfit()')]
  adapter, optimizer = pj.by_rules(rules), optax.adam(1e-2)
  weights = {'k': jax.random.normal(jax.random.key(0), (8, 6)), 'bias': jnp.ones((6,))}

  def fresh_state(frozen):
    shardings = pj.adapter_shardings(adapter, frozen)
    params, buffers = jax.jit(adapter.init, out_shardings=shardings)(
      jax.random.key(1), frozen
    )
    return pj.TrainState.create(params, buffers, optimizer, jax.random.key(2))

  data = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
  frozen = jax.device_put(weights, NamedSharding(data, P()))
  state = fresh_state(frozen)

  def loss_fn(w, batch, rng):
    del rng
    return jnp.mean((batch @ w['k'] + w['bias']) ** 2), {}

  batch = jax.device_put(jnp.ones((8, 8)), NamedSharding(data, P('data')))
  step = jax.jit(pj.make_train_step(loss_fn, adapter, optimizer))
  state, _ = step(state, frozen, batch)
  manager = pj.checkpoint_manager(str(tmp_path))
  pj.save_checkpoint(manager, state, {'note': 'mesh A'})

  target = fresh_state(placed(weights, mesh()))
  restored, metadata = pj.restore_checkpoint(manager, target)
  assert metadata == {'note': 'mesh A'}
  jax.tree.map(
    lambda got, want, like: (
      np.testing.assert_array_equal(jax.device_get(got), jax.device_get(want)),
      got.sharding == like.sharding
      or pytest.fail(f'{got.sharding} != {like.sharding}'),
    ),
    restored._replace(rng=None),
    state._replace(rng=None),
    target._replace(rng=None),
  )
  assert restored.params['k'].a.sharding.spec == P('fsdp', None)
  np.testing.assert_array_equal(
    jax.random.key_data(restored.rng), jax.random.key_data(state.rng)
  )
