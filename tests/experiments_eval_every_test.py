"""Periodic evaluations (``eval_every``) and the best-validation evaluation.

The trainer evaluates every ``eval_every`` steps, keeps the evaluations in
its checkpoints' metadata and adds the one with the best validation metric to
the results row; ``compare --at best`` tables those. The checks here recompute
what they can apart from the code under test: an evaluation at step t equals
``task.evaluate`` of the checkpoint saved at t, and the best is the argmax
written out below from the logged lines.
"""

import json
import math
import re

import jax
import numpy as np
import pytest

import peft_jax as pj
from experiments import claims, compare, tasks, train
from experiments.configs import common
from peft_jax import PeftError
from tests.experiments_test import (
  CONFIG,
  build_tiny,
  build_tiny_stopping_at,
  metric_lines,
  synthetic_row,
)

ARGS = 'runlocal,method=lora,steps=4,eval_every=1,checkpoint_every=2'


@pytest.fixture
def tiny_task(monkeypatch):
  monkeypatch.setattr(tasks, 'build', build_tiny)


def config(extra: str = ''):
  return common.load_config(f'{CONFIG}:{ARGS}{extra}')


def logged(workdir, prefix: str, label: str = '') -> dict[int, dict]:
  """``{step: {metric: value}}`` of the ``prefix``_* lines (of ``label``'s
  adapter in a group run)."""
  head = f'{label}/{prefix}_' if label else f'{prefix}_'
  found = {}
  for line in metric_lines(workdir):
    values = {k[len(head) :]: v for k, v in line.items() if k.startswith(head)}
    if values:
      found[line['step']] = values
  return found


def expected_best(evaluations: dict[int, dict], metric: str) -> tuple[int, dict]:
  """The spec: the highest validation metric; the earliest step on a tie."""
  best_step = None
  for step in sorted(evaluations):
    value = evaluations[step][f'validation_{metric}']
    if best_step is None or value > evaluations[best_step][f'validation_{metric}']:
      best_step = step
  return best_step, evaluations[best_step]


def test_each_evaluation_is_of_its_step_and_the_row_holds_the_best(tmp_path, tiny_task):
  workdir = tmp_path / 'run'
  row = train.train_and_evaluate(config(), str(workdir))
  periodic = logged(workdir, 'eval')
  assert sorted(periodic) == [1, 2, 3]  # the final evaluation is after_*
  final = logged(workdir, 'after')
  assert sorted(final) == [4]

  # The evaluation logged at step 2 is of the state checkpointed at step 2.
  run_config = config()
  task = build_tiny(run_config)
  tree = pj.by_rules(list(run_config.adapters))
  manager = pj.checkpoint_manager(str(workdir / 'checkpoints'))
  assert 2 in manager.all_steps()
  params, buffers = jax.jit(tree.init)(jax.random.key(0), task.frozen)
  template = pj.TrainState.create(
    params, buffers, train.make_optimizer(run_config), jax.random.key(0)
  )
  state, metadata = pj.restore_checkpoint(manager, template, 2)
  again = task.evaluate(tree, task.frozen, state.params, state.buffers)
  for name, value in again.items():
    np.testing.assert_allclose(periodic[2][name], value, rtol=1e-6, err_msg=name)
  # Its metadata carries the evaluations up to its step, for a resume.
  assert [e['step'] for e in metadata['evaluations']] == [1, 2]

  step, best = expected_best({**periodic, **final}, 'accuracy')
  assert row['best_step'] == step
  for name, value in best.items():
    assert row[f'best_{name}'] == pytest.approx(value, rel=1e-6), name
  assert row['after_test_accuracy'] == pytest.approx(final[4]['test_accuracy'])


def test_a_resumed_run_keeps_the_evaluations_of_the_killed_one(tmp_path, monkeypatch):
  monkeypatch.setattr(tasks, 'build', build_tiny)
  straight = train.train_and_evaluate(config(), str(tmp_path / 'straight'))
  monkeypatch.setattr(tasks, 'build', build_tiny_stopping_at(3))
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config(), str(tmp_path / 'resumed'))
  monkeypatch.setattr(tasks, 'build', build_tiny)
  resumed = train.train_and_evaluate(config(), str(tmp_path / 'resumed'))
  # Steps 1 and 2 were evaluated by the killed process only.
  assert logged(tmp_path / 'resumed', 'eval') == logged(tmp_path / 'straight', 'eval')
  best = {k: v for k, v in straight.items() if k.startswith('best_')}
  assert best and {k: resumed[k] for k in best} == best


def test_a_group_run_picks_each_adapter_s_best(tmp_path, tiny_task):
  rows = train.train_and_evaluate(config(',seeds=2'), str(tmp_path / 'group'))
  assert len(rows) == 2
  for row in rows:
    label = re.search(r'\[(.*)\]$', row['name']).group(1)
    periodic = logged(tmp_path / 'group', 'eval', label)
    final = logged(tmp_path / 'group', 'after', label)
    assert sorted(periodic) == [1, 2, 3] and sorted(final) == [4]
    step, best = expected_best({**periodic, **final}, 'accuracy')
    assert row['best_step'] == step
    assert row['best_test_accuracy'] == pytest.approx(best['test_accuracy'])


def test_no_periodic_evaluations_without_eval_every(tmp_path, tiny_task):
  row = train.train_and_evaluate(
    common.load_config(f'{CONFIG}:runlocal,method=lora'), str(tmp_path / 'run')
  )
  assert not any(k.startswith('best_') for k in row)
  assert logged(tmp_path / 'run', 'eval') == {}


def test_best_evaluation_ties_nans_and_a_missing_validation_split():
  at = lambda v, t: {'validation_score': v, 'test_score': t}
  periodic = [(10, at(0.5, 0.1)), (20, at(float('nan'), 0.9)), (30, at(0.5, 0.2))]
  best = train.best_evaluation(periodic, 40, at(0.4, 0.3), 'score')
  assert best == {'best_step': 10, 'best_validation_score': 0.5, 'best_test_score': 0.1}
  nan = at(math.nan, 0.0)
  assert train.best_evaluation([(1, nan)], 2, nan, 'score')['best_step'] == 1
  with pytest.raises(PeftError, match='no validation split'):
    train.best_evaluation([(1, {'test_score': 0.1})], 2, {'test_score': 0.2}, 'score')


def test_bad_eval_every_is_one_line_before_anything_is_written(tmp_path, capsys):
  workdir = tmp_path / 'never'
  spec = f'{CONFIG}:runlocal,eval_every=-1'
  assert train.main(['--config', spec, '--workdir', str(workdir)]) == 2
  error = capsys.readouterr().err
  assert 'eval_every=-1 should be an int >= 0' in error and error.count('\n') == 1
  assert not workdir.exists()


def test_eval_every_needs_a_validation_split():
  held_out_nothing = config()
  held_out_nothing.data.heldout = 0.0  # as glue.py:heldout=0 gives
  with pytest.raises(PeftError, match='heldout=0 leaves no validation split'):
    common.check_config(held_out_nothing)


def test_compare_at_best_tables_the_best_evaluations(tmp_path):
  for method in ('lora', 'ssb'):
    for seed in (0, 1):
      row = synthetic_row(method, seed)
      row.update(
        best_step=60 + seed,
        best_validation_accuracy=0.9,
        best_test_accuracy=0.8 + seed / 100,
      )
      (tmp_path / f'{method}_{seed}').mkdir()
      (tmp_path / f'{method}_{seed}' / 'results.json').write_text(json.dumps(row))
  final = compare.write_comparison(tmp_path)
  assert '| 0.710 |' in final and '0.810' not in final
  best = compare.write_comparison(tmp_path, 'best')
  assert '| 0.810 |' in best and '| 0.710 |' not in best
  assert "each run's evaluation with the best validation acc (at steps 60, 61)" in best
  assert '(at steps 60, 61)' in (tmp_path / 'seeds.md').read_text()
  assert 'at steps 60, 61' in claims.write_claims(tmp_path, 'best')
  assert compare.main([str(tmp_path), '--at', 'best']) == 0

  (tmp_path / 'lora_0' / 'results.json').write_text(
    json.dumps(synthetic_row('lora', 0))
  )
  with pytest.raises(PeftError, match=r'no periodic evaluations.*eval_every > 0'):
    compare.load_rows(tmp_path, 'best')
