"""Comparison table (Markdown) and plot (PNG) from results rows.

  python -m experiments.compare runs/rt_sweep [--at final|best]

reads ``*/results.json`` under the directory and writes ``comparison.md``
and ``comparison.png`` (test accuracy against trainable parameters) there;
with several seeds per method also ``seeds.md``, ``tradeoff.png``,
``spread.png``, ``stability.png`` and ``sparsity.png`` (``experiments.seeds``).

Only runs of one setting (``SETTING``: the same task, model, data set,
steps, batch size and evaluation limit) share a table: a directory with
several settings gets one table per setting in ``comparison.md``, each
headed by what its runs are ("3 runs of minilm on rotten_tomatoes, 500
steps of batch 32, ...") and each with its own figures, numbered
(``comparison_1.png``, ``seeds_1.md``, ...).

``--at final`` (the default) tables each run's final adapter (``after_*``);
``--at best`` its evaluation with the best validation metric, of those every
``eval_every`` steps and the final one (``best_*``, ``train.best_evaluation``),
for every row: the "after" columns then hold that evaluation's values.
"""

import argparse
import json
import pathlib
import sys
import textwrap
from collections.abc import Callable

import matplotlib

matplotlib.use('Agg')  # Files only; no display needed.
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from experiments import headline, seeds
from peft_jax import PeftError

# What makes runs comparable: runs that differ in any of these results-row
# fields are tabled apart (a field a row lacks, written before the field
# existed, counts as its own value).
SETTING = ('task', 'model', 'dataset', 'steps', 'batch_size', 'eval_limit')
# Which evaluation of each run the tables hold (``--at``).
AT = ('final', 'best')

# (title, the cell of a row); ``{m}`` in a title is the headline metric's name.
COLUMNS = (
  ('method', lambda r: r['method']),
  ('trainable', lambda r: f'{r["trainable_params"]:,}'),
  ('% of model', lambda r: f'{r["trainable_percent"]:.3f}'),
  ('val {m} before', lambda r: f'{headline.value(r, "validation", "before"):.3f}'),
  ('val {m} after', lambda r: f'{headline.value(r, "validation"):.3f}'),
  ('test {m} after', lambda r: f'{headline.value(r):.3f}'),
  # None: the run resumed from its last checkpoint and timed no step.
  (
    'ms/step',
    lambda r: '–' if r.get('ms_per_step') is None else f'{r["ms_per_step"]:.0f}',
  ),
  # XLA's memory of one train step (train.step_memory_mib); older rows lack it.
  (
    'step MiB',
    lambda r: f'{r["step_memory_mib"]:.0f}' if 'step_memory_mib' in r else '–',
  ),
)


def load_rows(directory: pathlib.Path, at: str = 'final') -> list[dict]:
  """Every row of the ``results.json`` files under ``directory`` (a run's
  row, or the list of rows of adapters trained together:
  ``experiments.train_many``), fewest trainable params first; ``at='best'``
  puts each row's best-validation evaluation in its ``after_*`` fields
  (``at_best``).

  Raises:
    PeftError: for a missing directory, one with no results, or a results
      file that is neither a row nor a list of rows (named); with
      ``at='best'``, a row trained without periodic evaluations.
  """
  if at not in AT:
    raise PeftError(f'--at {at!r}: expected one of {", ".join(AT)}')
  if not directory.is_dir():
    raise PeftError(f'{directory} is not a directory of runs (*/results.json)')
  found = []
  for path in sorted(directory.glob('*/results.json')):
    try:
      rows = json.loads(path.read_text())
    except ValueError:
      rows = None
    rows = [rows] if isinstance(rows, dict) else rows
    if not rows or not all(
      isinstance(r, dict) and 'trainable_params' in r for r in rows
    ):
      raise PeftError(f'{path} is not a results row or list of rows (rerun that run)')
    found.extend(at_best(r, path) if at == 'best' else r for r in rows)
  if not found:
    raise PeftError(f'no */results.json under {directory}: no run has finished')
  return sorted(found, key=lambda r: r['trainable_params'])


def at_best(row: dict, path: pathlib.Path) -> dict:
  """``row`` with its ``best_<k>`` values as ``after_<k>`` and
  ``evaluated_at`` the step they are from."""
  if 'best_step' not in row:
    raise PeftError(
      f'{path}: run {row.get("name")!r} (seed {row.get("seed")}) has no '
      'periodic evaluations to choose from; train with eval_every > 0, or '
      'table the final adapters (--at final)'
    )
  best = {
    f'after_{k[5:]}': v
    for k, v in row.items()
    if k.startswith('best_') and k != 'best_step'
  }
  return {**row, **best, 'evaluated_at': row['best_step']}


def by_setting(rows: list[dict]) -> list[list[dict]]:
  """``rows`` split by their ``SETTING`` fields, in order of first
  appearance, each part in the order given."""
  parts = {}
  for row in rows:
    parts.setdefault(tuple(row.get(k, '?') for k in SETTING), []).append(row)
  return list(parts.values())


def _seeds(rows: list[dict]) -> list:
  """The rows' distinct seeds, sorted (rows written before seeds were
  recorded have none)."""
  return sorted({r['seed'] for r in rows if 'seed' in r})


def _plural(count: int, word: str) -> str:
  return f'{count} {word}{"s" * (count != 1)}'


def describe(rows: list[dict]) -> str:
  """What the runs of one setting are, e.g. ``'3 runs of minilm on
  rotten_tomatoes, 500 steps of batch 32, every evaluation example, seeds
  0, 1, 2'``."""
  first, found = rows[0], _seeds(rows)
  limit = first.get('eval_limit', '?')
  if limit is None:
    evaluated = 'every evaluation example'
  elif limit == '?':
    evaluated = 'evaluation limit not recorded'
  else:
    evaluated = f'the first {limit} examples of each evaluation split'
  seeds_text = 'seed' + 's' * (len(found) != 1) + ' ' + ', '.join(map(str, found))
  return (
    f'{_plural(len(rows), "run")} of {first.get("model", "?")} on '
    f'{first.get("dataset", "?")}, {first["steps"]} steps of batch '
    f'{first["batch_size"]}, {evaluated}, '
    f'{seeds_text if found else "seeds not recorded"}'
  )


def title(rows: list[dict]) -> str:
  """A plot title for the runs of one setting: model, data, steps, seeds."""
  first, found = rows[0], _seeds(rows)
  return (
    f'{first.get("model", "?")} on {first.get("dataset", "?")}: '
    f'{first["steps"]} steps, '
    f'{_plural(len(found), "seed") if found else "seeds not recorded"}'
  )


def markdown_table(results: list[dict]) -> str:
  """One Markdown row per run, plus where and when it was measured."""
  name = headline.label(results)
  header = '| ' + ' | '.join(head.format(m=name) for head, _ in COLUMNS) + ' |'
  rule = '|' + '|'.join('---' for _ in COLUMNS) + '|'
  body = ['| ' + ' | '.join(cell(r) for _, cell in COLUMNS) + ' |' for r in results]
  first = results[0]
  machines = sorted({f'{r["device"]} ({r["cpu_count"]} CPUs)' for r in results})
  footer = (
    f'\n{first["steps"]} steps, batch {first["batch_size"]}; measured on '
    f'{", ".join(machines)}, jax {", ".join(sorted({r["jax"] for r in results}))}, '
    f'{headline.dates(results)}.'
  )
  note = headline.selection_note(results)
  footer += f'\n{note}' if note else ''
  return '\n'.join([header, rule, *body]) + '\n' + footer + '\n'


def figure(results: list[dict]) -> Figure:
  """Test metric against trainable parameters (log scale) for the runs of
  one setting: a point a run, each method (group) named once at its mean,
  the mean before training as a line, and ``title`` on top."""
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  for name, rows in seeds.groups(results).items():
    x = [r['trainable_params'] for r in rows]
    y = [100 * headline.value(r) for r in rows]
    ax.scatter(x, y)
    ax.annotate(
      name, (np.mean(x), np.mean(y)), textcoords='offset points', xytext=(5, 4)
    )
  before = 100 * np.mean([headline.value(r, when='before') for r in results])
  ax.axhline(
    before, color='grey', linestyle=':', label=f'before training ({before:.1f}%)'
  )
  ax.set_xscale('log')
  ax.set_xlabel('trainable parameters')
  ax.set_ylabel(f'test {headline.label(results)} (%)')
  ax.set_title(textwrap.fill(title(results), 60))
  ax.legend(loc='lower right')
  fig.tight_layout()
  return fig


def plot(results: list[dict], path: pathlib.Path) -> None:
  """Saves ``figure(results)`` to ``path``, method names never clipped."""
  fig = figure(results)
  fig.savefig(path, bbox_inches='tight')  # The canvas grows to every label.
  plt.close(fig)


def write_comparison(directory: pathlib.Path, at: str = 'final') -> str:
  """Writes ``comparison.md`` (a table per setting, ``by_setting``), each
  setting's plot and its seed summary (``seeds.write_seed_summary``) of the
  rows ``at`` (``load_rows``); returns the tables, then the summaries."""
  results = load_rows(directory, at)
  settings = by_setting(results)
  tables, summaries = [], []
  for number, rows in enumerate(settings, 1):
    suffix = f'_{number}' if len(settings) > 1 else ''
    plot(rows, directory / f'comparison{suffix}.png')
    tables.append(
      f'{describe(rows)} (comparison{suffix}.png)\n\n{markdown_table(rows)}'
    )
    summary = seeds.write_seed_summary(rows, directory, title(rows), suffix)
    if summary:
      summaries.append(f'{describe(rows)} (seeds{suffix}.md)\n\n{summary}')
  text = '\n'.join(tables)
  (directory / 'comparison.md').write_text(text)
  return '\n'.join([text, *summaries])


def directory_main(
  write: Callable[[pathlib.Path, str], str], doc: str, argv=None
) -> int:
  """A command on one directory of runs: prints ``write(directory, at)``;
  returns the exit status (2 after a one-line ``error: ...``)."""
  parser = argparse.ArgumentParser(description=doc.split('\n')[0])
  parser.add_argument('directory', type=pathlib.Path)
  parser.add_argument(
    '--at',
    choices=AT,
    default='final',
    help="each run's final adapter, or its best-validation evaluation",
  )
  args = parser.parse_args(argv)
  try:
    print(write(args.directory, args.at))
  except PeftError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


def main(argv=None) -> int:
  """Prints the comparison (``directory_main``)."""
  return directory_main(write_comparison, __doc__, argv)


if __name__ == '__main__':
  sys.exit(main())
