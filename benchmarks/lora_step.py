r"""One LoRA training step, peft_jax against HF PEFT, in one run (BENCHMARKS.md).

  python -m benchmarks.lora_step                    # CPU smoke size
  python -m benchmarks.lora_step --size reference   # TinyLlama-1.1B shape, 8x1024

Settings, each timed in its own process (so peak memory is its own):

  jax_full            full fine-tuning (float32 master weights, AdamW)
  jax_lora_weight     LoRA r16 on q/k/v/o/gate/up/down, weight space
  jax_lora_factored   the same LoRA on peft_jax's factored path
  jax_lora_remat      factored + jax.checkpoint per layer
  hf_peft_eager       HF PEFT LoRA, PyTorch eager      (if torch + peft import)
  hf_peft_compile     HF PEFT LoRA, torch.compile      (if torch + peft import)
  torch_full_eager    PyTorch full fine-tuning, eager  (if torch imports)

A step is forward + backward + AdamW update on a causal-LM loss over random
tokens; the time is the median of ``--steps`` synchronised steps after
``--warmup`` steps. Model TFLOP/s counts 6N FLOPs per token for full
fine-tuning and 4N for LoRA (N = matmul parameters, the input embedding
excluded), attention excluded. Writes ``--out`` (JSON rows with device,
versions and date) and prints a Markdown table.
"""

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

SIZES = {
  'smoke': dict(
    vocab_size=1024, hidden_size=128, intermediate_size=352, num_layers=2,
    num_heads=4, num_kv_heads=2, batch=2, seq=128,
  ),
  'reference': dict(  # TinyLlama-1.1B's shape.
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
    num_heads=32, num_kv_heads=4, batch=8, seq=1024,
  ),
}  # fmt: skip
RANK, ALPHA, LR = 16, 32, 1e-4
TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
JAX_SETTINGS = ('jax_full', 'jax_lora_weight', 'jax_lora_factored', 'jax_lora_remat')
TORCH_SETTINGS = ('hf_peft_eager', 'hf_peft_compile', 'torch_full_eager')


@dataclasses.dataclass(frozen=True)
class Shape:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  batch: int
  seq: int

  @property
  def matmul_params(self) -> int:
    """N: every weight of a matmul (the LM head included, embedding not)."""
    d, head = self.hidden_size, self.hidden_size // self.num_heads
    attention = 2 * d * d + 2 * d * self.num_kv_heads * head
    mlp = 3 * d * self.intermediate_size
    return self.num_layers * (attention + mlp) + d * self.vocab_size


def time_steps(step, warmup: int, steps: int) -> float:
  """Median seconds of ``step()`` (which must synchronise) after warm-up."""
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def jax_model(setting: str, shape: Shape):
  """The bfloat16 Llama of ``shape`` with scanned layers.

  Rematerialised per layer for ``jax_lora_remat``; cuDNN attention on GPU.
  """
  import jax
  import jax.numpy as jnp

  from peft_jax.models import llama

  config = llama.LlamaConfig(
    vocab_size=shape.vocab_size,
    hidden_size=shape.hidden_size,
    intermediate_size=shape.intermediate_size,
    num_layers=shape.num_layers,
    num_heads=shape.num_heads,
    num_kv_heads=shape.num_kv_heads,
    dtype=jnp.bfloat16,
    param_dtype=jnp.bfloat16,
    scan_layers=True,
    remat=setting == 'jax_lora_remat',
    attention_impl='cudnn' if jax.default_backend() == 'gpu' else None,
  )
  return llama.LlamaForCausalLM(config)


def jax_rules(setting: str) -> list:
  """``full()`` on every leaf for ``jax_full``, else stacked LoRA on ``TARGETS``."""
  if setting == 'jax_full':
    return [('.*', 'full()')]
  lora = f'stacked("lora(rank={RANK}, alpha={ALPHA})")'
  return [(f'layers/(self_attn|mlp)/({"|".join(TARGETS)})/kernel', lora)]


def jax_step(setting: str, shape: Shape):
  """The jitted training step of ``setting`` and a builder of its arguments.

  Returns ``(train_step, arguments)``: ``train_step(state, frozen, ids) ->
  (state, metrics)`` is jitted with the state donated; ``arguments()`` builds
  ``(state, frozen, ids)`` (random weights, ``ids`` int32 of shape
  ``(batch, seq + 1)``). ``jax.eval_shape(arguments)`` gives their abstract
  shapes without materialising any weight.
  """
  import jax
  import optax

  import peft_jax as pj

  model = jax_model(setting, shape)
  tree = pj.by_rules(jax_rules(setting))
  optimizer = optax.adamw(LR)

  def arguments():
    # seq + 1 tokens: the model reads seq of them (cuDNN flash attention wants
    # aligned lengths) and predicts the next token at each.
    ids = jax.random.randint(
      jax.random.key(0), (shape.batch, shape.seq + 1), 0, shape.vocab_size
    )
    frozen = jax.jit(model.init)(jax.random.key(1), ids[:, :8])['params']
    params, buffers = jax.jit(tree.init)(jax.random.key(2), frozen)
    state = pj.TrainState.create(params, buffers, optimizer, jax.random.key(3))
    return state, frozen, ids

  def loss_fn(weights, batch, rng):
    del rng
    logits = model.apply({'params': weights}, batch[:, :-1])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])
    return loss.mean(), {}

  factored = setting in ('jax_lora_factored', 'jax_lora_remat')
  train_step = jax.jit(
    pj.make_train_step(loss_fn, tree, optimizer, factored=factored),
    donate_argnums=0,
  )
  return train_step, arguments


def run_jax(setting: str, shape: Shape, warmup: int, steps: int) -> dict:
  import jax

  import peft_jax as pj

  train_step, arguments = jax_step(setting, shape)
  state, frozen, ids = arguments()
  holder = [state]

  def step():
    holder[0], metrics = train_step(holder[0], frozen, ids)
    metrics['loss'].block_until_ready()

  seconds = time_steps(step, warmup, steps)
  stats = jax.devices()[0].memory_stats() or {}
  return {
    'seconds': seconds,
    'peak_gib': stats.get('peak_bytes_in_use', float('nan')) / 2**30,
    'trainable': pj.count(holder[0].params),
    'framework': f'jax {jax.__version__}',
    'device': jax.devices()[0].device_kind,
  }


def run_torch(setting: str, shape: Shape, warmup: int, steps: int) -> dict:
  import torch
  import transformers

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  config = transformers.LlamaConfig(
    vocab_size=shape.vocab_size,
    hidden_size=shape.hidden_size,
    intermediate_size=shape.intermediate_size,
    num_hidden_layers=shape.num_layers,
    num_attention_heads=shape.num_heads,
    num_key_value_heads=shape.num_kv_heads,
    max_position_embeddings=max(2048, shape.seq),
  )
  model = transformers.LlamaForCausalLM(config).to(device, dtype=torch.bfloat16)
  versions = f'torch {torch.__version__}, transformers {transformers.__version__}'
  if setting != 'torch_full_eager':
    import peft

    lora = peft.LoraConfig(
      r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0
    )
    model = peft.get_peft_model(model, lora)
    versions += f', peft {peft.__version__}'
  trainable = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(trainable, lr=LR)
  forward = torch.compile(model) if setting == 'hf_peft_compile' else model
  ids = torch.randint(0, shape.vocab_size, (shape.batch, shape.seq), device=device)

  def step():
    loss = forward(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device == 'cuda':
      torch.cuda.synchronize()

  if device == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  seconds = time_steps(step, warmup, steps)
  peak = torch.cuda.max_memory_allocated() / 2**30 if device == 'cuda' else float('nan')
  return {
    'seconds': seconds,
    'peak_gib': peak,
    'trainable': sum(p.numel() for p in trainable),
    'framework': versions,
    'device': torch.cuda.get_device_name()
    if device == 'cuda'
    else platform.processor(),
  }


def measure(setting: str, size: str, warmup: int, steps: int) -> dict:
  """Runs one setting in this process; returns its JSON row."""
  shape = Shape(**SIZES[size])
  run = run_jax if setting in JAX_SETTINGS else run_torch
  row = run(setting, shape, warmup, steps)
  tokens = shape.batch * shape.seq
  flops_per_token = (6 if 'full' in setting else 4) * shape.matmul_params
  return {
    'setting': setting,
    'size': size,
    'shape': dataclasses.asdict(shape),
    'step_ms': 1000 * row['seconds'],
    'tokens_per_s': tokens / row['seconds'],
    'model_tflops': tokens * flops_per_token / row['seconds'] / 1e12,
    'peak_gib': row['peak_gib'],
    'trainable_params': row['trainable'],
    'framework': row['framework'],
    'device': row['device'],
    'warmup': warmup,
    'timed_steps': steps,
    'date': datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC'),
  }


def importable(module: str) -> bool:
  return (
    subprocess.run(
      [sys.executable, '-c', f'import {module}'], capture_output=True
    ).returncode
    == 0
  )


def markdown(rows: list[dict]) -> str:
  columns = 'setting|step ms|tokens/s|model TFLOP/s|peak GiB|trainable|framework'
  lines = [f'| {columns.replace("|", " | ")} |', '|---' * 7 + '|']
  for r in rows:
    lines.append(
      f'| {r["setting"]} | {r["step_ms"]:.1f} | {r["tokens_per_s"]:,.0f} | '
      f'{r["model_tflops"]:.1f} | {r["peak_gib"]:.2f} | {r["trainable_params"]:,} | '
      f'{r["framework"]} |'
    )
  device = rows[0]['device'] if rows else '?'
  return '\n'.join(lines) + f'\n\n{device}, {rows[0]["date"] if rows else ""}\n'


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', choices=sorted(SIZES), default='smoke')
  parser.add_argument('--settings', default='all', help='comma-separated, or all')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--out', help='default: benchmarks/results/lora_step_SIZE.json')
  parser.add_argument('--one', help=argparse.SUPPRESS)  # Internal: child process.
  args = parser.parse_args(argv)
  if args.one:
    print(json.dumps(measure(args.one, args.size, args.warmup, args.steps)))
    return 0

  settings = (
    list(JAX_SETTINGS) + list(TORCH_SETTINGS)
    if args.settings == 'all'
    else args.settings.split(',')
  )
  has_torch, has_peft = importable('torch'), importable('peft')
  rows = []
  for setting in settings:
    if setting in TORCH_SETTINGS and not (
      has_torch and (has_peft or setting == 'torch_full_eager')
    ):
      print(f'skip {setting}: torch/peft not importable', file=sys.stderr)
      continue
    command = [sys.executable, '-m', 'benchmarks.lora_step', '--size', args.size,
               '--warmup', str(args.warmup), '--steps', str(args.steps),
               '--one', setting]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    if done.returncode:
      print(f'{setting} failed:\n{done.stderr[-3000:]}', file=sys.stderr)
      continue
    rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(json.dumps(rows[-1]), file=sys.stderr)
  out = pathlib.Path(args.out or f'benchmarks/results/lora_step_{args.size}.json')
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(rows, indent=2))
  out.with_suffix('.md').write_text(markdown(rows))
  print(markdown(rows))
  return 0 if rows else 1


if __name__ == '__main__':
  sys.exit(main())
