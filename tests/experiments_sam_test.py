"""The SAM paper's protocol (experiments/configs/sam.py): selection in the
trainer, seeds, the mean ± std table and its figures, on the tiny task."""

import json

import jax
import numpy as np
import pytest

import peft_jax as pj
from experiments import compare, seeds, selection, sweep, tasks, train
from experiments.configs import common, sam
from tests.experiments_test import HEAD, build_tiny

CONFIG = 'experiments/configs/sam.py'


@pytest.fixture
def tiny_task(monkeypatch):
  monkeypatch.setattr(tasks, 'build', build_tiny)


def encoder_budget(p: float) -> int:
  """Σ ⌊p·size⌋ over the tiny BERT's embedding and encoder leaves (per_leaf)."""
  task = build_tiny(common.load_config(f'{CONFIG}:runlocal'))
  sizes = [
    int(np.size(leaf))
    for name, leaf in pj._src.paths.named_leaves(task.frozen['bert'])
    if name.startswith(('embeddings/', 'encoder/'))
  ]
  return sum(int(np.floor(p * n + 1e-9)) for n in sizes)


# The word embeddings are selected too (as in the released code); their
# lookup is a gather, which the factored path computes in weight space.
FALLBACK = 'ignore::peft_jax.FactoredFallbackWarning'


def check_sam_row(row, budget):
  assert (row['group'], row['trainable_params']) == ('sam', HEAD + budget)
  # ‖θ − θ0‖₀ of the merged model: at most the selected entries and the head.
  assert row['changed_params'] <= HEAD + budget
  assert row['selection']['scorer'] == 'sam'


@pytest.mark.filterwarnings(FALLBACK)
@pytest.mark.slow
def test_sam_run_trains_exactly_the_selected_entries(tmp_path, tiny_task):
  """One seed's run of the sweep below, through the trainer."""
  config = common.load_config(f'{CONFIG}:runlocal,p=0.1,seeds=2,method=sam,seed=0')
  workdir = tmp_path / 'sam_rotten_tomatoes_sam_p0.1_seed0'
  assert config.name == workdir.name
  check_sam_row(train.train_and_evaluate(config, str(workdir)), encoder_budget(0.1))
  described = (workdir / 'describe.txt').read_text()
  assert 'sparse(k=' in described and 'changed' in described.splitlines()[0]


# The sweep's two seeds are two runs of the fast test above (each run costs
# seconds of compiles); the seed table and figure of given rows are tested
# below on hand-made rows.
@pytest.mark.slow
@pytest.mark.filterwarnings(FALLBACK)
def test_sam_runs_train_exactly_the_selected_entries(tmp_path, tiny_task):
  # The second seed's programs are the first's: loaded, not compiled again.
  table = sweep.run_sweep(
    f'{CONFIG}:runlocal,p=0.1,seeds=2', str(tmp_path), only={'sam'}
  )
  budget = encoder_budget(0.1)
  rows = [json.loads(p.read_text()) for p in tmp_path.glob('*/results.json')]
  assert len(rows) == 2
  for row in rows:
    check_sam_row(row, budget)
  assert (tmp_path / 'stability.png').stat().st_size > 10_000
  summary = (tmp_path / 'seeds.md').read_text()
  assert summary in table and '| sam | 2 |' in summary
  described = (tmp_path / 'sam_rotten_tomatoes_sam_p0.1_seed0/describe.txt').read_text()
  assert 'sparse(k=' in described and 'changed' in described.splitlines()[0]


def selected_rules(arg: str):
  config = common.load_config(f'{CONFIG}:runlocal,{arg}')
  return selection.rules_for(config, build_tiny(config))


def trainable(rules) -> int:
  task = build_tiny(common.load_config(f'{CONFIG}:runlocal'))
  params, _ = jax.eval_shape(pj.by_rules(rules).init, jax.random.key(0), task.frozen)
  return pj.count(params)


# The fast suite checks one scorer of each kind (a score-free and a
# gradient-based one); `make test` all four.
@pytest.mark.parametrize(
  'method',
  [
    'magnitude',
    'fisher',
    pytest.param('random', marks=pytest.mark.slow),
    pytest.param('lt_sft', marks=pytest.mark.slow),
  ],
)
def test_every_scorer_selects_the_per_leaf_budget(method):
  rules = selected_rules(f'method={method},p=0.05')
  assert trainable(rules) == HEAD + encoder_budget(0.05)
  assert rules[-1] == ('classifier/(kernel|bias)', 'full()')  # The head stays dense.


def test_random_masks_differ_by_seed_and_global_scope_takes_floor_p_m():
  task = build_tiny(common.load_config(f'{CONFIG}:runlocal'))
  gaps = [
    jax.tree.leaves(pj.by_rules(rules).init(jax.random.key(0), task.frozen)[1])
    for rules in (selected_rules(f'method=random,p=0.1,seed={s}') for s in (0, 1))
  ]
  assert not all(np.array_equal(a, b) for a, b in zip(*gaps, strict=True))
  rules = selected_rules('method=sam,p=0.1,scope=global')
  m = sum(
    int(np.size(leaf))
    for name, leaf in pj._src.paths.named_leaves(task.frozen['bert'])
    if name.startswith(('embeddings/', 'encoder/'))
  )
  assert trainable(rules) == HEAD + int(np.floor(0.1 * m))


def test_sweep_entries_and_errors():
  table = sam.sweep('seeds=2')
  assert table == [f'method={m},seed={s}' for m in sam.TABLE for s in (0, 1)]
  assert len(sam.TABLE) == 9 and 'sam' in sam.TABLE and 'mixout' in sam.TABLE
  sparsity = sam.sweep('study=sparsity,seeds=3')
  assert len(sparsity) == len(sam.SPARSITIES) * 3
  assert sparsity[0] == 'method=sam,p=0.0005,seed=0'
  assert sparsity[len(sam.SPARSITIES)] == 'method=sam,p=0.0005,seed=1'  # seed-major
  with pytest.raises(pj.PeftError, match="study='tables'"):
    sam.sweep('study=tables')
  config = common.load_config(f'{CONFIG}:method=sam,study=sparsity,p=0.02,seed=3')
  assert config.group == 'sam p=0.02' and config.name.endswith('p0.02_seed3')
  with pytest.raises(pj.PeftError, match='checkpoint= is required'):
    common.load_config(f'{CONFIG}:task=rte,method=sam')


@pytest.mark.parametrize('method', sorted(sam.METHODS))
def test_every_method_config_builds(method):
  config = common.load_config(f'{CONFIG}:method={method},p=0.01')
  pj.by_rules(config.adapters)  # Specs resolve; selective rules come later.
  assert (config.selection is not None) == (method in sam.SELECTED)
  assert config.adapters[0] == ('classifier/(kernel|bias)', 'full()')


def row(group, acc, p=None):
  return {
    'method': group.split()[0],
    'group': group,
    'after_test_accuracy': acc,
    'after_validation_accuracy': acc / 2,
    'trainable_params': 10,
    'changed_params': 7,
    'ms_per_step': 5.0,
    'steps': 3,
    'batch_size': 8,
    'device': 'cpu',
    'cpu_count': '2',
    'jax': 'x',
    'date': 'd',
  }


def test_seed_table_is_mean_and_sample_std_in_percent(tmp_path):
  accs = [0.8, 0.9, 0.7]
  rows = [row('sam', a) for a in accs] + [row('full', 0.6)]
  table = seeds.write_seed_summary(rows, tmp_path)
  line = next(x for x in table.splitlines() if x.startswith('| sam |'))
  mean, std = 100 * np.mean(accs), 100 * np.std(accs, ddof=1)  # 80.00, 10.00
  sem = std / np.sqrt(3)  # 5.77
  # seeds, trainable, ‰ (not recorded), changed, rank (not recorded), val, test
  assert line.startswith('| sam | 3 | 10 | – | 7 | – |')
  assert f'| {mean:.2f} ± {std:.2f} | {sem:.2f} | 5 | – |' in line
  assert '| full | 1 | 10 | – | 7 | – | 30.00 ± 0.00 | 60.00 ± 0.00 | 0.00 |' in table
  for figure in ('stability', 'tradeoff', 'spread'):
    assert (tmp_path / f'{figure}.png').stat().st_size > 10_000, figure
  assert not (tmp_path / 'sparsity.png').exists()
  sweep_rows = [row(f'sam p={p}', a) for p in (0.01, 0.1) for a in (0.7, 0.8)]
  seeds.write_seed_summary(sweep_rows, tmp_path)
  assert (tmp_path / 'sparsity.png').stat().st_size > 10_000
  assert seeds.write_seed_summary([row('sam', 0.5)], tmp_path / 'none') is None


def test_seed_table_shows_the_three_counts_permille_and_memory(tmp_path):
  rows = [
    {**row('lora', a), 'trainable_percent': 0.328, 'update_rank': 8}
    | {'step_memory_mib': m, 'ms_per_step': t}
    for a, m, t in [(0.8, 700.0, 10.0), (0.9, 720.0, 30.0), (0.85, 710.0, 20.0)]
  ]
  table = seeds.write_seed_summary(rows, tmp_path)
  line = next(x for x in table.splitlines() if x.startswith('| lora |'))
  # 0.328 % of the model is 3.28 per mille; medians of the time and memory.
  assert line.startswith('| lora | 3 | 10 | 3.28 | 7 | 8 |')
  assert line.endswith('| 20 | 710 |')


def test_score_rows_without_accuracy_are_tabled_by_their_score(tmp_path):
  """STS-B rows carry a correlation ``score`` and no accuracy at all."""
  stsb = []
  for group, score in [('sam', 0.9), ('sam', 0.8), ('full', 0.5)]:
    r = row(group, 0.0)
    del r['after_test_accuracy'], r['after_validation_accuracy']
    r.update(
      metric='score',
      name='sam_stsb_x',
      after_test_score=score,
      after_validation_score=score / 2,
      before_validation_score=0.1,
      before_test_score=0.1,
      trainable_percent=1.0,
    )
    stsb.append(r)
  table = seeds.write_seed_summary(stsb, tmp_path)
  assert 'test score (%)' in table
  assert '| sam | 2 | 10 | 10 | 7 | – | 42.50 ± 3.54 | 85.00 ± 7.07 | 5.00 |' in table
  assert (tmp_path / 'stability.png').stat().st_size > 10_000
  comparison = compare.markdown_table(stsb)
  assert 'test score after' in comparison and '| 0.900 |' in comparison
  compare.plot(stsb, tmp_path / 'comparison.png')
  assert (tmp_path / 'comparison.png').stat().st_size > 10_000
