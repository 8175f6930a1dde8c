"""Activation-side hybrids under data parallelism: one UniPELT + MAM train
step on a batch sharded over 8 simulated devices (jit with a data-sharded
batch, pmap, and shard_map) equals the step on one device.

shard_map runs with JAX's default ``check_vma=True`` (the factored path
sees through its ``pvary`` of the frozen kernels; warnings are errors).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import peft_jax as pj
from peft_jax.models import bert
from tests import references
from tests.methods.prefix_tuning_test import CONFIG

# Three meshes over 8 simulated devices, each a compile of MAM and UniPELT on
# tiny BERT: the whole module runs in `make test`, not the fast suite.
pytestmark = pytest.mark.slow

N = 8
# UniPELT's three gated parts plus MAM's parallel FFN adapter: shared MLP,
# per-example gates and per-layer parameters in one tree.
RULES = [
  *pj.recipes.unipelt(lora_rank=2, prefix_length=3, bottleneck=6, reduction_factor=4),
  ('.*/ffn_block', 'scaled_parallel(rank=4, scale=2.0)'),
]


def setup():
  model = bert.BertModel(CONFIG)
  ids = jax.random.randint(jax.random.key(0), (N, 5), 1, 50)
  mask = jnp.ones_like(ids).at[::2, -2:].set(0)
  frozen = references.initialised(model)  # Cached: the weights of key(1).
  tree = pj.by_rules(RULES)
  params, buffers = tree.init(
    jax.random.key(2), frozen, pj.hook_points(model, ids, mask)
  )
  target = jax.random.normal(jax.random.key(3), (N, 5, CONFIG.hidden_size))

  def loss_fn(weights, batch, rng):
    del rng
    out = model.apply({'params': weights}, batch['ids'], batch['mask'])
    return jnp.mean((out - batch['target']) ** 2), {}

  optimizer = optax.adam(1e-2)
  state = pj.TrainState.create(params, buffers, optimizer, jax.random.key(4))
  batch = {'ids': ids, 'mask': mask, 'target': target}
  return tree, loss_fn, optimizer, frozen, state, batch


def close(a, b):
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6), a, b
  )


@pytest.fixture(scope='module')
def one_device():
  """The setup and its step on one device: ``(setup(), state, metrics)``."""
  parts = setup()
  tree, loss_fn, optimizer, frozen, state, batch = parts
  step = jax.jit(pj.make_train_step(loss_fn, tree, optimizer, factored=True))
  return parts, step, *step(state, frozen, batch)


def test_data_sharded_jit_equals_one_device(one_device):
  assert jax.device_count() == N
  (_, _, _, frozen, state, batch), step, single, single_metrics = one_device
  mesh = jax.make_mesh((N,), ('data',), axis_types=(AxisType.Auto,))
  sharded_batch = jax.device_put(batch, NamedSharding(mesh, P('data')))
  sharded, sharded_metrics = step(state, frozen, sharded_batch)
  close(sharded.params, single.params)
  close(sharded_metrics['loss'], single_metrics['loss'])
  assert not np.allclose(single.params['@shared']['prefix_tuning'].embedding, 0)


def test_pmap_equals_one_device(one_device):
  parts, _, single, single_metrics = one_device
  tree, loss_fn, optimizer, frozen, state, batch = parts
  pmapped = jax.pmap(
    pj.make_train_step(loss_fn, tree, optimizer, axis_name='data', factored=True),
    axis_name='data',
    in_axes=(None, None, 0),
    out_axes=(None, None),
  )
  per_device = jax.tree.map(lambda x: x.reshape(N, 1, *x.shape[1:]), batch)
  mapped, mapped_metrics = pmapped(state, frozen, per_device)
  close(mapped.params, single.params)
  close(mapped_metrics['loss'], single_metrics['loss'])


def test_shard_map_equals_one_device(one_device):
  parts, _, single, single_metrics = one_device
  tree, loss_fn, optimizer, frozen, state, batch = parts
  mesh = jax.make_mesh((N,), ('data',), axis_types=(AxisType.Auto,))
  step = jax.jit(
    jax.shard_map(
      pj.make_train_step(loss_fn, tree, optimizer, axis_name='data', factored=True),
      mesh=mesh,
      in_specs=(P(), P(), P('data')),
      out_specs=(P(), P()),
    )
  )
  mapped, mapped_metrics = step(state, frozen, batch)
  close(mapped.params, single.params)
  close(mapped_metrics['loss'], single_metrics['loss'])
