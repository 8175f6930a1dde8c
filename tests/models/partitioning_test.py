"""Logical axes -> mesh shardings, and the models under a (data, fsdp, tensor) mesh.

Every family is run on 8 simulated devices with its weights placed by its
``PARAM_AXES`` and its activations constrained (``jax.set_mesh``): the
logits equal the one-device logits, and XLA compiles the program without
an "involuntary full rematerialization" (a sharding it could not reach
except by replicating a whole array), which the constraints exist to avoid.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import peft_jax as pj
from peft_jax._src import paths
from peft_jax.models import bert, deberta, llama, partitioning
from tests import references

BATCH, SEQ = 8, 16
LLAMA = llama.LlamaConfig(
  vocab_size=64,
  hidden_size=32,
  intermediate_size=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
)
ENCODER = dict(
  vocab_size=64,
  hidden_size=32,
  num_layers=2,
  num_heads=4,
  intermediate_size=64,
  max_position_embeddings=SEQ,
)
INVOLUNTARY = 'Involuntary full rematerialization'
RESHUFFLES = ('all-to-all', 'collective-permute')


def test_spec_maps_logical_names_and_drops_what_the_mesh_cannot_take():
  mesh = jax.make_mesh((2, 4, 1), partitioning.MESH_AXES)
  spec = lambda names, shape: partitioning.spec(names, shape, mesh)
  assert spec(('batch', None), (8, 3)) == P(('data', 'fsdp'), None)
  assert spec(('batch', None), (2, 3)) == P('data', None)  # 4 does not divide 2
  assert spec(('embed', 'heads'), (8, 8)) == P('fsdp', None)  # tensor has size 1
  assert spec(('embed', 'embed'), (8, 8)) == P('fsdp', None)  # an axis once
  assert spec(('table', None), (12, 3)) == P('fsdp', None)
  assert spec((None, 'unknown'), (8, 8)) == P(None, None)


def test_spec_leaves_manual_axes_to_shard_map():
  mesh = jax.make_mesh((2, 4), ('data', 'fsdp'), axis_types=(AxisType.Explicit,) * 2)
  manual = mesh.abstract_mesh.update_axis_types({'data': AxisType.Manual})
  assert partitioning.spec(('batch', None), (8, 3), manual) == P('fsdp', None)


def test_constrain_is_the_identity_outside_a_mesh():
  x = jnp.arange(8.0)
  assert (
    jax.jit(lambda x: partitioning.constrain(x, 'batch'))(x).sharding.num_devices == 1
  )


@pytest.mark.parametrize(
  'sizes, expected',
  [
    (dict(), (8, 1, 1)),
    (dict(fsdp=4), (2, 4, 1)),
    (dict(data=1, tensor=-1), (1, 1, 8)),
    (dict(data=2, fsdp=2, tensor=2), (2, 2, 2)),
    (dict(data=1), (1, 1, 1)),  # fewer than all: the first devices
    (dict(data=3), (3, 1, 1)),
  ],
)
def test_make_mesh_fills_the_free_axis_or_takes_the_first_devices(sizes, expected):
  mesh = partitioning.make_mesh(**sizes)
  assert mesh.axis_names == partitioning.MESH_AXES
  assert tuple(mesh.axis_sizes) == expected


@pytest.mark.parametrize(
  'sizes, message',
  [
    (dict(data=16), 'does not fit 8 devices'),
    (dict(data=3, fsdp=3), 'does not fit 8 devices'),
    (dict(fsdp=3), 'does not fit 8 devices'),
    (dict(data=-1, fsdp=-1), 'at most one -1'),
    (dict(tensor=0), 'sizes must be positive'),
  ],
)
def test_make_mesh_refuses_sizes_that_do_not_fit(sizes, message):
  with pytest.raises(pj.PeftError, match=message):
    partitioning.make_mesh(**sizes)


def test_parse_mesh_reads_the_command_line_and_names_bad_items():
  assert partitioning.parse_mesh('data=2, fsdp=4') == {'data': 2, 'fsdp': 4}
  with pytest.raises(pj.PeftError, match="mesh axis 'model' is unknown"):
    partitioning.parse_mesh('model=2')
  with pytest.raises(pj.PeftError, match="'data=two' is not an integer"):
    partitioning.parse_mesh('data=two')


def test_param_shardings_follow_the_table_and_keep_the_layer_axis_whole():
  mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  config = llama.LlamaConfig(**{**vars(LLAMA), 'scan_layers': True})
  model = llama.LlamaForCausalLM(config)
  ids = jnp.zeros((1, 4), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), ids)['params']
  specs = {
    name: s.spec
    for name, s in paths.named_leaves(
      partitioning.param_shardings(abstract, llama.PARAM_AXES, mesh)
    )
  }
  assert specs['layers/self_attn/q_proj/kernel'] == P(None, 'fsdp', 'tensor')
  assert specs['layers/self_attn/o_proj/kernel'] == P(None, 'tensor', 'fsdp')
  assert specs['layers/mlp/down_proj/kernel'] == P(None, 'tensor', 'fsdp')
  assert specs['embed_tokens/embedding'] == P(('tensor', 'fsdp'), None)
  assert specs['lm_head/kernel'] == P('fsdp', 'tensor')
  assert specs['norm/scale'] == P(None)


def _llama(scan: bool):
  config = llama.LlamaConfig(**{**vars(LLAMA), 'scan_layers': scan})
  model = llama.LlamaForCausalLM(config)
  return model, llama.PARAM_AXES, lambda w, ids, mask: model.apply({'params': w}, ids)


def _bert():
  model = bert.BertForSequenceClassification(bert.BertConfig(**ENCODER), num_labels=3)
  return (
    model,
    bert.PARAM_AXES,
    lambda w, ids, mask: model.apply({'params': w}, ids, mask),
  )


def _deberta():
  config = deberta.DebertaV2Config(**ENCODER)
  model = deberta.DebertaV2ForSequenceClassification(config, num_labels=3)
  return (
    model,
    deberta.PARAM_AXES,
    lambda w, ids, mask: model.apply({'params': w}, ids, mask),
  )


FAMILIES = {
  'llama': lambda: _llama(False),
  'llama_scan': lambda: _llama(True),
  'bert': _bert,
  'deberta': _deberta,
}
MESHES = {
  'data': dict(data=8),
  'fsdp': dict(data=1, fsdp=8),
  'tensor': dict(data=2, tensor=4),
  '2d': dict(data=2, fsdp=2, tensor=2),
}


def _case(family: str):
  """``(model, table, apply, weights, ids, mask)`` on fixed random tokens."""
  model, table, apply = FAMILIES[family]()
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1, 64, (BATCH, SEQ)), jnp.int32)
  mask = jnp.ones((BATCH, SEQ), jnp.int32).at[:, SEQ - 3 :].set(0)
  args = (ids,) if family.startswith('llama') else (ids, mask)
  weights = model.init(jax.random.key(0), *args)['params']
  return model, table, apply, weights, ids, mask


def _placed(mesh, table, weights, *batch):
  sharding = partitioning.batch_sharding(mesh, batch[0].shape)
  return (
    jax.device_put(weights, partitioning.param_shardings(weights, table, mesh)),
    *(jax.device_put(x, sharding) for x in batch),
  )


@pytest.mark.parametrize(
  'case',
  references.slow_unless(
    [f'{f}-{m}' for f in sorted(FAMILIES) for m in sorted(MESHES)],
    fast=[f'{f}-2d' for f in sorted(FAMILIES)],
  ),
)
def test_models_on_a_mesh_compute_the_one_device_logits(case, capfd):
  family, mesh_name = case.split('-')
  _, table, apply, weights, ids, mask = _case(family)
  expected = jax.jit(apply)(weights, ids, mask)
  mesh = partitioning.make_mesh(**MESHES[mesh_name])
  with jax.set_mesh(mesh):
    got = jax.jit(apply)(*_placed(mesh, table, weights, ids, mask))
  np.testing.assert_allclose(
    np.asarray(got), np.asarray(expected), atol=2e-5, rtol=2e-5
  )
  assert INVOLUNTARY not in capfd.readouterr().err


def _step_collectives(family: str, mesh, weights=None) -> dict[str, int]:
  """Collectives in the compiled factored LoRA step on ``mesh``."""
  _, table, apply, initial, ids, mask = _case(family)
  frozen, ids, mask = _placed(mesh, table, initial, ids, mask)
  if weights is not None:
    frozen = jax.device_put(initial, weights(mesh, initial))
  method = 'lora(rank=2)'
  adapter = pj.by_rules(
    [
      (
        r'.*(_proj|query|key|value|dense|intermediate|output)/kernel',
        pj.stacked(method) if family == 'llama_scan' else method,
      )
    ]
  )
  params, buffers = jax.jit(
    adapter.init, out_shardings=pj.adapter_shardings(adapter, frozen)
  )(jax.random.key(1), frozen)
  sgd = optax.sgd(0.1)
  state = pj.TrainState.create(params, buffers, sgd, jax.random.key(2))
  loss_fn = lambda w, batch, rng: (jnp.mean(apply(w, *batch) ** 2), {})
  step = jax.jit(pj.make_train_step(loss_fn, adapter, sgd, factored=True))
  with jax.set_mesh(mesh):
    text = step.lower(state, frozen, (ids, mask)).compile().as_text()
  return {op: len(re.findall(rf' {op}(?:-start)?\(', text)) for op in RESHUFFLES}


@pytest.mark.parametrize(
  'case',
  references.slow_unless(
    [
      *(f'{f}-tensor' for f in sorted(FAMILIES)),
      *(f'{f}-fsdp' for f in ('llama', 'llama_scan')),
    ],
    fast=['llama-tensor'],
  ),
)
def test_train_steps_compile_without_reshuffling_activations(case):
  """Megatron TP and FSDP need all-reduces and all-gathers only; an
  all-to-all or collective-permute means XLA resharded an activation
  between layouts (without the models' constraints the Llama TP step has
  15 all-to-alls and 8 permutes)."""
  family, mesh_name = case.split('-')
  mesh = partitioning.make_mesh(**MESHES[mesh_name])
  assert _step_collectives(family, mesh) == dict.fromkeys(RESHUFFLES, 0)


@pytest.mark.slow  # compiles a Llama train step
def test_fsdp_on_the_output_axis_of_every_kernel_compiles_cleanly(capfd):
  """The activation constraints leave the weights' layout to the user:
  FSDP on every kernel's ``d_out`` (not the table's ``d_model``) is still
  gathered where used, with no reshuffled activation."""
  on_d_out = lambda mesh, w: jax.tree.map(
    lambda x: NamedSharding(mesh, P(*(None,) * (x.ndim - 1), 'fsdp')), w
  )
  mesh = partitioning.make_mesh(data=1, fsdp=8)
  counts = _step_collectives('llama', mesh, weights=on_d_out)
  assert counts['all-to-all'] <= 1 and counts['collective-permute'] == 0
  assert INVOLUNTARY not in capfd.readouterr().err


def test_quantized_weights_place_codes_and_scales_by_the_table():
  """A QuantizedArray's codes and scales split by the kernel's logical axes;
  the factored LoRA forward on the 2-D mesh equals one device's."""
  model = llama.LlamaForCausalLM(LLAMA)
  ids = jax.random.randint(jax.random.key(3), (8, 16), 0, LLAMA.vocab_size)
  frozen = pj.quantize(references.initialised(model), 'nf4', group_size=16)
  tree = pj.by_rules([(r'.*_proj/kernel', 'lora(rank=4)')])
  params, buffers = tree.init(jax.random.key(1), frozen)
  params = references.perturb(params, seed=2, scale=0.1)
  run = pj.adapted(tree, lambda w, ids: model.apply({'params': w}, ids), factored=True)
  want = run(frozen, params, buffers, ids)
  mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  with jax.set_mesh(mesh):
    shardings = partitioning.param_shardings(frozen, llama.PARAM_AXES, mesh)
    placed = partitioning.place(frozen, shardings)
    up = placed['layers_0']['mlp']['up_proj']['kernel']
    assert up.codes.sharding.spec == P('fsdp', 'tensor')
    assert up.scales.sharding.spec == P('fsdp', 'tensor')  # 2 groups along d_in
    theta = jax.device_put((params, buffers), pj.adapter_shardings(tree, placed))
    got = jax.jit(run)(placed, *theta, ids)
  np.testing.assert_allclose(got, want, atol=2e-5)
