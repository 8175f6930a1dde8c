"""The trainer, configs, sweep and comparison on the real MiniLM and data."""

import json

import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

import peft_jax as pj
from experiments import compare, sweep, tasks, train
from experiments.configs import common, rotten_tomatoes

CONFIG = 'experiments/configs/rotten_tomatoes.py'


def test_parse_arg_types_and_errors():
  arg = common.parse_arg(
    'method=lora,steps=7,runlocal,lr=1', method='ssb', steps=1, lr=0.0, runlocal=False
  )
  assert (arg.method, arg.steps, arg.lr, arg.runlocal) == ('lora', 7, 1.0, True)
  with pytest.raises(pj.PeftError, match="unknown config argument 'stpes'; known: "):
    common.parse_arg('stpes=3', steps=1)
  with pytest.raises(pj.PeftError, match="steps='many' should be a int"):
    common.parse_arg('steps=many', steps=1)


def test_every_method_config_builds_and_its_rules_are_valid():
  # Every registered weight-space method can run (stacked and matrix_view wrap
  # methods for scanned and N-D kernels, which this model does not have).
  assert set(rotten_tomatoes.METHODS) == set(pj.names()) - {'stacked', 'matrix_view'}
  for method in rotten_tomatoes.METHODS:
    config = common.load_config(f'{CONFIG}:method={method}')
    assert config.adapters[0] == ('classifier/(kernel|bias)', 'full()')
    pj.by_rules(config.adapters)  # specs resolve
  with pytest.raises(pj.PeftError, match='does not exist'):
    common.load_config('experiments/configs/nope.py')
  with pytest.raises(ValueError, match="method='nope'"):
    common.load_config(f'{CONFIG}:method=nope')


def test_run_writes_everything_and_refuses_a_different_config(tmp_path, capsys):
  config = common.load_config(f'{CONFIG}:runlocal')
  row = train.train_and_evaluate(config, str(tmp_path))
  for name in ('config.json', 'describe.txt', 'metrics.jsonl', 'adapter.safetensors'):
    assert (tmp_path / name).exists(), name
  assert json.loads((tmp_path / 'results.json').read_text()) == row
  # Head, then SSB on key, value (384 + 384 each) and FFN-in (384 + 1536).
  assert row['trainable_params'] == 384 * 2 + 2 + 6 * (2 * (384 + 384) + 384 + 1536)
  assert 0 <= row['after_test_accuracy'] <= 1 and 'device' in row and 'date' in row
  lines = [
    json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()
  ]
  assert [m['step'] for m in lines if 'loss' in m] == [1, 2, 3]

  # A finished run is reported, not redone.
  assert train.train_and_evaluate(config, str(tmp_path)) == row
  # A different config never overwrites a run.
  other = common.load_config(f'{CONFIG}:runlocal,method=lora')
  with pytest.raises(pj.PeftError, match='holds a run with a different config'):
    train.train_and_evaluate(other, str(tmp_path))
  assert json.loads((tmp_path / 'results.json').read_text()) == row
  assert (
    train.main(
      ['--config', f'{CONFIG}:runlocal,method=lora', '--workdir', str(tmp_path)]
    )
    == 2
  )
  assert 'error: ' in capsys.readouterr().err


def test_interrupted_run_resumes_to_the_same_adapter(tmp_path, monkeypatch):
  config = common.load_config(f'{CONFIG}:runlocal,method=lora')
  train.train_and_evaluate(config, str(tmp_path / 'straight'))

  build = tasks.build

  def build_then_crash_at_step_2(config):
    task = build(config)

    def train_batch(step):
      if step == 2:
        raise KeyboardInterrupt
      return task.train_batch(step)

    return task._replace(train_batch=train_batch)

  monkeypatch.setattr(tasks, 'build', build_then_crash_at_step_2)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert not (tmp_path / 'resumed' / 'results.json').exists()
  monkeypatch.setattr(tasks, 'build', build)
  train.train_and_evaluate(config, str(tmp_path / 'resumed'))

  straight = safetensors_numpy.load_file(str(tmp_path / 'straight/adapter.safetensors'))
  resumed = safetensors_numpy.load_file(str(tmp_path / 'resumed/adapter.safetensors'))
  assert straight.keys() == resumed.keys()
  for name in straight:
    np.testing.assert_array_equal(straight[name], resumed[name], err_msg=name)


@pytest.mark.parametrize('method', ['adalora', 'parallel_adapter'])
def test_scheduled_and_non_mergeable_methods_train_through_the_trainer(
  tmp_path, method
):
  config = common.load_config(f'{CONFIG}:runlocal,method={method}')
  if method == 'adalora':
    assert config.schedule[0] == 'adalora_schedule'
  row = train.train_and_evaluate(config, str(tmp_path))
  assert row['method'] == method and row['trainable_params'] > 0
  assert 0 <= row['after_test_accuracy'] <= 1


def test_sweep_writes_the_comparison_table_and_plot(tmp_path):
  table = sweep.run_sweep(f'{CONFIG}:runlocal', str(tmp_path), only={'ia3', 'bitfit'})
  assert (tmp_path / 'comparison.png').stat().st_size > 10_000
  assert (tmp_path / 'comparison.md').read_text() == table
  rows = compare.load_rows(tmp_path)
  assert [r['method'] for r in rows] == ['ia3', 'bitfit']  # fewest params first
  assert table.splitlines()[0].startswith('| method | trainable |')


@pytest.mark.slow
def test_real_minilm_loss_falls_in_a_few_dozen_steps(tmp_path):
  config = common.load_config(f'{CONFIG}:steps=40')
  config.log_every, config.data.eval_limit = 1, 200
  row = train.train_and_evaluate(config, str(tmp_path))
  losses = [
    json.loads(line)['loss']
    for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()
    if '"loss"' in line
  ]
  assert len(losses) == 40
  assert np.mean(losses[-10:]) < np.mean(losses[:5]) - 0.05, losses
  assert row['after_validation_accuracy'] > row['before_validation_accuracy'] + 0.1
