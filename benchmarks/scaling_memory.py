r"""Per-device memory and collectives of one LoRA step under DP, FSDP and TP.

  python -m benchmarks.scaling_memory     # 8 simulated CPU devices

A small Llama (4 layers, d=256), LoRA r8 on all seven projections, factored,
AdamW, batch 16 x 128 tokens. For each layout the frozen weights are placed
on an 8-device mesh, θ and the optimizer state follow them
(``pj.adapter_shardings``, ``pj.optimizer_shardings``), and the jitted step
is compiled (not run): XLA's ``memory_analysis`` gives the per-device
argument, output and temporary bytes, and the compiled HLO text the number
of collectives.

  dp    mesh (data=8): weights and θ replicated, batch split.
  fsdp  mesh (fsdp=8): every kernel split on its first axis, batch split.
  tp    mesh (tensor=8): q/k/v/gate/up split on d_out, o/down on d_in
        (Megatron), embeddings and head on d; batch replicated.

Writes ``benchmarks/results/scaling_memory.{json,md}`` with the machine,
versions and date.
"""

import datetime
import json
import os
import pathlib
import platform
import re

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import peft_jax as pj
from peft_jax._src import paths
from peft_jax.models import llama

CONFIG = llama.LlamaConfig(
  vocab_size=4096,
  hidden_size=256,
  intermediate_size=704,
  num_layers=4,
  num_heads=8,
  num_kv_heads=4,
)
BATCH, SEQ = 16, 128
RULES = [(r'.*_proj/kernel', 'lora(rank=8, alpha=16)')]
COLUMN = ('q_proj', 'k_proj', 'v_proj', 'gate_proj', 'up_proj')
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all')
OUT = pathlib.Path(__file__).parent / 'results'


def weight_spec(layout: str, name: str, ndim: int) -> P:
  """The frozen leaf ``name``'s spec under ``layout``."""
  if layout == 'dp' or ndim != 2:
    return P()
  if layout == 'fsdp':
    return P('fsdp', None)
  if name.endswith(tuple(f'{p}/kernel' for p in COLUMN)):
    return P(None, 'tensor')
  if name.endswith(('o_proj/kernel', 'down_proj/kernel')):
    return P('tensor', None)
  return P(None, 'tensor')  # embed_tokens (vocab, d), lm_head (d, vocab)


def compiled_step(layout: str):
  axis = {'dp': 'data', 'fsdp': 'fsdp', 'tp': 'tensor'}[layout]
  mesh = jax.make_mesh((8,), (axis,), axis_types=(AxisType.Auto,))
  model = llama.LlamaForCausalLM(CONFIG)
  ids = jnp.zeros((BATCH, SEQ), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), ids)['params']
  shardings = paths.map_named(
    lambda name, x: NamedSharding(mesh, weight_spec(layout, name, x.ndim)), abstract
  )
  frozen = jax.jit(lambda key: model.init(key, ids)['params'], out_shardings=shardings)(
    jax.random.key(0)
  )
  adapter, optimizer = pj.by_rules(RULES), optax.adamw(1e-3)
  param_shardings = pj.adapter_shardings(adapter, frozen)
  params, buffers = jax.jit(adapter.init, out_shardings=param_shardings)(
    jax.random.key(1), frozen
  )
  state = pj.TrainState.create(params, buffers, optimizer, jax.random.key(2))

  def loss_fn(weights, batch, rng):
    del rng
    logits = model.apply({'params': weights}, batch[:, :-1])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])
    return loss.mean(), {}

  batch_spec = P() if layout == 'tp' else P(axis)
  batch = jax.device_put(ids, NamedSharding(mesh, batch_spec))
  step = jax.jit(pj.make_train_step(loss_fn, adapter, optimizer, factored=True))
  return step.lower(state, frozen, batch).compile(), pj.count(params)


def row(layout: str) -> dict:
  compiled, trainable = compiled_step(layout)
  memory = compiled.memory_analysis()
  text = compiled.as_text()
  counts = {op: len(re.findall(rf' {op}(?:-start)?\(', text)) for op in COLLECTIVES}
  mib = lambda b: round(b / 2**20, 2)
  return {
    'layout': layout,
    'trainable': trainable,
    'argument_mib': mib(memory.argument_size_in_bytes),
    'output_mib': mib(memory.output_size_in_bytes),
    'temp_mib': mib(memory.temp_size_in_bytes),
    **counts,
  }


def main():
  rows = [row(layout) for layout in ('dp', 'fsdp', 'tp')]
  meta = {
    'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
    'machine': f'{platform.machine()}, {os.cpu_count()} CPUs, 8 simulated devices',
    'jax': jax.__version__,
    'model': f'Llama d={CONFIG.hidden_size}, {CONFIG.num_layers} layers, '
    f'vocab {CONFIG.vocab_size}; batch {BATCH}x{SEQ}; {RULES[0][1]} factored, AdamW',
  }
  OUT.mkdir(exist_ok=True)
  (OUT / 'scaling_memory.json').write_text(json.dumps({**meta, 'rows': rows}, indent=2))
  head = ['layout', 'argument MiB', 'output MiB', 'temp MiB', *COLLECTIVES]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    cells = [r['layout'], r['argument_mib'], r['output_mib'], r['temp_mib']]
    lines.append(
      '| ' + ' | '.join(map(str, [*cells, *(r[c] for c in COLLECTIVES)])) + ' |'
    )
  table = '\n'.join(lines)
  note = (
    "\nPer device, from XLA's memory_analysis of the compiled step; "
    f'{meta["model"]}; {meta["machine"]}; jax {meta["jax"]}; {meta["date"]}.\n'
  )
  (OUT / 'scaling_memory.md').write_text(table + '\n' + note)
  print(table + '\n' + note)


if __name__ == '__main__':
  main()
