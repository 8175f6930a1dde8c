"""Several seeds per method: the mean ± std table and its figures.

Rows (``results.json``) are grouped by ``row['group']`` (the config's
``group``; the method when absent). ``experiments.compare`` calls
``write_seed_summary`` when some group has more than one run and writes
``seeds.md`` (the test and validation headline metric, ``headline.value``:
accuracy, or a GLUE task's score; mean ± sample std over seeds, the test
mean's standard error, the guide's three parameter counts, step time and
memory), ``tradeoff.png`` (mean ± std against trainable parameters),
``spread.png`` (every seed's result per group), ``stability.png`` (the std
per group, the paper's stability view) and, for
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


def _permille(rows: list[dict]) -> str:
  """Trainable parameters per mille of the model (the See Further tables'
  unit), '–' for rows that do not record the share."""
  shares = {
    round(10 * r['trainable_percent'], 3) for r in rows if 'trainable_percent' in r
  }
  return '–' if not shares else '/'.join(f'{x:.3g}' for x in sorted(shares))


def _median(rows: list[dict], key: str) -> str:
  """The median of ``key`` over the rows that record it, rounded; '–' if none."""
  values = [r[key] for r in rows if r.get(key) is not None]
  return f'{np.median(values):.0f}' if values else '–'


def seed_table(grouped: dict[str, list[dict]]) -> str:
  """Markdown, one row per group: the guide's three counts (trainable,
  changed, update rank), the headline metric as mean ± std over seeds (in %)
  with the test mean's standard error, and the step's time and memory."""
  metric = _label(grouped)
  lines = [
    f'| method | seeds | trainable | ‰ | changed | rank | val {metric} (%) '
    f'| test {metric} (%) | test sem | ms/step | step MiB |',
    '|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for name, rows in grouped.items():
    test = _percent(rows)
    sem = np.std(test, ddof=1) / np.sqrt(len(test)) if len(test) > 1 else 0.0
    lines.append(
      f'| {name} | {len(rows)} | {_count(rows, "trainable_params")} | '
      f'{_permille(rows)} | {_count(rows, "changed_params")} | '
      f'{_count(rows, "update_rank")} | '
      f'{_cell(rows, "validation")} | {_cell(rows, "test")} | {sem:.2f} | '
      f'{_median(rows, "ms_per_step")} | {_median(rows, "step_memory_mib")} |'
    )
  first = next(iter(grouped.values()))[0]
  when = headline.dates([r for rows in grouped.values() for r in rows])
  lines.append(
    f'\nMean ± sample std over seeds, and the standard error of the test mean '
    f'(std/√n); {first["steps"]} steps, batch {first["batch_size"]}; '
    f'{first["device"]} ({first["cpu_count"]} CPUs), jax {first["jax"]}, {when}. '
    'The guide\'s three counts: "trainable" parameters, "changed" entries '
    '‖θ − θ0‖₀ of the merged model (head included) and the "rank" of its '
    "update ΔW (the largest over the encoder's matrices, head left out), both "
    'measured; – where the method has no weight-space form. ms/step is the '
    'median step time (in a group program, its step over the adapters it '
    'trains), step MiB the XLA memory of the compiled step.'
  )
  note = headline.selection_note([r for rows in grouped.values() for r in rows])
  if note:
    lines.append(f'\n{note}')
  return '\n'.join(lines) + '\n'


def plot_tradeoff(
  grouped: dict[str, list[dict]], path: pathlib.Path, title: str = ''
) -> None:
  """Mean test metric ± std over seeds against trainable parameters (log)."""
  fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
  for name, rows in grouped.items():
    mean, std = mean_std(_percent(rows))
    x = np.mean([r['trainable_params'] for r in rows])
    ax.errorbar(x, mean, yerr=std, marker='o', capsize=3)
    ax.annotate(name, (x, mean), textcoords='offset points', xytext=(4, 3), fontsize=7)
  ax.set_xscale('log')
  ax.set_xlabel('trainable parameters')
  ax.set_ylabel(f'test {_label(grouped)} (%), mean ± std over seeds')
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, bbox_inches='tight')
  plt.close(fig)


def plot_spread(
  grouped: dict[str, list[dict]], path: pathlib.Path, title: str = ''
) -> None:
  """Every seed's test metric per group (a dot each, the mean a bar), groups
  in order of their mean."""
  order = sorted(grouped, key=lambda n: mean_std(_percent(grouped[n]))[0])
  fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(order) + 2), 4.5), dpi=120)
  for x, name in enumerate(order):
    values = _percent(grouped[name])
    ax.scatter(np.full(len(values), x), values, s=12, alpha=0.7, color='tab:blue')
    ax.plot([x - 0.3, x + 0.3], [np.mean(values)] * 2, color='black')
  ax.set_xticks(range(len(order)), order, rotation=60, ha='right', fontsize=8)
  ax.set_ylabel(f'test {_label(grouped)} (%), one dot per seed')
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, bbox_inches='tight')
  plt.close(fig)


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
  plot_tradeoff(grouped, directory / f'tradeoff{suffix}.png', title)
  plot_spread(grouped, directory / f'spread{suffix}.png', title)
  plot_sparsity(grouped, directory / f'sparsity{suffix}.png', title)
  return table
