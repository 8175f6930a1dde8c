r"""Memory and step time of LoRA on SmolLM2-135M, float and quantized frozen weights.

  python -m benchmarks.quantized_lora            # RUNS, one process each
  python -m benchmarks.quantized_lora --variant nf4 --layout scan

The shipped SmolLM2-135M-Instruct GGUF (Q4_1 kernels, Q8_0 embeddings),
LoRA r8 α16 on the seven projections of all 30 layers (the Rotten Tomatoes
decoder config's rules), factored path, AdamW, a causal-LM step on batch 8 x
72 tokens (the decoder task's shapes). Frozen weights:

  float32    every tensor dequantized to float32 (the trainer's default).
  bfloat16   the same cast to bfloat16 (the model computes by promotion).
  int8       pj.quantize(float32, 'int8'): kernels in groups of 64.
  int4       pj.quantize(float32, 'int4'): kernels in groups of 64.
  nf4        pj.quantize(float32, 'nf4'): kernels in groups of 64 (QLoRA).
  gguf       the file's own blocks kept (load_gguf(keep_quantized=True)):
             Q4_1 kernels, Q8_0 embedding table, exactly the float32 values.

For each: the frozen tree's stored bytes; XLA's ``memory_analysis`` of the
compiled step (arguments, temporaries); the median wall time of the steps
after a warm-up; the process's peak resident set (each variant runs in its
own process). ``--layout scan`` runs the scanned model (``stacked(lora)``),
in which each layer's kernels are dequantized inside the loop body.

Writes ``benchmarks/results/quantized_lora.{json,md}`` with the machine,
versions and date.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax

import peft_jax as pj
from experiments import tasks
from peft_jax._src import quantization
from peft_jax.models import gguf_loading, llama

VARIANTS = tasks.FROZEN_FORMATS
LAYOUTS = ('unrolled', 'scan')
RUNS = (
  *(f'unrolled/{variant}' for variant in VARIANTS),
  'scan/float32',
  'scan/nf4',
  'scan/gguf',
)
KERNELS = r'(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel'
BATCH, SEQ, STEPS = 8, 72, 5
RESULTS = pathlib.Path(__file__).parent / 'results'


def frozen_weights(variant: str, scan: bool):
  """``(config, frozen)`` of SmolLM2 stored as ``variant``."""
  path = gguf_loading.smollm2_path()
  keep = variant == 'gguf'
  config, frozen, _ = gguf_loading.load_gguf(
    path, keep_quantized=keep, scan_layers=scan
  )
  return config, tasks.stored_as(frozen, variant)


def measure(variant: str, layout: str) -> dict:
  """One variant's row, measured in this process."""
  scan = layout == 'scan'
  config, frozen = frozen_weights(variant, scan)
  model = llama.LlamaForCausalLM(config)
  lora = pj.lora(rank=8, alpha=16)
  rules = (
    [(f'layers/{KERNELS}', pj.stacked(lora))]
    if scan
    else [(rf'layers_\d+/{KERNELS}', lora)]
  )
  tree = pj.by_rules(rules)
  params, buffers = tree.init(jax.random.key(0), frozen)
  optimizer = optax.adamw(1e-3)
  state = pj.TrainState.create(params, buffers, optimizer, jax.random.key(1))

  def loss_fn(weights, ids, rng):
    del rng
    logits = model.apply({'params': weights}, ids[:, :-1]).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
    return loss.mean(), {}

  ids = jax.random.randint(jax.random.key(2), (BATCH, SEQ + 1), 0, config.vocab_size)
  step = pj.make_train_step(loss_fn, tree, optimizer, factored=True)
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(state, frozen, ids).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  times = []
  for _ in range(STEPS):
    t0 = time.perf_counter()
    state, metrics = compiled(state, frozen, ids)
    float(metrics['loss'])
    times.append(time.perf_counter() - t0)
  mib = lambda n: round(n / 2**20, 1)
  return {
    'variant': variant,
    'layout': layout,
    'frozen_mib': mib(quantization.stored_bytes(frozen)),
    'step_arguments_mib': mib(memory.argument_size_in_bytes),
    'step_temporaries_mib': mib(memory.temp_size_in_bytes),
    'compile_s': round(compile_s, 1),
    'step_s_median': round(statistics.median(times[1:]), 3),
    'peak_rss_mib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    'loss_after': round(float(metrics['loss']), 4),
  }


def environment() -> dict:
  device = jax.devices()[0]
  return {
    'device': f'{device.platform}:{device.device_kind}',
    'cpu_count': os.cpu_count(),
    'jax': jax.__version__,
    'python': platform.python_version(),
    'date': datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC'),
  }


def table(rows: list[dict]) -> str:
  columns = list(rows[0])
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(str(r[c]) for c in columns) + ' |' for r in rows]
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variant', choices=VARIANTS, help='measure one, print JSON')
  parser.add_argument('--layout', choices=LAYOUTS, default='unrolled')
  parser.add_argument(
    '--runs', default=','.join(RUNS), help='comma list of layout/variant to measure'
  )
  args = parser.parse_args(argv)
  if args.variant:
    print(json.dumps(measure(args.variant, args.layout)))
    return 0
  rows = []
  for run in args.runs.split(','):
    layout, variant = run.split('/')
    command = [
      '-m',
      'benchmarks.quantized_lora',
      '--variant',
      variant,
      '--layout',
      layout,
    ]
    out = subprocess.run(
      [sys.executable, *command], check=True, capture_output=True, text=True
    )
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(rows[-1], flush=True)
  RESULTS.mkdir(exist_ok=True)
  result = {'environment': environment(), 'rows': rows}
  (RESULTS / 'quantized_lora.json').write_text(json.dumps(result, indent=2))
  (RESULTS / 'quantized_lora.md').write_text(
    f'{__doc__.split(chr(10))[0]}\n\n{json.dumps(environment())}\n\n{table(rows)}\n'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
