r"""One LoRA training step, peft_jax against HF PEFT, in one run (BENCHMARKS.md).

  python -m benchmarks.lora_step                    # CPU smoke size
  python -m benchmarks.lora_step --size reference   # TinyLlama-1.1B shape, 8x1024
  python -m benchmarks.lora_step --size small --repeats 3 \
      --torch-python /path/to/venv-with-torch/bin/python   # CPU, against HF PEFT

Settings, each timed in its own process (so peak memory is its own):

  jax_full            full fine-tuning (AdamW)
  jax_lora_weight     LoRA r16 on q/k/v/o/gate/up/down, weight space
  jax_lora_factored   the same LoRA on peft_jax's factored path
  jax_lora_remat      factored + jax.checkpoint per layer
  hf_peft_eager       HF PEFT LoRA, PyTorch eager      (if torch + peft import)
  hf_peft_compile     HF PEFT LoRA, torch.compile      (if torch + peft import)
  torch_full_eager    PyTorch full fine-tuning, eager  (if torch imports)

The JAX settings run in this interpreter, the torch ones in ``--torch-python``
(default: this one); a torch setting whose interpreter cannot import what it
needs is skipped with one line on stderr.

A step is forward + backward + AdamW update on a causal-LM loss over random
tokens; the time is the median of ``--steps`` synchronised steps after
``--warmup`` steps. ``--repeats R`` runs every setting R times, interleaved:
round r runs each selected setting once, in the order given, before round
r + 1 starts; a setting's row holds the medians over its rounds and each
round's raw values (``rounds``). Model TFLOP/s counts 6N FLOPs per token for
full fine-tuning and 4N for LoRA (N = matmul parameters, the input embedding
excluded), attention excluded.

Weights and compute are ``--dtype``: ``auto`` (the default) is bfloat16 on an
accelerator and float32 on a CPU, on both sides, so a CPU comparison is
float32 against float32 (bfloat16 matmuls are slow and unusual on CPUs).

Each child records its peak resident set (``ru_maxrss``), the load average
when its steps end, the CPU cores its timed steps kept busy (CPU time / wall
time) and the compile time: for JAX, ``lower().compile()`` of the step, timed
apart from the steps; for torch.compile, the first step's time minus the
median step (its compilation happens inside that first call); none for
eager PyTorch. Writes ``--out`` (JSON rows with device, versions and date)
and a Markdown table with the ratios ours / HF of tokens/s and peak RSS.
"""

import argparse
import dataclasses
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
from collections.abc import Callable

SIZES = {
  'smoke': dict(
    vocab_size=1024, hidden_size=128, intermediate_size=352, num_layers=2,
    num_heads=4, num_kv_heads=2, batch=2, seq=128, scan_layers=False,
  ),
  'small': dict(  # CPU-sized: a LoRA step takes about a second on 2 cores.
    vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=4,
    num_heads=8, num_kv_heads=4, batch=4, seq=256, scan_layers=False,
  ),
  'reference': dict(  # TinyLlama-1.1B's shape.
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
    num_heads=32, num_kv_heads=4, batch=8, seq=1024, scan_layers=True,
  ),
}  # fmt: skip
RANK, ALPHA, LR = 16, 32, 1e-4
TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
JAX_SETTINGS = ('jax_full', 'jax_lora_weight', 'jax_lora_factored', 'jax_lora_remat')
TORCH_SETTINGS = ('hf_peft_eager', 'hf_peft_compile', 'torch_full_eager')
# What a torch setting's interpreter must import (benchmarks.minilm_step
# uses the same names).
NEEDS = {
  'hf_peft_eager': ('torch', 'transformers', 'peft'),
  'hf_peft_compile': ('torch', 'transformers', 'peft'),
  'hf_peft_eager_no_dropout': ('torch', 'transformers', 'peft'),
  'torch_full_eager': ('torch', 'transformers'),
}
DTYPES = ('auto', 'float32', 'bfloat16')
REPO = pathlib.Path(__file__).resolve().parents[1]
# Per-round values a row holds as their medians over its rounds; its
# ``rounds`` keep each round's, with the load average and the date.
MEDIAN_KEYS = (
  'step_ms', 'first_step_ms', 'compile_seconds', 'peak_rss_mib', 'peak_gib',
  'cores_busy',
)  # fmt: skip
ROUND_KEYS = (*MEDIAN_KEYS, 'loadavg', 'date')


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
  # The CPU sizes unroll their few layers (the model's default): on XLA:CPU
  # a scan zero-fills and copies its stacked residuals, about 10% of the
  # small step (benchmarks/results/cpu_profile_small.md). The reference
  # size scans its 22 layers, which compiles faster.
  scan_layers: bool

  @property
  def matmul_params(self) -> int:
    """N: every weight of a matmul (the LM head included, embedding not)."""
    d, head = self.hidden_size, self.hidden_size // self.num_heads
    attention = 2 * d * d + 2 * d * self.num_kv_heads * head
    mlp = 3 * d * self.intermediate_size
    return self.num_layers * (attention + mlp) + d * self.vocab_size


def cpu_seconds() -> float:
  """User + system CPU time of this process so far (all its threads)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def time_steps(step, warmup: int, steps: int) -> dict:
  """Times ``step()`` (which must synchronise): ``seconds``, the median of
  ``steps`` calls after ``warmup`` calls; ``first_seconds``, the very first
  call; ``cores_busy``, CPU time / wall time over the timed calls."""
  times = []
  for _ in range(warmup + steps):
    start = time.perf_counter()
    if len(times) == warmup:
      cpu_start, wall_start = cpu_seconds(), start
    step()
    times.append(time.perf_counter() - start)
  cores_busy = (cpu_seconds() - cpu_start) / (time.perf_counter() - wall_start)
  return {
    'seconds': statistics.median(times[warmup:]),
    'first_seconds': times[0],
    'cores_busy': cores_busy,
  }


def resolve_dtype(dtype: str, accelerator: bool) -> str:
  """``dtype``, with ``auto`` as bfloat16 on an accelerator, else float32."""
  if dtype != 'auto':
    return dtype
  return 'bfloat16' if accelerator else 'float32'


def host() -> str:
  """This machine's CPU model and logical core count."""
  model = platform.processor() or platform.machine()
  cpuinfo = pathlib.Path('/proc/cpuinfo')
  if cpuinfo.exists():
    for line in cpuinfo.read_text().splitlines():
      if line.startswith('model name'):
        model = line.split(':', 1)[1].strip()
        break
  return f'{model}, {os.cpu_count()} logical cores'


def autogroup() -> str | None:
  """This process's scheduler autogroup and its nice (Linux): with autogroups
  on, a niced job in another session still gets its group's equal share of
  the CPU, so a benchmark there competes with it."""
  path = pathlib.Path('/proc/self/autogroup')
  return path.read_text().strip() if path.exists() else None


def jax_model(setting: str, shape: Shape, dtype: str = 'bfloat16'):
  """The Llama of ``shape`` (layers scanned if ``shape.scan_layers``), weights
  and compute in ``dtype``.

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
    dtype=getattr(jnp, dtype),
    param_dtype=getattr(jnp, dtype),
    scan_layers=shape.scan_layers,
    remat=setting == 'jax_lora_remat',
    attention_impl='cudnn' if jax.default_backend() == 'gpu' else None,
  )
  return llama.LlamaForCausalLM(config)


def jax_rules(setting: str, scan_layers: bool) -> list:
  """``full()`` on every leaf for ``jax_full``, else LoRA on ``TARGETS`` of
  every layer (``stacked`` over the scanned layers' leading axis)."""
  if setting == 'jax_full':
    return [('.*', 'full()')]
  lora = f'lora(rank={RANK}, alpha={ALPHA})'
  targets = f'(self_attn|mlp)/({"|".join(TARGETS)})/kernel'
  if scan_layers:
    return [(f'layers/{targets}', f'stacked("{lora}")')]
  return [(rf'layers_\d+/{targets}', lora)]


def jax_step(setting: str, shape: Shape, dtype: str = 'bfloat16'):
  """The jitted training step of ``setting`` and a builder of its arguments.

  Returns ``(train_step, arguments)``: ``train_step(state, frozen, ids) ->
  (state, metrics)`` is jitted with the state donated; ``arguments()`` builds
  ``(state, frozen, ids)`` (random weights in ``dtype``, ``ids`` int32 of
  shape ``(batch, seq + 1)``). ``jax.eval_shape(arguments)`` gives their
  abstract shapes without materialising any weight.
  """
  import jax
  import optax

  import peft_jax as pj

  model = jax_model(setting, shape, dtype)
  tree = pj.by_rules(jax_rules(setting, shape.scan_layers))
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


def jax_versions() -> str:
  import flax
  import jax
  import optax

  return f'jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}'


def time_jax(train_step, state, frozen, batch, warmup: int, steps: int) -> dict:
  """Compiles ``train_step`` for its arguments (timed: ``compile_seconds``),
  then times its steps (``time_steps``); ``state`` is donated step to step.
  Also returns the final ``state``, the device's peak memory, versions and
  the device."""
  import jax

  start = time.perf_counter()
  compiled = train_step.lower(state, frozen, batch).compile()
  compile_seconds = time.perf_counter() - start
  holder = [state]

  def step():
    holder[0], metrics = compiled(holder[0], frozen, batch)
    metrics['loss'].block_until_ready()

  timing = time_steps(step, warmup, steps)
  stats = jax.devices()[0].memory_stats() or {}
  return {
    **timing,
    'state': holder[0],
    'compile_seconds': compile_seconds,
    'peak_gib': stats.get('peak_bytes_in_use', float('nan')) / 2**30,
    'framework': jax_versions(),
    'device': jax.devices()[0].device_kind,
  }


def run_jax(setting: str, shape: Shape, warmup: int, steps: int, dtype: str) -> dict:
  import jax

  import peft_jax as pj

  dtype = resolve_dtype(dtype, jax.default_backend() != 'cpu')
  train_step, arguments = jax_step(setting, shape, dtype)
  state, frozen, ids = arguments()
  row = time_jax(train_step, state, frozen, ids, warmup, steps)
  trainable = pj.count(row.pop('state').params)
  return {**row, 'trainable': trainable, 'dtype': dtype}


def time_torch(step, setting: str, warmup: int, steps: int) -> dict:
  """``time_steps`` of a torch ``step`` on ``cuda`` if there is one, with the
  device's peak memory, ``compile_seconds`` (for ``*_compile`` settings: the
  first step minus the median step) and the device."""
  import torch

  cuda = torch.cuda.is_available()
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  timing = time_steps(step, warmup, steps)
  compiled = setting.endswith('_compile')
  return {
    **timing,
    'compile_seconds': timing['first_seconds'] - timing['seconds']
    if compiled
    else None,
    'peak_gib': torch.cuda.max_memory_allocated() / 2**30 if cuda else float('nan'),
    'device': torch.cuda.get_device_name() if cuda else 'cpu',
    'threads': torch.get_num_threads(),
  }


def run_torch(setting: str, shape: Shape, warmup: int, steps: int, dtype: str) -> dict:
  import torch
  import transformers

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  dtype = resolve_dtype(dtype, device == 'cuda')
  config = transformers.LlamaConfig(
    vocab_size=shape.vocab_size,
    hidden_size=shape.hidden_size,
    intermediate_size=shape.intermediate_size,
    num_hidden_layers=shape.num_layers,
    num_attention_heads=shape.num_heads,
    num_key_value_heads=shape.num_kv_heads,
    max_position_embeddings=max(2048, shape.seq),
  )
  model = transformers.LlamaForCausalLM(config).to(device, dtype=getattr(torch, dtype))
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

  return {
    **time_torch(step, setting, warmup, steps),
    'trainable': sum(p.numel() for p in trainable),
    'framework': versions,
    'dtype': dtype,
  }


def child_row(setting: str, raw: dict, tokens: int, flops_per_token: int) -> dict:
  """One child's JSON row: a runner's ``raw`` result with the step's rates,
  this process's peak RSS, the load average now, the host and the date."""
  seconds = raw.pop('seconds')
  return {
    'setting': setting,
    'step_ms': 1000 * seconds,
    'first_step_ms': 1000 * raw.pop('first_seconds'),
    'tokens_per_s': tokens / seconds,
    'model_tflops': tokens * flops_per_token / seconds / 1e12,
    'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    'trainable_params': raw.pop('trainable'),
    **raw,
    'loadavg': list(os.getloadavg()),
    'host': host(),
    'autogroup': autogroup(),
    'python': platform.python_version(),
    'date': datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC'),
  }


def measure(setting: str, size: str, warmup: int, steps: int, dtype: str) -> dict:
  """Runs one setting in this process; returns its JSON row."""
  shape = Shape(**SIZES[size])
  run = run_jax if setting in JAX_SETTINGS else run_torch
  raw = run(setting, shape, warmup, steps, dtype)
  flops_per_token = (6 if 'full' in setting else 4) * shape.matmul_params
  return {
    **child_row(setting, raw, shape.batch * shape.seq, flops_per_token),
    'size': size,
    'shape': dataclasses.asdict(shape),
    'warmup': warmup,
    'timed_steps': steps,
  }


def importable(modules, python: str = sys.executable) -> bool:
  """Whether ``python`` imports every one of ``modules``."""
  code = '; '.join(f'import {m}' for m in modules)
  return subprocess.run([python, '-c', code], capture_output=True).returncode == 0


def runnable(settings: list[str], torch_python: str) -> list[str]:
  """``settings`` less the torch ones ``torch_python`` cannot run, which are
  named on one stderr line."""
  able = {needs: importable(needs, torch_python) for needs in set(NEEDS.values())}
  skipped = [s for s in settings if s in NEEDS and not able[NEEDS[s]]]
  if skipped:
    missing = sorted({m for s in skipped for m in NEEDS[s]})
    print(
      f'skip {", ".join(skipped)}: {torch_python} cannot import all of '
      f'{", ".join(missing)}',
      file=sys.stderr,
    )
  return [s for s in settings if s not in skipped]


def median_row(rounds: list[dict]) -> dict:
  """A setting's row over its rounds: the first round's fields, with the
  medians of ``MEDIAN_KEYS`` (None where no round has one; rates from the
  median step), and every round's ``ROUND_KEYS`` under ``rounds``."""
  row = {k: v for k, v in rounds[0].items() if k not in ('round', 'loadavg')}
  for key in MEDIAN_KEYS:
    values = [r[key] for r in rounds if r.get(key) is not None]
    row[key] = statistics.median(values) if values else None
  scale = rounds[0]['step_ms'] / row['step_ms']
  row['tokens_per_s'] = rounds[0]['tokens_per_s'] * scale
  row['model_tflops'] = rounds[0]['model_tflops'] * scale
  row['repeats'] = len(rounds)
  row['rounds'] = [
    {'round': r['round'], **{k: r.get(k) for k in ROUND_KEYS}} for r in rounds
  ]
  return row


def run_interleaved(
  module: str,
  settings: list[str],
  options: list[str],
  repeats: int,
  torch_python: str,
  child_timeout: float | None = None,
  save: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
  """Runs ``python -m module *options --one SETTING`` for every setting,
  ``repeats`` rounds, interleaved (round r runs each setting once, in the
  order of ``settings``); torch settings (``NEEDS``) run in ``torch_python``.
  A child that fails or outlasts ``child_timeout`` seconds is named on
  stderr and skipped. Returns one ``median_row`` per setting that succeeded
  at least once, and passes the rows so far to ``save`` after each child
  that succeeds (a run cut short keeps what it measured)."""
  rounds = {setting: [] for setting in settings}
  for round_ in range(repeats):
    for setting in settings:
      python = torch_python if setting in NEEDS else sys.executable
      command = [python, '-m', module, *options, '--one', setting]
      try:
        done = subprocess.run(
          command, capture_output=True, text=True, cwd=REPO, timeout=child_timeout
        )
      except subprocess.TimeoutExpired:
        print(f'{setting} timed out after {child_timeout:g} s', file=sys.stderr)
        continue
      if done.returncode:
        print(f'{setting} failed:\n{done.stderr[-3000:]}', file=sys.stderr)
        continue
      row = {**json.loads(done.stdout.strip().splitlines()[-1]), 'round': round_}
      rounds[setting].append(row)
      print(json.dumps(row), file=sys.stderr)
      if save is not None:
        save([median_row(r) for r in rounds.values() if r])
  return [median_row(r) for r in rounds.values() if r]


def fixed(value, digits: int = 1) -> str:
  """``value`` with ``digits`` decimals, or ``—`` for None."""
  return '—' if value is None else f'{value:,.{digits}f}'


def ratio_lines(rows: list[dict]) -> list[str]:
  """The ratios ours / theirs of tokens/s and peak RSS: each JAX LoRA row
  against each HF PEFT row, full fine-tuning against full fine-tuning, and
  settings without dropout against settings without dropout."""
  ours = [r for r in rows if r['setting'].startswith('jax_')]
  theirs = [r for r in rows if not r['setting'].startswith('jax_')]
  kind = lambda row: tuple(part in row['setting'] for part in ('full', 'no_dropout'))
  pairs = [(o, t) for o in ours for t in theirs if kind(o) == kind(t)]
  if not pairs:
    return []
  lines = [
    '',
    'Ratios ours / theirs (medians; tokens/s > 1 and peak RSS < 1 favour ours):',
    '',
    '| ours | theirs | tokens/s ratio | peak RSS ratio |',
    '|---|---|---|---|',
  ]
  for o, t in pairs:
    lines.append(
      f'| {o["setting"]} | {t["setting"]} | '
      f'{o["tokens_per_s"] / t["tokens_per_s"]:.2f} | '
      f'{o["peak_rss_mib"] / t["peak_rss_mib"]:.2f} |'
    )
  return lines


def markdown(rows: list[dict]) -> str:
  """The rows as a Markdown table, the ratios ours / theirs, and where and
  when they were measured (load averages: 1-minute, each child's as its
  steps ended)."""
  columns = (
    'setting|dtype|step ms|tokens/s|model TFLOP/s|peak GiB|peak RSS MiB|'
    'compile s|cores busy|trainable|framework'
  )
  lines = [f'| {columns.replace("|", " | ")} |', '|---' * 11 + '|']
  for r in rows:
    lines.append(
      f'| {r["setting"]} | {r.get("dtype", "—")} | {r["step_ms"]:.1f} | '
      f'{r["tokens_per_s"]:,.0f} | {r["model_tflops"]:.2f} | {r["peak_gib"]:.2f} | '
      f'{fixed(r.get("peak_rss_mib"), 0)} | {fixed(r.get("compile_seconds"))} | '
      f'{fixed(r.get("cores_busy"), 2)} | {r["trainable_params"]:,} | '
      f'{r["framework"]} |'
    )
  if not rows:
    return '\n'.join(lines) + '\n'
  lines += ratio_lines(rows)
  first = rows[0]
  loads = [x['loadavg'][0] for r in rows for x in r.get('rounds', ())]
  lines += ['', f'{first["device"]} ({first.get("host", "?")}), {first["date"]}.']
  if loads:
    lines.append(
      f'{first["repeats"]} interleaved rounds; 1-minute load average at the end '
      f'of each child: {min(loads):.2f}–{max(loads):.2f} '
      f'(median {statistics.median(loads):.2f}).'
    )
  return '\n'.join(lines) + '\n'


def write_report(rows: list[dict], out: pathlib.Path, echo: bool = True) -> None:
  """Writes ``out`` (the JSON rows) and its ``.md``; prints the Markdown if
  ``echo``."""
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(rows, indent=2))
  out.with_suffix('.md').write_text(markdown(rows))
  if echo:
    print(markdown(rows))


def add_common_arguments(parser: argparse.ArgumentParser, warmup: int, steps: int):
  """The options every step benchmark takes (``--one`` runs one child)."""
  parser.add_argument('--settings', default='all', help='comma-separated, or all')
  parser.add_argument('--warmup', type=int, default=warmup)
  parser.add_argument('--steps', type=int, default=steps)
  parser.add_argument(
    '--repeats', type=int, default=1, help='interleaved rounds; rows hold medians'
  )
  parser.add_argument(
    '--torch-python',
    default=sys.executable,
    help='interpreter of the torch settings (default: this one)',
  )
  parser.add_argument(
    '--child-timeout',
    type=float,
    help="seconds one setting's process may run before it is skipped",
  )
  parser.add_argument('--one', help=argparse.SUPPRESS)  # Internal: child process.


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', choices=sorted(SIZES), default='smoke')
  parser.add_argument(
    '--dtype', choices=DTYPES, default='auto', help='auto: bf16 on GPU, f32 on CPU'
  )
  parser.add_argument('--out', help='default: benchmarks/results/lora_step_SIZE.json')
  add_common_arguments(parser, warmup=3, steps=10)
  args = parser.parse_args(argv)
  if args.one:
    row = measure(args.one, args.size, args.warmup, args.steps, args.dtype)
    print(json.dumps(row))
    return 0

  settings = (
    list(JAX_SETTINGS) + list(TORCH_SETTINGS)
    if args.settings == 'all'
    else args.settings.split(',')
  )
  options = ['--size', args.size, '--warmup', str(args.warmup),
             '--steps', str(args.steps), '--dtype', args.dtype]  # fmt: skip
  out = pathlib.Path(args.out or f'benchmarks/results/lora_step_{args.size}.json')
  rows = run_interleaved(
    'benchmarks.lora_step',
    runnable(settings, args.torch_python),
    options,
    args.repeats,
    args.torch_python,
    args.child_timeout,
    save=lambda rows: write_report(rows, out, echo=False),
  )
  write_report(rows, out)
  return 0 if rows else 1


if __name__ == '__main__':
  sys.exit(main())
