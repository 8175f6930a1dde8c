r"""N LoRA adapters trained as one program against N sequential runs.

  python -m benchmarks.many_adapters      # 8 adapters, 10 steps, 3 repeats
  python -m benchmarks.many_adapters --adapters 8 --steps 10 --repeats 3 \
      --out benchmarks/results
  python -m benchmarks.many_adapters --tiny --adapters 2 --steps 3 --repeats 1 \
      --out /tmp/many_adapters           # smoke test: tiny random BERT

On the real MiniLM-L6 × Rotten Tomatoes task (``experiments/configs/
rotten_tomatoes.py:method=lora``: LoRA r8 on query/value and a fully trained
head, batch 32 × 64 tokens, factored, dropout on, one device), each mode
runs in its own process (so peak memory is its own), ``--repeats`` times,
interleaved:

  one   one adapter (seed 0), ``jax.jit(pj.make_train_step(...))``
  many  N adapters (seeds 0..N-1: their own LoRA init and dropout; the head
        starts from seed 0's task in all) on the same batches (shared
        batch), ``jax.jit(pj.make_many_train_step(...))``: one vmapped pass
  passes  the same N in passes of one adapter inside the same program
        (``make_many_train_step(..., adapters_per_pass=1)``)

Both use ``pj.adamw_per_adapter`` with the trainer's warm-up/decay shape and
donate the state. A process times ``lower`` and ``compile`` of its step, then
``--steps`` steps (each synchronised); it reports the median step after the
first, the whole run (lower + compile + every step), its peak resident
memory (``ru_maxrss``) before compiling (``base``) and at the end, and the
compiled step's ``memory_analysis`` and ``cost_analysis`` FLOPs.

"N sequential runs" is N times the one-adapter run, each paying its own
compile, as N separate trainer runs do (building the task, outside every
figure, is paid by each too). Besides the measured ``--steps`` runs, the
compile-included ratio is computed from the medians for the trainer's
500-step run. Writes ``OUT/many_adapters.json`` (machine, versions, date,
settings, every sample, medians, ratios) and ``OUT/many_adapters.md``.
``--tiny`` swaps MiniLM and the data for a tiny random BERT on random tokens
(same config, rules, loss and step), for tests.
"""

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

CONFIG = 'experiments/configs/rotten_tomatoes.py'
ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / 'benchmarks' / 'results'
MODES = ('one', 'many', 'passes')
GROUPS = ('many', 'passes')  # the modes that train N adapters
TINY_BERT = dict(
  vocab_size=64,
  hidden_size=32,
  num_layers=2,
  num_heads=2,
  intermediate_size=64,
  max_position_embeddings=16,
)
# rotten_tomatoes.py's default run length: the compile-included ratio is
# also computed (from the medians) for a run this long.
TRAINER_STEPS = 500


def peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_seconds() -> tuple[float, float]:
  """This process's user and system CPU time so far."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime, usage.ru_stime


def tiny_task(config):
  """The classification task on a tiny random BERT and random tokens."""
  import jax
  import numpy as np

  from experiments.tasks import text_classification
  from peft_jax.models import bert

  rng = np.random.default_rng(0)
  vocab, seq = TINY_BERT['vocab_size'], TINY_BERT['max_position_embeddings']
  ids = rng.integers(1, vocab, (4 * config.batch_size, seq), dtype=np.int32)
  split = {
    'input_ids': ids,
    'attention_mask': np.ones_like(ids),
    'label': (ids[:, 0] % 2).astype(np.int32),
  }
  encoder_config = bert.BertConfig(**TINY_BERT)
  encoder = bert.BertModel(encoder_config).init(jax.random.key(1), ids[:1], ids[:1])
  arrays = {'train': split, 'validation': split, 'test': split}
  return text_classification.make_task(
    config, encoder_config, encoder['params'], arrays, 'tiny random BERT'
  )


def make_run(config, tiny: bool):
  """The trainer's ``Run`` on one device, with ``pj.adamw_per_adapter``."""
  import peft_jax as pj
  from experiments import selection, tasks, train
  from peft_jax.models import partitioning

  task = tiny_task(config) if tiny else tasks.build(config)
  mesh = train.make_mesh(config, {'data': 1})
  shardings = partitioning.param_shardings(task.frozen, task.param_axes, mesh)
  frozen = partitioning.place(task.frozen, shardings)
  rules = selection.rules_for(config, task)
  optimizer = pj.adamw_per_adapter(
    config.lr, config.weight_decay, train.lr_schedule(config, 1.0)
  )
  return train.Run(
    config, mesh, task, frozen, rules, pj.by_rules(rules), optimizer, None
  )


def seed_states(run, count: int) -> list:
  """The trainer's step-0 states of seeds ``0 .. count - 1``."""
  from experiments import train

  def state(seed):
    config = run.config.copy_and_resolve_references()
    config.seed = seed
    return train.initial_state(run._replace(config=config))

  return [state(seed) for seed in range(count)]


def compiled_stats(compiled) -> dict:
  """XLA's buffer sizes and FLOPs of the compiled step (None where the
  backend gives none)."""
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return {
    'argument_bytes': memory.argument_size_in_bytes,
    'output_bytes': memory.output_size_in_bytes,
    'temp_bytes': memory.temp_size_in_bytes,
    'alias_bytes': memory.alias_size_in_bytes,
    'flops': (cost or {}).get('flops'),
  }


def measure(mode: str, adapters: int, steps: int, tiny: bool) -> dict:
  """One mode, in this process: one sample."""
  import flax
  import jax
  import numpy as np
  import optax

  import peft_jax as pj
  from experiments import train
  from experiments.configs import common

  start = time.perf_counter()
  config = common.load_config(f'{CONFIG}:method=lora,steps={steps}')
  run = make_run(config, tiny)
  many = mode in GROUPS
  count = adapters if many else 1
  states = seed_states(run, count)
  state = pj.stack_states(states) if many else states[0]
  options = dict(factored=config.factored)
  if mode == 'passes':
    options['adapters_per_pass'] = 1
  make_step = pj.make_many_train_step if many else pj.make_train_step
  step = jax.jit(
    make_step(run.task.loss_fn, run.tree, run.optimizer, **options),
    donate_argnums=0,
  )
  batches = jax.device_put([run.task.train_batch(t) for t in range(steps)])
  jax.block_until_ready((state, batches))
  setup_s, base = time.perf_counter() - start, peak_mib()

  start = time.perf_counter()
  lowered = step.lower(state, run.frozen, batches[0])
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  step_s, cpu_before = [], cpu_seconds()
  for batch in batches:
    start = time.perf_counter()
    state, metrics = compiled(state, run.frozen, batch)
    jax.block_until_ready((state, metrics))
    step_s.append(time.perf_counter() - start)
  (user, system), (user0, system0) = cpu_seconds(), cpu_before
  cpu_s, system_s = user - user0 + system - system0, system - system0
  return {
    'mode': mode,
    'adapters': count,
    'environment': {
      **train.environment(),
      'flax': flax.__version__,
      'optax': optax.__version__,
    },
    'task': run.task.describe,
    'batch': list(batches[0]['input_ids'].shape),
    'rules': [[pattern, str(adapter)] for pattern, adapter in run.rules],
    'trainable_per_adapter': pj.count(state.params) // count,
    'setup_s': setup_s,
    'lower_s': lower_s,
    'compile_s': compile_s,
    'step_s': step_s,
    'median_step_s': statistics.median(step_s[1:] or step_s),
    'run_s': lower_s + compile_s + sum(step_s),
    # CPU time of the timed steps over their wall time × CPUs, and its
    # system share.
    'steps_cpu_busy': cpu_s / sum(step_s) / os.cpu_count(),
    'steps_sys_share': system_s / cpu_s,
    'base_rss_mib': base,
    'peak_rss_mib': peak_mib(),
    'last_loss': np.ravel(metrics['loss']).tolist(),
    **step_stats(compiled, mode, count),
  }


def step_stats(compiled, mode: str, count: int) -> dict:
  """``compiled_stats``; for ``passes``, whose step loops over the N adapters,
  ``flops`` is N × XLA's count (which counts a loop body once: one pass),
  kept as ``flops_one_pass``."""
  stats = compiled_stats(compiled)
  if mode == 'passes' and stats['flops'] is not None:
    stats.update(flops_one_pass=stats['flops'], flops=count * stats['flops'])
  return stats


def run_children(adapters: int, steps: int, repeats: int, tiny: bool) -> list[dict]:
  """``repeats`` × (one, many), interleaved, each in a fresh process."""
  samples = []
  for _ in range(repeats):
    for mode in MODES:
      command = [sys.executable, '-m', 'benchmarks.many_adapters', '--child', mode]
      command += ['--adapters', str(adapters), '--steps', str(steps)]
      command += ['--tiny'] * tiny
      done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
      if done.returncode:
        sys.exit(f'{mode} failed:\n{done.stderr[-3000:]}')
      samples.append(json.loads(done.stdout.strip().splitlines()[-1]))
      print(json.dumps({k: v for k, v in samples[-1].items() if k != 'step_s'}))
  return samples


NUMERIC = (
  'setup_s', 'lower_s', 'compile_s', 'median_step_s', 'run_s', 'base_rss_mib',
  'peak_rss_mib', 'argument_bytes', 'output_bytes', 'temp_bytes', 'flops',
  'steps_cpu_busy', 'steps_sys_share',
)  # fmt: skip


def medians(samples: list[dict], mode: str) -> dict:
  rows = [s for s in samples if s['mode'] == mode]
  return {
    key: None if rows[0][key] is None else statistics.median(r[key] for r in rows)
    for key in NUMERIC
  }


def ratios(one: dict, many: dict, adapters: int) -> dict:
  """Many against ``adapters`` sequential one-adapter runs: throughput > 1
  means many wins; memory, FLOPs and compile are many over one."""
  compile_s = lambda m: m['lower_s'] + m['compile_s']
  # A trainer-length run, computed from the medians (not measured).
  long_run = lambda m: compile_s(m) + TRAINER_STEPS * m['median_step_s']
  above_base = lambda m: m['peak_rss_mib'] - m['base_rss_mib']
  return {
    'throughput_excluding_compile': (
      adapters * one['median_step_s'] / many['median_step_s']
    ),
    'throughput_including_compile': adapters * one['run_s'] / many['run_s'],
    'throughput_including_compile_trainer_steps': (
      adapters * long_run(one) / long_run(many)
    ),
    'peak_rss': many['peak_rss_mib'] / one['peak_rss_mib'],
    # None where the one run's peak did not rise above its base (--tiny).
    'rss_above_base': (
      above_base(many) / above_base(one) if above_base(one) > 0 else None
    ),
    'compiled_temp': many['temp_bytes'] / one['temp_bytes'],
    'flops': many['flops'] / one['flops'] if one['flops'] else None,
    'compile': compile_s(many) / compile_s(one),
  }


def table(one: dict, groups: dict[str, dict], adapters: int) -> str:
  mib = lambda b: f'{b / 2**20:.1f}'
  head = (
    '| mode | lower + compile s | step ms | adapter-steps/s | run s (incl. compile) '
    '| peak RSS MiB | peak − base MiB | XLA temp MiB | XLA argument MiB '
    '| GFLOP/step | GFLOP/s |'
  )
  lines = [head, '|' + '---|' * 11]
  rows = [('one', one, 1)]
  rows += [(f'{mode} (N={adapters})', m, adapters) for mode, m in groups.items()]
  for name, m, n in rows:
    flops = m['flops']
    cells = [
      name,
      f'{m["lower_s"] + m["compile_s"]:.1f}',
      f'{1000 * m["median_step_s"]:.1f}',
      f'{n / m["median_step_s"]:.2f}',
      f'{m["run_s"]:.1f}',
      f'{m["peak_rss_mib"]:.0f}',
      f'{m["peak_rss_mib"] - m["base_rss_mib"]:.0f}',
      mib(m['temp_bytes']),
      mib(m['argument_bytes']),
      '–' if flops is None else f'{flops / 1e9:.2f}',
      '–' if flops is None else f'{flops / 1e9 / m["median_step_s"]:.1f}',
    ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def fixed(value: float | None) -> str:
  """``value`` with two decimals, or ``–`` for None."""
  return '–' if value is None else f'{value:.2f}'


def summary(mode: str, r: dict, adapters: int, steps: int) -> list[str]:
  """The ratios of one group mode against the goal, as Markdown lines."""
  met = r['throughput_excluding_compile'] >= 4 and r['peak_rss'] <= 2
  return [
    f'`{mode}`: N = {adapters} adapters trained together against {adapters} '
    f'sequential one-adapter runs (each paying its own compile, as {adapters} '
    'trainer runs do):',
    '',
    f'- throughput, compile excluded: **{r["throughput_excluding_compile"]:.2f}×** '
    f'({adapters} × one step time / many step time)',
    f'- throughput, compile included, {steps} steps: '
    f'**{r["throughput_including_compile"]:.2f}×** ({adapters} × one run / many '
    f'run, both measured); computed from the medians for a {TRAINER_STEPS}-step '
    f'run: {r["throughput_including_compile_trainer_steps"]:.2f}×',
    f'- peak RSS: **{r["peak_rss"]:.2f}×** one run (above the process base before '
    f'compiling: {fixed(r["rss_above_base"])}×); XLA temp buffers of the compiled '
    f'step: {r["compiled_temp"]:.2f}×',
    f'- goal ≥ 4× throughput (compile excluded) at ≤ 2× peak RSS: '
    f'{"met" if met else "not met"}',
  ]


def where_the_time_goes(
  mode: str, one: dict, many: dict, r: dict, adapters: int, steps
) -> str:
  """One paragraph from the medians only."""
  step_ratio = many['median_step_s'] / one['median_step_s']
  counted = ', of one pass, × N' if mode == 'passes' else ''
  text = (
    f'Where the time goes (`{mode}`): its step takes {step_ratio:.2f}× the one step '
    f'({1000 * many["median_step_s"]:.0f} against '
    f'{1000 * one["median_step_s"]:.0f} ms)'
  )
  if r['flops']:
    text += (
      f' for {r["flops"]:.2f}× its FLOPs (XLA cost analysis{counted}; '
      f'{adapters}× would mean no work shared), so it runs at '
      f'{r["flops"] / step_ratio:.2f}× the FLOP/s of the one step'
    )
  compile_share = lambda m: (m['lower_s'] + m['compile_s']) / m['run_s']
  return text + (
    f'. Lower + compile is {100 * compile_share(one):.0f}% of a {steps}-step '
    f'one-adapter run and {100 * compile_share(many):.0f}% of the {steps}-step '
    f'{mode} run (its compile takes {r["compile"]:.2f}× the one). Building '
    f'the task and the states takes {one["setup_s"]:.1f} s (one) and '
    f'{many["setup_s"]:.1f} s ({mode}), outside every figure above. During the '
    f'timed steps the process kept the CPUs {100 * one["steps_cpu_busy"]:.0f}% '
    f'(one) and {100 * many["steps_cpu_busy"]:.0f}% ({mode}) busy (user + system '
    'CPU time over wall time × CPUs; below 100%: CPU time left unused or taken '
    f'by other processes), {100 * one["steps_sys_share"]:.0f}% and '
    f'{100 * many["steps_sys_share"]:.0f}% of it in the kernel.'
  )


def write(out: pathlib.Path, samples: list[dict], args) -> str:
  one = medians(samples, 'one')
  groups = {mode: medians(samples, mode) for mode in GROUPS}
  r = {mode: ratios(one, m, args.adapters) for mode, m in groups.items()}
  environment = samples[0]['environment']
  settings = {
    'adapters': args.adapters,
    'steps': args.steps,
    'repeats': args.repeats,
    'tiny': args.tiny,
    'task': samples[0]['task'],
    'batch': samples[0]['batch'],
    'rules': samples[0]['rules'],
    'config': f'{CONFIG}:method=lora,steps={args.steps}',
    'trainable_per_adapter': samples[0]['trainable_per_adapter'],
  }
  result = {
    'environment': environment,
    'settings': settings,
    'medians': {'one': one, **groups},
    'ratios': {**r, 'trainer_steps': TRAINER_STEPS},
    'samples': samples,
  }
  out.mkdir(parents=True, exist_ok=True)
  (out / 'many_adapters.json').write_text(json.dumps(result, indent=2))
  e = environment
  rules = ', '.join(
    f'`{pattern}`: `{adapter}`' for pattern, adapter in settings['rules']
  )
  note = (
    f'{settings["task"]}, batch {settings["batch"][0]}×{settings["batch"][1]}, '
    f'rules {rules} ({settings["trainable_per_adapter"]:,} trainable '
    f'per adapter), {args.steps} steps, medians of {args.repeats} interleaved '
    f'processes per mode. {e["device"]}, {e["cpu_count"]} CPUs; jax {e["jax"]}, '
    f'flax {e["flax"]}, optax {e["optax"]}; {e["date"]}.'
  )
  smoke = '**Smoke test (`--tiny`): a tiny random BERT, not a result.**'
  text = '\n\n'.join(
    [
      *[smoke] * args.tiny,
      table(one, groups, args.adapters),
      note,
      *[
        '\n'.join(summary(mode, r[mode], args.adapters, args.steps)) for mode in GROUPS
      ],
      *[
        where_the_time_goes(mode, one, groups[mode], r[mode], args.adapters, args.steps)
        for mode in GROUPS
      ],
    ]
  )
  (out / 'many_adapters.md').write_text(text + '\n')
  return text


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--adapters', type=int, default=8)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out', type=pathlib.Path, default=OUT)
  parser.add_argument('--tiny', action='store_true', help='tiny random BERT (tests)')
  parser.add_argument('--child', choices=MODES, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(measure(args.child, args.adapters, args.steps, args.tiny)))
    return
  samples = run_children(args.adapters, args.steps, args.repeats, args.tiny)
  print(write(args.out, samples, args))


if __name__ == '__main__':
  main()
