r"""Peak memory and step time of SAM's sparse training against full fine-tuning.

  python -m benchmarks.sparse_memory [--steps 8] [--repeats 3]

On the real MiniLM-L6 × Rotten Tomatoes task (``experiments/configs/sam.py``,
batch 32, 64 tokens), each setting runs in its own process (so peak memory is
its own), ``--repeats`` times, interleaved:

  full          full fine-tuning of the encoder and head (AdamW)
  sam           SAM's selection (``score_batches`` scoring batches) and then
                ``sparse`` training of the selected p = 0.005 of the encoder
                (``w' = w + scatter``: the dense weight gradient is formed,
                then read at the k entries)
  sparse        the same sparse training on a random mask of the same size
                (no scoring phase: the training step's own footprint)
  dense_mask    the dense alternative: ``w + M ⊙ Δ`` with ``Δ`` leaf-sized
                (Adam state for every entry of a selected leaf), weight space

A process reports its peak resident memory (``ru_maxrss``) after building the
task (``base``) and at the end (``peak``), the bytes of adapter parameters
plus optimizer state, and the median step time after one warm-up step.
Writes ``benchmarks/results/sparse_memory.json`` and prints a Markdown table.
The committed results also hold ``sparse_factored``/``sparse_weight`` rows:
they were measured when ``sparse`` still had a gather/scatter factored form
(2× slower, 10% more memory than weight space), which was then dropped.
"""

import argparse
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import time

SETTINGS = {  # setting -> (config argument, factored path)
  'full': ('method=full', True),
  'sam': ('method=sam', True),
  'sparse': ('method=random', True),
  'dense_mask': ('method=random', False),
}
OUT = pathlib.Path(__file__).parent / 'results' / 'sparse_memory.json'


def peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(setting: str, steps: int, score_batches: int) -> dict:
  """One setting, in this process: the numbers of one row."""
  import jax
  import numpy as np

  import peft_jax as pj
  from experiments import selection, tasks, train
  from experiments.configs import common

  method, factored = SETTINGS[setting]
  arg = f'{method},score_batches={score_batches},steps={steps + 1}'
  config = common.load_config(f'experiments/configs/sam.py:{arg}')
  task = tasks.build(config)
  base = peak_mib()
  t0 = time.perf_counter()
  rules = selection.rules_for(config, task)
  select_seconds = time.perf_counter() - t0
  if setting == 'dense_mask':
    rules = [
      (s, dense_mask(a)) if isinstance(a, pj.Adapter) else (s, a) for s, a in rules
    ]
  tree = pj.by_rules(rules)
  mesh = train.make_mesh(config, {'data': 1})
  optimizer = train.make_optimizer(config)
  run = train.Run(config, mesh, task, task.frozen, rules, tree, optimizer, None)
  state = train.initial_state(run)
  state_bytes = sum(
    np.asarray(x).nbytes for x in jax.tree.leaves((state.params, state.opt_state))
  )
  step = jax.jit(
    pj.make_train_step(task.loss_fn, tree, run.optimizer, factored=factored),
    donate_argnums=0,
  )
  times = []
  for t in range(steps + 1):
    start = time.perf_counter()
    state, metrics = step(state, task.frozen, task.train_batch(t))
    jax.block_until_ready(metrics['loss'])
    times.append(time.perf_counter() - start)
  return {
    'setting': setting,
    'trainable': pj.count(state.params),
    'state_mib': state_bytes / 2**20,
    'base_mib': base,
    'peak_mib': peak_mib(),
    'select_seconds': select_seconds,
    'step_ms': 1000 * statistics.median(times[1:]),
  }


def dense_mask(sparse_adapter):
  """A hand-built ``w + M ⊙ Δ`` with a dense ``Δ`` and a bool mask buffer,
  on the entries ``sparse_adapter`` selects (for comparison only)."""
  import jax.numpy as jnp

  import peft_jax as pj
  from peft_jax.methods.sparse import flat_indices

  def init(key, w):
    _, buffers = sparse_adapter.init(key, w)
    mask = jnp.zeros(w.size, bool).at[flat_indices(buffers)].set(True)
    return jnp.zeros(w.shape, jnp.float32), mask.reshape(w.shape)

  def apply(w, delta, mask):
    return (w + jnp.where(mask, delta, 0)).astype(w.dtype)

  return pj.Adapter(init=init, apply=apply)


def run_all(steps: int, repeats: int, score_batches: int) -> list[dict]:
  rows = []
  for _ in range(repeats):
    for setting in SETTINGS:
      command = [sys.executable, '-m', 'benchmarks.sparse_memory', '--one', setting]
      command += ['--steps', str(steps), '--score-batches', str(score_batches)]
      out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
      rows.append(json.loads(out.strip().splitlines()[-1]))
      print(rows[-1], file=sys.stderr)
  return rows


def summarise(rows: list[dict]) -> str:
  """Markdown: medians over repeats, and ratios to full fine-tuning."""
  med = lambda s, k: statistics.median(r[k] for r in rows if r['setting'] == s)
  full_peak, full_state = med('full', 'peak_mib'), med('full', 'state_mib')
  lines = [
    '| setting | trainable | params + Adam (MiB) | peak RSS (MiB) | peak − base '
    '(MiB) | peak / full | step ms |',
    '|---|---|---|---|---|---|---|',
  ]
  for s in SETTINGS:
    extra = med(s, 'peak_mib') - med(s, 'base_mib')
    lines.append(
      f'| {s} | {int(med(s, "trainable")):,} | {med(s, "state_mib"):.1f} '
      f'({med(s, "state_mib") / full_state:.4f}×) | {med(s, "peak_mib"):.0f} | '
      f'{extra:.0f} | {med(s, "peak_mib") / full_peak:.2f} | {med(s, "step_ms"):.0f} |'
    )
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--score-batches', type=int, default=32)
  parser.add_argument('--one', choices=SETTINGS, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    print(json.dumps(measure(args.one, args.steps, args.score_batches)))
    return
  rows = run_all(args.steps, args.repeats, args.score_batches)
  from experiments.train import environment

  OUT.parent.mkdir(exist_ok=True)
  OUT.write_text(json.dumps({'environment': environment(), 'rows': rows}, indent=2))
  print(summarise(rows))


if __name__ == '__main__':
  main()
