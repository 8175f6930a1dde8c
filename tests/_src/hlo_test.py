"""What the compiled sharded step communicates (XLA's HLO text).

Data parallel: a LoRA step on a tiny Llama, batch sharded over 8 simulated
devices, θ and the frozen weights replicated: on the factored path every
all-reduce is adapter-sized (no kernel-sized weight gradient crosses
devices, and the reduced bytes are those of θ's gradient plus the scalar
metrics); in weight space XLA reduces kernel-sized gradients, which shows
the count can tell.

FSDP with scanned layers: the stacked kernels are split over 8 devices on
``d_model`` (``llama.PARAM_AXES``) and the step gathers one layer's kernel
at a time, inside the scan's loop, never a whole ``(L, d_in, d_out)`` stack.
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
from peft_jax.models import llama, partitioning
from tests import references

CONFIG = references.TINY_LLAMA
RULES = [(r'.*_proj/kernel', 'lora(rank=4)')]
OPERAND = re.compile(r'(f32|s32|u32|pred)\[([\d,]*)\]')


def all_reduce_bytes(hlo: str) -> list[int]:
  """The result bytes of each all-reduce in compiled HLO text."""
  sizes = []
  for line in hlo.splitlines():
    if ' all-reduce(' not in line and ' all-reduce-start(' not in line:
      continue
    result = line.split('=', 1)[1].split('all-reduce', 1)[0]
    for _, dims in OPERAND.findall(result):
      sizes.append(4 * int(np.prod([int(d) for d in dims.split(',') if d])))
  return sizes


def compiled_step_text(factored: bool) -> tuple[str, int, int]:
  """``(HLO text, θ bytes, smallest kernel bytes)``."""
  model = llama.LlamaForCausalLM(CONFIG)
  ids = jnp.zeros((8, 16), jnp.int32)
  frozen = model.init(jax.random.key(0), ids)['params']
  adapter = pj.by_rules(RULES)
  params, buffers = adapter.init(jax.random.key(1), frozen)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  sgd = optax.sgd(0.1)
  state = pj.TrainState.create(
    jax.device_put(params, replicated), buffers, sgd, jax.random.key(2)
  )

  def loss_fn(weights, batch, rng):
    del rng
    return jnp.mean(model.apply({'params': weights}, batch) ** 2), {}

  step = jax.jit(pj.make_train_step(loss_fn, adapter, sgd, factored=factored))
  text = (
    step.lower(
      state,
      jax.device_put(frozen, replicated),
      jax.device_put(ids, NamedSharding(mesh, P('data'))),
    )
    .compile()
    .as_text()
  )
  kernels = [x.size * 4 for x in jax.tree.leaves(frozen) if x.ndim == 2]
  return text, 4 * pj.count(params), min(kernels)


@pytest.mark.slow  # compiles two Llama train steps
def test_factored_step_all_reduces_only_adapter_sized_gradients():
  text, theta_bytes, kernel_bytes = compiled_step_text(factored=True)
  sizes = all_reduce_bytes(text)
  assert sizes and max(sizes) < kernel_bytes
  assert sum(sizes) <= theta_bytes + 64  # θ's gradient and scalar metrics
  weight_space, _, _ = compiled_step_text(factored=False)
  assert max(all_reduce_bytes(weight_space)) >= kernel_bytes


def all_gathers_by_computation(hlo: str) -> dict[str, list[tuple[int, ...]]]:
  """``{computation: [result shape of each all-gather]}`` and, under the key
  ``'while bodies'``, the names of the computations that are loop bodies."""
  found, computation, bodies = {}, None, []
  for line in hlo.splitlines():
    if line and not line.startswith(' ') and line.rstrip().endswith('{'):
      computation = line.split()[1] if line.startswith('ENTRY') else line.split()[0]
    bodies += re.findall(r'body=(%[\w.\-]+)', line)
    if ' all-gather(' in line or ' all-gather-start(' in line:
      result = line.split('=', 1)[1].split('all-gather', 1)[0]
      for _, dims in OPERAND.findall(result):
        shape = tuple(int(d) for d in dims.split(',') if d)
        found.setdefault(computation, []).append(shape)
  found['while bodies'] = bodies
  return found


@pytest.mark.slow  # compiles a scanned Llama train step
def test_fsdp_with_scanned_layers_gathers_one_layer_at_a_time():
  # vocab 80: no non-layer weight shares a kernel's shape.
  config = llama.LlamaConfig(
    **{**vars(CONFIG), 'scan_layers': True, 'num_layers': 3, 'vocab_size': 80}
  )
  model = llama.LlamaForCausalLM(config)
  ids = jnp.zeros((8, 16), jnp.int32)
  mesh = partitioning.make_mesh(data=1, fsdp=8)
  abstract = jax.eval_shape(model.init, jax.random.key(0), ids)['params']
  frozen = jax.jit(
    lambda key: model.init(key, ids)['params'],
    out_shardings=partitioning.param_shardings(abstract, llama.PARAM_AXES, mesh),
  )(jax.random.key(0))
  adapter = pj.by_rules([(r'layers/.*_proj/kernel', pj.stacked('lora(rank=4)'))])
  params, buffers = jax.jit(
    adapter.init, out_shardings=pj.adapter_shardings(adapter, frozen)
  )(jax.random.key(1), frozen)
  sgd = optax.sgd(0.1)
  state = pj.TrainState.create(params, buffers, sgd, jax.random.key(2))

  def loss_fn(weights, batch, rng):
    del rng
    return jnp.mean(model.apply({'params': weights}, batch) ** 2), {}

  step = jax.jit(pj.make_train_step(loss_fn, adapter, sgd, factored=True))
  batch = jax.device_put(ids, partitioning.batch_sharding(mesh, ids.shape))
  with jax.set_mesh(mesh):
    text = step.lower(state, frozen, batch).compile().as_text()

  gathers = all_gathers_by_computation(text)
  bodies = set(gathers.pop('while bodies'))
  stacked = {x.shape for x in jax.tree.leaves(frozen['layers']) if x.ndim == 3}
  layer = {shape[1:] for shape in stacked}
  assert not any(shape in stacked for shapes in gathers.values() for shape in shapes)
  in_bodies = [shape for name in bodies for shape in gathers.get(name, [])]
  outside = [
    shape for name, shapes in gathers.items() if name not in bodies for shape in shapes
  ]
  assert layer <= set(in_bodies)  # each kind of kernel, gathered per layer
  assert not layer & set(outside)
