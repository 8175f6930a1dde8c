"""Comparison table (Markdown) and plot (PNG) from results rows.

  python -m experiments.compare runs/rt_sweep

reads ``*/results.json`` under the directory and writes ``comparison.md``
and ``comparison.png`` (test accuracy against trainable parameters) there;
with several seeds per method also ``seeds.md``, ``stability.png`` and
``sparsity.png`` (``experiments.seeds``).
"""

import argparse
import json
import pathlib

import matplotlib

matplotlib.use('Agg')  # Files only; no display needed.
import matplotlib.pyplot as plt

from experiments import seeds

COLUMNS = (
  ('method', 'method', '{}'),
  ('trainable', 'trainable_params', '{:,}'),
  ('% of model', 'trainable_percent', '{:.3f}'),
  ('val acc before', 'before_validation_accuracy', '{:.3f}'),
  ('val acc after', 'after_validation_accuracy', '{:.3f}'),
  ('test acc after', 'after_test_accuracy', '{:.3f}'),
  ('ms/step', 'ms_per_step', '{:.0f}'),
)


def load_rows(directory: pathlib.Path) -> list[dict]:
  """Every ``results.json`` under ``directory``, fewest trainable params first."""
  rows = [json.loads(p.read_text()) for p in sorted(directory.glob('*/results.json'))]
  return sorted(rows, key=lambda r: r['trainable_params'])


def markdown_table(rows: list[dict]) -> str:
  """One Markdown row per run, plus where and when it was measured."""
  header = '| ' + ' | '.join(title for title, _, _ in COLUMNS) + ' |'
  rule = '|' + '|'.join('---' for _ in COLUMNS) + '|'
  body = [
    '| ' + ' | '.join(fmt.format(row[key]) for _, key, fmt in COLUMNS) + ' |'
    for row in rows
  ]
  first = rows[0]
  footer = (
    f'\n{first["steps"]} steps, batch {first["batch_size"]}; measured on '
    f'{first["device"]} ({first["cpu_count"]} CPUs), jax {first["jax"]}, '
    f'{first["date"]}.'
  )
  return '\n'.join([header, rule, *body]) + '\n' + footer + '\n'


def plot(rows: list[dict], path: pathlib.Path) -> None:
  """Test accuracy against trainable parameters (log scale), one point a run."""
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for row in rows:
    ax.scatter(row['trainable_params'], 100 * row['after_test_accuracy'])
    ax.annotate(
      row['method'],
      (row['trainable_params'], 100 * row['after_test_accuracy']),
      textcoords='offset points',
      xytext=(5, 4),
    )
  before = 100 * rows[0]['before_test_accuracy']
  ax.axhline(
    before, color='grey', linestyle=':', label=f'untrained head ({before:.1f}%)'
  )
  ax.set_xscale('log')
  ax.set_xlabel('trainable parameters')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(rows[0]['name'].rsplit('_', 1)[0])
  ax.legend(loc='lower right')
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def write_comparison(directory: pathlib.Path) -> str:
  """Writes ``comparison.md`` and ``comparison.png``; returns the table."""
  rows = load_rows(directory)
  if not rows:
    raise FileNotFoundError(f'no */results.json under {directory}')
  table = markdown_table(rows)
  (directory / 'comparison.md').write_text(table)
  plot(rows, directory / 'comparison.png')
  summary = seeds.write_seed_summary(rows, directory)
  return table if summary is None else f'{table}\n{summary}'


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('directory', type=pathlib.Path)
  print(write_comparison(parser.parse_args(argv).directory))


if __name__ == '__main__':
  main()
