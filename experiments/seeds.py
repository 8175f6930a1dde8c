"""Several seeds per method: mean ± std table, stability and sparsity figures.

Rows (``results.json``) are grouped by ``row['group']`` (the config's
``group``; the method when absent). ``experiments.compare`` calls
``write_seed_summary`` when some group has more than one run and writes
``seeds.md`` (the test and validation headline metric, ``headline.value``:
accuracy, or a GLUE task's score; mean ± sample std over seeds),
``stability.png`` (the std per group, the paper's stability view) and, for
groups that differ only in sparsity (``'sam p=0.005'``), ``sparsity.png``
(mean ± std against ``p``, the paper's Figure 3); the rows of each of
compare's settings (``compare.by_setting``) apart, with the setting's
number as a suffix when there are several.
"""

import pathlib
import re
from collections import defaultdict

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np

from experiments import headline

SPARSITY_GROUP = re.compile(r'(?P<method>\S+) p=(?P<p>[0-9.e-]+)')


def groups(rows: list[dict]) -> dict[str, list[dict]]:
  """``{group: rows}`` in first-seen order."""
  grouped = defaultdict(list)
  for row in rows:
    grouped[row.get('group', row['method'])].append(row)
  return dict(grouped)


def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (``ddof=1``; 0 for one value)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def _percent(rows: list[dict], split: str = 'test') -> list[float]:
  return [100 * headline.value(r, split) for r in rows]


def _label(grouped: dict[str, list[dict]]) -> str:
  return headline.label([r for rows in grouped.values() for r in rows])


def _cell(rows: list[dict], split: str) -> str:
  mean, std = mean_std(_percent(rows, split))
  return f'{mean:.2f} ± {std:.2f}'


def _count(rows: list[dict], key: str) -> str:
  values = {r.get(key) for r in rows}
  if None in values:
    return '–'
  return f'{min(values):,}' if len(values) == 1 else f'{min(values):,}–{max(values):,}'


def seed_table(grouped: dict[str, list[dict]]) -> str:
  """Markdown: one row per group, the headline metric as mean ± std (in %)."""
  metric = _label(grouped)
  lines = [
    f'| method | seeds | trainable | changed | val {metric} (%) | test {metric} (%) '
    '| ms/step |',
    '|---|---|---|---|---|---|---|',
  ]
  for name, rows in grouped.items():
    ms = np.median([r['ms_per_step'] for r in rows])
    lines.append(
      f'| {name} | {len(rows)} | {_count(rows, "trainable_params")} | '
      f'{_count(rows, "changed_params")} | '
      f'{_cell(rows, "validation")} | {_cell(rows, "test")} | {ms:.0f} |'
    )
  first = next(iter(grouped.values()))[0]
  when = headline.dates([r for rows in grouped.values() for r in rows])
  lines.append(
    f'\nMean ± sample std over seeds; {first["steps"]} steps, batch '
    f'{first["batch_size"]}; {first["device"]} ({first["cpu_count"]} CPUs), jax '
    f'{first["jax"]}, {when}. '
    '"changed" is ‖θ − θ0‖₀ of the merged '
    'model (head included), measured.'
  )
  return '\n'.join(lines) + '\n'


def plot_stability(
  grouped: dict[str, list[dict]], path: pathlib.Path, title: str = ''
) -> None:
  """Bars: the mean test metric with ±std error bars, and the std alone."""
  names = list(grouped)
  stats = [mean_std(_percent(grouped[n])) for n in names]
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
  x = np.arange(len(names))
  left.bar(x, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3)
  left.set_ylabel(f'test {_label(grouped)} (%)')
  left.set_ylim(min(m - s for m, s in stats) - 2, max(m + s for m, s in stats) + 1)
  right.bar(x, [s for _, s in stats], color='tab:orange')
  right.set_ylabel('std over seeds (points)')
  for ax in (left, right):
    ax.set_xticks(x, names, rotation=45, ha='right')
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, bbox_inches='tight')
  plt.close(fig)


def plot_sparsity(
  grouped: dict[str, list[dict]], path: pathlib.Path, title: str = ''
) -> bool:
  """Mean ± std test metric against ``p`` per method; False if no such group."""
  curves = defaultdict(list)
  for name, rows in grouped.items():
    match = SPARSITY_GROUP.fullmatch(name)
    if match:
      curves[match['method']].append((float(match['p']), *mean_std(_percent(rows))))
  if not curves:
    return False
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for method, points in curves.items():
    p, mean, std = np.array(sorted(points)).T
    ax.errorbar(p, mean, yerr=std, marker='o', capsize=3, label=method)
  ax.set_xscale('log')
  ax.set_xlabel('p (share of encoder entries trained)')
  ax.set_ylabel(f'test {_label(grouped)} (%), mean ± std')
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, bbox_inches='tight')
  plt.close(fig)
  return True


def write_seed_summary(
  rows: list[dict], directory: pathlib.Path, title: str = '', suffix: str = ''
) -> str | None:
  """Writes ``seeds{suffix}.md`` and the figures (titled ``title``) when a
  group has several seeds; returns the table, or None."""
  grouped = groups(rows)
  if all(len(g) == 1 for g in grouped.values()):
    return None
  table = seed_table(grouped)
  (directory / f'seeds{suffix}.md').write_text(table)
  plot_stability(grouped, directory / f'stability{suffix}.png', title)
  plot_sparsity(grouped, directory / f'sparsity{suffix}.png', title)
  return table
