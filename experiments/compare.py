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

from experiments import headline, seeds

# (title, the cell of a row); ``{m}`` in a title is the headline metric's name.
COLUMNS = (
  ('method', lambda r: r['method']),
  ('trainable', lambda r: f'{r["trainable_params"]:,}'),
  ('% of model', lambda r: f'{r["trainable_percent"]:.3f}'),
  ('val {m} before', lambda r: f'{headline.value(r, "validation", "before"):.3f}'),
  ('val {m} after', lambda r: f'{headline.value(r, "validation"):.3f}'),
  ('test {m} after', lambda r: f'{headline.value(r):.3f}'),
  ('ms/step', lambda r: f'{r["ms_per_step"]:.0f}'),
  # XLA's memory of one train step (train.step_memory_mib); older rows lack it.
  (
    'step MiB',
    lambda r: f'{r["step_memory_mib"]:.0f}' if 'step_memory_mib' in r else '–',
  ),
)


def load_rows(directory: pathlib.Path) -> list[dict]:
  """Every ``results.json`` under ``directory``, fewest trainable params first."""
  found = [json.loads(p.read_text()) for p in sorted(directory.glob('*/results.json'))]
  return sorted(found, key=lambda r: r['trainable_params'])


def markdown_table(results: list[dict]) -> str:
  """One Markdown row per run, plus where and when it was measured."""
  name = headline.label(results)
  header = '| ' + ' | '.join(title.format(m=name) for title, _ in COLUMNS) + ' |'
  rule = '|' + '|'.join('---' for _ in COLUMNS) + '|'
  body = ['| ' + ' | '.join(cell(r) for _, cell in COLUMNS) + ' |' for r in results]
  first = results[0]
  footer = (
    f'\n{first["steps"]} steps, batch {first["batch_size"]}; measured on '
    f'{first["device"]} ({first["cpu_count"]} CPUs), jax {first["jax"]}, '
    f'{headline.dates(results)}.'
  )
  return '\n'.join([header, rule, *body]) + '\n' + footer + '\n'


def plot(results: list[dict], path: pathlib.Path) -> None:
  """Test metric against trainable parameters (log scale), one point a run."""
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for row in results:
    point = (row['trainable_params'], 100 * headline.value(row))
    ax.scatter(*point)
    ax.annotate(row['method'], point, textcoords='offset points', xytext=(5, 4))
  before = 100 * headline.value(results[0], when='before')
  ax.axhline(
    before, color='grey', linestyle=':', label=f'untrained head ({before:.1f}%)'
  )
  ax.set_xscale('log')
  ax.set_xlabel('trainable parameters')
  ax.set_ylabel(f'test {headline.label(results)} (%)')
  ax.set_title(results[0]['name'].rsplit('_', 1)[0])
  ax.legend(loc='lower right')
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def write_comparison(directory: pathlib.Path) -> str:
  """Writes ``comparison.md`` and ``comparison.png``; returns the table."""
  results = load_rows(directory)
  if not results:
    raise FileNotFoundError(f'no */results.json under {directory}')
  table = markdown_table(results)
  (directory / 'comparison.md').write_text(table)
  plot(results, directory / 'comparison.png')
  summary = seeds.write_seed_summary(results, directory)
  return table if summary is None else f'{table}\n{summary}'


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('directory', type=pathlib.Path)
  print(write_comparison(parser.parse_args(argv).directory))


if __name__ == '__main__':
  main()
