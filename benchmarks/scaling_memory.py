r"""Per-device memory and collectives of one LoRA step under DP, FSDP and TP.

  python -m benchmarks.scaling_memory     # 8 simulated CPU devices

A small Llama (4 layers, d=256), LoRA r8 on all seven projections, factored,
AdamW, batch 16 x 128 tokens. For each layout the frozen weights are placed
on an 8-device ``(data, fsdp, tensor)`` mesh by ``llama.PARAM_AXES``
(``peft_jax.models.partitioning``), θ and the optimizer state follow them
(``pj.adapter_shardings``), and the jitted step is compiled (not run) under
``jax.set_mesh`` (the model's activation shardings): XLA's
``memory_analysis`` gives the per-device argument, output and temporary
bytes, and the compiled HLO text the number of collectives.

  dp         data=8: weights and θ replicated, batch split.
  fsdp       fsdp=8: every weight split on d_model, batch split.
  fsdp_scan  the same with scan_layers=True and stacked(lora): one layer's
             weights gathered per loop iteration.
  tp         data=2, tensor=4: q/k/v/gate/up split on d_out, o/down on d_in
             (Megatron), heads and FFN activations split alike.
  2d         data=2, fsdp=2, tensor=2.

Writes ``benchmarks/results/scaling_memory.{json,md}`` with the machine,
versions and date.
"""

import dataclasses
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

import peft_jax as pj
from peft_jax.models import llama, partitioning

CONFIG = llama.LlamaConfig(
  vocab_size=4096,
  hidden_size=256,
  intermediate_size=704,
  num_layers=4,
  num_heads=8,
  num_kv_heads=4,
)
BATCH, SEQ = 16, 128
METHOD = 'lora(rank=8, alpha=16)'
LAYOUTS = {
  'dp': dict(data=8),
  'fsdp': dict(data=1, fsdp=8),
  'fsdp_scan': dict(data=1, fsdp=8),
  'tp': dict(data=2, tensor=4),
  '2d': dict(data=2, fsdp=2, tensor=2),
}
COLLECTIVES = (
  'all-reduce',
  'all-gather',
  'reduce-scatter',
  'all-to-all',
  'collective-permute',
)
OUT = pathlib.Path(__file__).parent / 'results'


def compiled_step(layout: str):
  mesh = partitioning.make_mesh(**LAYOUTS[layout])
  scan = layout == 'fsdp_scan'
  model = llama.LlamaForCausalLM(dataclasses.replace(CONFIG, scan_layers=scan))
  ids = jnp.zeros((BATCH, SEQ), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), ids)['params']
  shardings = partitioning.param_shardings(abstract, llama.PARAM_AXES, mesh)
  frozen = jax.jit(lambda key: model.init(key, ids)['params'], out_shardings=shardings)(
    jax.random.key(0)
  )
  rules = [(r'.*_proj/kernel', pj.stacked(METHOD) if scan else METHOD)]
  adapter, optimizer = pj.by_rules(rules), optax.adamw(1e-3)
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

  batch = jax.device_put(ids, partitioning.batch_sharding(mesh, ids.shape))
  step = jax.jit(pj.make_train_step(loss_fn, adapter, optimizer, factored=True))
  with jax.set_mesh(mesh):
    return step.lower(state, frozen, batch).compile(), pj.count(params)


def row(layout: str) -> dict:
  compiled, trainable = compiled_step(layout)
  memory = compiled.memory_analysis()
  text = compiled.as_text()
  counts = {op: len(re.findall(rf' {op}(?:-start)?\(', text)) for op in COLLECTIVES}
  mib = lambda b: round(b / 2**20, 2)
  return {
    'layout': layout,
    'mesh': ','.join(f'{k}={v}' for k, v in LAYOUTS[layout].items()),
    'trainable': trainable,
    'argument_mib': mib(memory.argument_size_in_bytes),
    'output_mib': mib(memory.output_size_in_bytes),
    'temp_mib': mib(memory.temp_size_in_bytes),
    **counts,
  }


def main():
  rows = [row(layout) for layout in LAYOUTS]
  meta = {
    'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
    'machine': f'{platform.machine()}, {os.cpu_count()} CPUs, 8 simulated devices',
    'jax': jax.__version__,
    'model': f'Llama d={CONFIG.hidden_size}, {CONFIG.num_layers} layers, '
    f'vocab {CONFIG.vocab_size}; batch {BATCH}x{SEQ}; {METHOD} factored, AdamW',
  }
  OUT.mkdir(exist_ok=True)
  (OUT / 'scaling_memory.json').write_text(json.dumps({**meta, 'rows': rows}, indent=2))
  head = ['layout', 'mesh', 'argument MiB', 'output MiB', 'temp MiB', *COLLECTIVES]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    cells = [r['layout'], r['mesh'], r['argument_mib'], r['output_mib'], r['temp_mib']]
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
