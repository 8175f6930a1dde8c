r"""Where the LoRA step's time goes on a CPU: a traced profile, op by op.

  python -m benchmarks.cpu_profile --size small
  python -m benchmarks.cpu_profile --size smoke --settings jax_lora_factored \
      --out /tmp/profile.json

For each JAX setting of ``benchmarks.lora_step`` (float32, as that benchmark
runs on a CPU) the step is compiled, run ``--warmup`` times, then run
``--steps`` times under ``jax.profiler.trace``. XLA:CPU records an event for
each op (thunk) it executes; an op's time is the wall time of its events
minus that of events nested in them on the same thread (a loop's body ops
are counted as themselves, not in the loop), divided by the steps. Each op is
put in ``benchmarks.hlo_breakdown``'s categories by its instruction in the
compiled HLO (a ``copy`` or ``transpose`` fusion is ``layout``, a matmul
fusion ``dot:KIND``), and in a phase (forward, backward, optimizer) by its
``op_name``. Events that name no instruction (the runtime's waits) are
``runtime``. Inside a matmul the library's worker threads are not traced
apart: the op's time is its wall time. ``traced ms`` sums the ops' times;
independent ops run at once on the executor's threads, so it can exceed
``step ms``, the wall time of the traced steps (tracing adds a little).
Ops that XLA named after a copy or transpose (``copy_bitcast_fusion``)
write a transposed result; their time is also totalled apart, as layout
work hidden in elementwise fusions.

Writes JSON and Markdown: ``benchmarks/results/cpu_profile_SIZE.{json,md}``
or ``--out``; the Markdown keeps what an existing one has above its first
``## Generated`` heading. ``--keep-trace DIR`` also keeps, per setting, the
perfetto trace (``SETTING.perfetto_trace.json.gz``) and the compiled HLO
(``SETTING.hlo.txt``). On a GPU only that is done: the step is traced and
timed, its trace and HLO kept for a reading of their own (this module reads
XLA:CPU's events only), ``--dtype auto`` then being bfloat16.
"""

import argparse
import collections
import datetime
import gzip
import json
import pathlib
import re
import shutil
import sys
import tempfile
import time

from benchmarks import hlo_breakdown, lora_step

RUNTIME = 'runtime'
OP_THREADS = 'tf_XLAEigen'
# Fusions XLA names after a copy or transpose write a transposed result.
TRANSPOSING = re.compile(r'(copy|transpose)')


def trace_file(logdir: str) -> pathlib.Path:
  """The perfetto trace ``jax.profiler.trace`` wrote under ``logdir``."""
  (path,) = pathlib.Path(logdir).rglob('perfetto_trace.json.gz')
  return path


def trace_events(logdir: str) -> list[dict]:
  """The complete (``ph == 'X'``) events of the perfetto trace in ``logdir``
  on the threads where XLA:CPU runs ops (``tf_XLAEigen...``)."""
  with gzip.open(trace_file(logdir)) as file:
    trace = json.load(file)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  op_threads = {
    (e['pid'], e['tid'])
    for e in events
    if e.get('ph') == 'M'
    and e.get('name') == 'thread_name'
    and e['args']['name'].startswith(OP_THREADS)
  }
  return [
    e for e in events if e.get('ph') == 'X' and (e['pid'], e['tid']) in op_threads
  ]


def self_times(events: list[dict]) -> collections.Counter:
  """Microseconds per event name, each event less the events nested in it
  on its thread."""
  times = collections.Counter()
  by_thread = collections.defaultdict(list)
  for event in events:
    by_thread[event['pid'], event['tid']].append(event)
  for thread in by_thread.values():
    thread.sort(key=lambda e: (e['ts'], -e['dur']))
    open_events = []  # [end, name, self time] of the enclosing events.
    for event in thread:
      while open_events and open_events[-1][0] <= event['ts']:
        _, name, own = open_events.pop()
        times[name] += own
      if open_events:
        open_events[-1][2] -= event['dur']
      open_events.append([event['ts'] + event['dur'], event['name'], event['dur']])
    for _, name, own in open_events:
      times[name] += own
  return times


def op_rows(times: collections.Counter, module, dims, steps: int) -> list[dict]:
  """One row per traced op: ``ms`` per step, category, phase, result shape."""
  rows = []
  for name, micros in times.items():
    op = module.by_name.get(name)
    if op is None:
      if name.startswith('ThunkExecutor'):
        continue  # The executor's own span encloses the ops.
      category, phase, result = RUNTIME, 'other', ''
    else:
      category, _ = hlo_breakdown.classify(module, op, dims)
      phase = hlo_breakdown.phase_of(op.op_name, 'other')
      result = ' '.join(f'{a.dtype}{list(a.dims)}'.replace(' ', '') for a in op.arrays)
    rows.append(
      {
        'op': name,
        'ms': micros / 1e3 / steps,
        'category': category,
        'phase': phase,
        'result': result,
        'transposing': bool(op is not None and TRANSPOSING.match(name)),
      }
    )
  return sorted(rows, key=lambda r: -r['ms'])


def totals(rows: list[dict], key: str) -> dict[str, float]:
  """Milliseconds per step summed by ``key``, largest first."""
  summed = collections.Counter()
  for row in rows:
    summed[row[key]] += row['ms']
  return dict(summed.most_common())


def profile(
  setting: str,
  size: str,
  warmup: int,
  steps: int,
  top: int,
  dtype: str = 'float32',
  keep: pathlib.Path | None = None,
) -> dict:
  """One setting's profile (module docstring); only its step time, with the
  trace and HLO kept in ``keep``, off the CPU."""
  import jax

  shape = lora_step.Shape(**lora_step.SIZES[size])
  train_step, arguments = lora_step.jax_step(setting, shape, dtype)
  state, frozen, ids = arguments()
  compiled = train_step.lower(state, frozen, ids).compile()
  for _ in range(warmup):
    state, metrics = compiled(state, frozen, ids)
  jax.block_until_ready(metrics)
  with tempfile.TemporaryDirectory() as logdir:
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
      start = time.perf_counter()
      for _ in range(steps):
        state, metrics = compiled(state, frozen, ids)
        jax.block_until_ready(metrics)
      seconds = time.perf_counter() - start
    if keep is not None:
      keep.mkdir(parents=True, exist_ok=True)
      shutil.copy(trace_file(logdir), keep / f'{setting}.perfetto_trace.json.gz')
      (keep / f'{setting}.hlo.txt').write_text(compiled.as_text())
    if jax.default_backend() != 'cpu':
      return {'setting': setting, 'dtype': dtype, 'step_ms': seconds * 1e3 / steps}
    times = self_times(trace_events(logdir))
  module = hlo_breakdown.parse_module(compiled.as_text())
  rows = op_rows(times, module, hlo_breakdown.dims_of(shape, frozen), steps)
  return {
    'setting': setting,
    'dtype': dtype,
    'step_ms': seconds * 1e3 / steps,
    'traced_ms': sum(r['ms'] for r in rows),
    'by_category': totals(rows, 'category'),
    'by_phase': totals(rows, 'phase'),
    'transposing_ms': sum(r['ms'] for r in rows if r['transposing']),
    'largest': rows[:top],
  }


def markdown(report: dict) -> str:
  lines = [
    '## Generated',
    '',
    f'`{report["command"]}`: {report["device"]}, jax {report["jax"]}, '
    f'{report["date"]}; {report["steps"]} traced steps after {report["warmup"]}.',
  ]
  for row in report['rows']:
    if 'traced_ms' not in row:  # Off the CPU: the trace is kept, not read.
      lines += ['', f'### {row["setting"]}: step {row["step_ms"]:.1f} ms (trace kept)']
      continue
    lines += [
      '',
      f'### {row["setting"]}: step {row["step_ms"]:.0f} ms, '
      f'traced ops {row["traced_ms"]:.0f} ms',
      '',
      '| category | ms per step | share of traced |',
      '|---|---|---|',
    ]
    for name, ms in row['by_category'].items():
      lines.append(f'| {name} | {ms:.1f} | {ms / row["traced_ms"]:.0%} |')
    phases = ', '.join(f'{k} {v:.0f} ms' for k, v in row['by_phase'].items())
    transposing = (
      f'By phase: {phases}. In ops that write a transposed result (XLA names '
      f'them copy/transpose fusions, whatever their category): '
      f'{row["transposing_ms"]:.1f} ms.'
    )
    lines += ['', transposing, '', '| op | ms per step | category | phase | result |']
    lines.append('|---|---|---|---|---|')
    for op in row['largest']:
      lines.append(
        f'| {op["op"]} | {op["ms"]:.1f} | {op["category"]} | {op["phase"]} '
        f'| {op["result"]} |'
      )
  return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', choices=sorted(lora_step.SIZES), default='smoke')
  parser.add_argument('--settings', default='jax_lora_factored,jax_full')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--top', type=int, default=12, help='largest ops listed')
  parser.add_argument('--out', help='default: benchmarks/results/cpu_profile_SIZE.json')
  parser.add_argument(
    '--dtype',
    choices=lora_step.DTYPES,
    default='auto',
    help='auto: float32 on the CPU, bfloat16 on an accelerator',
  )
  parser.add_argument(
    '--keep-trace', metavar='DIR', help="keep each setting's trace and HLO here"
  )
  args = parser.parse_args(argv)
  settings = args.settings.split(',')
  unknown = [s for s in settings if s not in lora_step.JAX_SETTINGS]
  if unknown or args.steps < 1:
    parser.error(
      f'--settings {unknown} / --steps {args.steps}: expected settings among '
      f'{list(lora_step.JAX_SETTINGS)} and --steps >= 1'
    )
  import jax

  accelerator = jax.default_backend() != 'cpu'
  if accelerator and not args.keep_trace:
    parser.error(
      f'backend {jax.default_backend()!r}: this profile reads XLA:CPU events; '
      'pass --keep-trace DIR to trace the step and keep its trace there'
    )
  dtype = lora_step.resolve_dtype(args.dtype, accelerator)
  keep = pathlib.Path(args.keep_trace) if args.keep_trace else None
  report = {
    'size': args.size,
    'jax': jax.__version__,
    'device': lora_step.host(),
    'date': datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC'),
    'command': 'python -m benchmarks.cpu_profile '
    + ' '.join(sys.argv[1:] if argv is None else argv),
    'warmup': args.warmup,
    'steps': args.steps,
    'rows': [
      profile(s, args.size, args.warmup, args.steps, args.top, dtype, keep)
      for s in settings
    ],
  }
  out = pathlib.Path(args.out or f'benchmarks/results/cpu_profile_{args.size}.json')
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2))
  hlo_breakdown.write_markdown(out.with_suffix('.md'), markdown(report))
  print(markdown(report))
  return 0


if __name__ == '__main__':
  sys.exit(main())
