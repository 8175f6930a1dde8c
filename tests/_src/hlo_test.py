"""What the compiled data-parallel step communicates (XLA's HLO text).

A LoRA step on a tiny Llama, batch sharded over 8 simulated devices, θ and
the frozen weights replicated: on the factored path every all-reduce is
adapter-sized (no kernel-sized weight gradient crosses devices, and the
reduced bytes are those of θ's gradient plus the scalar metrics); in weight
space XLA reduces kernel-sized gradients, which shows the count can tell.
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
from peft_jax.models import llama

CONFIG = llama.LlamaConfig(
  vocab_size=64,
  hidden_size=64,
  intermediate_size=128,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
)
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
