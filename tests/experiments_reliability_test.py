"""The trainer under faults: kills, damaged checkpoints and files, a second
trainer on the same workdir, non-finite steps.

Runs are LoRA on the tiny task of ``experiments_test`` (6 steps, a
checkpoint every 2); "the same adapter" is bit for bit.
"""

import hashlib
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy
from tensorboardX.proto import event_pb2

import peft_jax as pj
from experiments import tasks, train
from tests import experiments_test
from tests.experiments_test import (
  assert_same_adapter,
  build_tiny,
  build_tiny_stopping_at,
)

STEPS = 6


def reliability_config(**changes):
  """The LoRA run of these tests: ``STEPS`` steps, a checkpoint every 2."""
  config = experiments_test.local_config('lora')
  config.steps, config.checkpoint_every, config.log_every = STEPS, 2, 1
  config.update(changes)
  return config


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """The workdir of the uninterrupted run."""
  workdir = tmp_path_factory.mktemp('straight')
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(tasks, 'build', build_tiny)
    train.train_and_evaluate(reliability_config(), str(workdir))
  return workdir


@pytest.fixture(scope='module')
def interrupted(tmp_path_factory):
  """A workdir of the run stopped while fetching step 6's batch: it holds
  the checkpoints of steps 2 and 4 (the newest two)."""
  workdir = tmp_path_factory.mktemp('interrupted')
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(tasks, 'build', build_tiny_stopping_at(5))
    with pytest.raises(KeyboardInterrupt):
      train.train_and_evaluate(reliability_config(), str(workdir))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  return workdir


def resume(workdir, monkeypatch, **changes) -> dict:
  monkeypatch.setattr(tasks, 'build', build_tiny)
  return train.train_and_evaluate(reliability_config(**changes), str(workdir))


def copy(workdir, tmp_path) -> pathlib.Path:
  target = tmp_path / 'run'
  shutil.copytree(workdir, target)
  return target


def data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  """The array data files of one orbax checkpoint step, largest first."""
  found = [p for p in (step_dir / 'state').rglob('d/*') if p.is_file()]
  return sorted(found, key=lambda p: -p.stat().st_size)


def flip_bytes(step_dir):
  """64 bytes inverted in the middle of the largest data file: orbax reads
  it back without complaint (other values); only the checksums see it."""
  path = data_files(step_dir)[0]
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
  path.write_bytes(bytes(data))


def truncate(step_dir):
  for path in data_files(step_dir):
    os.truncate(path, path.stat().st_size // 2)


def lose_metadata(step_dir):
  (step_dir / 'state' / '_METADATA').unlink()


def lose_json(step_dir):
  shutil.rmtree(step_dir / 'metadata')


@pytest.mark.parametrize(
  'damage',
  [
    flip_bytes,
    pytest.param(truncate, marks=pytest.mark.slow),
    pytest.param(lose_metadata, marks=pytest.mark.slow),
    pytest.param(lose_json, marks=pytest.mark.slow),
  ],
)
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_older_one_used(
  damage, straight, interrupted, tmp_path, monkeypatch, capsys
):
  workdir = copy(interrupted, tmp_path)
  damage(workdir / 'checkpoints' / '4')
  resume(workdir, monkeypatch)
  out = capsys.readouterr().out
  assert f'checkpoint step 4 in {workdir / "checkpoints"} is damaged' in out
  assert 'resumed from step 2' in out
  assert (workdir / 'checkpoints.damaged' / '4').is_dir()  # kept, not deleted
  assert_same_adapter(straight / 'adapter.safetensors', workdir / 'adapter.safetensors')


def test_with_every_checkpoint_damaged_the_trainer_refuses_to_start_over(
  interrupted, tmp_path, monkeypatch, capsys
):
  workdir = copy(interrupted, tmp_path)
  flip_bytes(workdir / 'checkpoints' / '4')
  truncate(workdir / 'checkpoints' / '2')
  monkeypatch.setattr(tasks, 'build', build_tiny)
  argv = ['--config', f'{experiments_test.CONFIG}:runlocal,method=lora']
  config = reliability_config()
  monkeypatch.setattr(train.common, 'load_config', lambda spec: config)
  assert train.main([*argv, '--workdir', str(workdir)]) == 2
  err = capsys.readouterr().err.splitlines()[-1]
  assert err.startswith('error: no good checkpoint in ')
  assert 'refusing to start over silently' in err
  assert sorted(os.listdir(workdir / 'checkpoints.damaged')) == ['2', '4']
  assert not (workdir / 'results.json').exists()


def test_a_checkpoint_of_another_config_is_refused_without_config_json(
  interrupted, tmp_path, monkeypatch
):
  workdir = copy(interrupted, tmp_path)
  (workdir / 'config.json').unlink()
  with pytest.raises(
    pj.PeftError,
    match=r'checkpoints of a run with a different config \(keys lr differ\)',
  ):
    resume(workdir, monkeypatch, lr=0.5)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']  # untouched


def test_damaged_json_files_and_a_torn_metrics_line_are_recovered(
  straight, interrupted, tmp_path, monkeypatch, capsys
):
  workdir = copy(interrupted, tmp_path)
  (workdir / 'config.json').write_text('{"name": "rotten')  # cut short
  with open(workdir / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 5, "loss": 0.6')  # a line torn by a kill
  resume(workdir, monkeypatch)
  assert 'config.json is not a JSON object; moved to' in capsys.readouterr().out
  assert (workdir / 'config.json.damaged').read_text() == '{"name": "rotten'
  steps = [json.loads(line)['step'] for line in metric_lines(workdir)]
  assert steps == sorted(steps) and steps == [0, 1, 2, 3, 4, 5, 6, 6]
  # A results.json cut short is redone from the last checkpoint.
  (workdir / 'results.json').write_text('{"name"')
  row = resume(workdir, monkeypatch)
  assert json.loads((workdir / 'results.json').read_text()) == json.loads(
    json.dumps(row)
  )
  assert_same_adapter(straight / 'adapter.safetensors', workdir / 'adapter.safetensors')


def metric_lines(workdir) -> list[str]:
  return (workdir / 'metrics.jsonl').read_text().splitlines()


def event_records(path: pathlib.Path):
  """The records of a TFRecord file: u64 length, u32 length CRC, the data,
  u32 data CRC (CRCs not checked)."""
  data, at = path.read_bytes(), 0
  while at < len(data):
    (length,) = struct.unpack('<Q', data[at : at + 8])
    yield data[at + 12 : at + 12 + length]
    at += 12 + length + 4


def tensorboard_steps(board_dir: pathlib.Path) -> dict[str, list[int]]:
  """``{tag: steps}`` as TensorBoard shows a run's event files: read in
  name order (a name starts with its creation time), where a file's
  ``SessionLog.START`` at step T hides the steps >= T written before it
  (TensorBoard's purge)."""
  shown: dict[str, list[int]] = {}
  for path in sorted(board_dir.glob('events.out.tfevents.*')):
    for record in event_records(path):
      event = event_pb2.Event.FromString(record)
      if event.session_log.status == event_pb2.SessionLog.START:
        shown = {
          tag: [s for s in steps if s < event.step] for tag, steps in shown.items()
        }
      for value in event.summary.value:
        shown.setdefault(value.tag, []).append(event.step)
  return shown


def test_tensorboard_shows_each_step_once_after_a_resume(
  interrupted, tmp_path, monkeypatch
):
  """The killed run logged steps 1-5 and resumes from step 4: TensorBoard
  shows its steps 1-4, then the resumed run's 5 and 6, once each."""
  workdir = copy(interrupted, tmp_path)
  resume(workdir, monkeypatch)
  assert len(list((workdir / 'tensorboard').glob('events.out.tfevents.*'))) == 2
  shown = tensorboard_steps(workdir / 'tensorboard')
  assert shown['loss'] == [1, 2, 3, 4, 5, 6]
  assert shown['before_test_accuracy'] == [0]
  assert shown['after_test_accuracy'] == [STEPS]


def test_a_second_trainer_on_a_workdir_is_refused_naming_the_holder(
  tmp_path, monkeypatch, capsys
):
  workdir = tmp_path / 'run'
  monkeypatch.setattr(tasks, 'build', build_tiny)
  argv = ['--config', f'{experiments_test.CONFIG}:runlocal', '--workdir', str(workdir)]
  with train.workdir_lock(workdir):
    before = hashes(workdir)
    assert train.main(argv) == 2
    assert hashes(workdir) == before
  err = capsys.readouterr().err
  assert err == (
    f'error: {workdir} is in use by another trainer (PID {os.getpid()}); wait '
    'for it to finish or use another --workdir\n'
  )
  with train.workdir_lock(workdir):  # released on exit
    pass


def hashes(folder: pathlib.Path) -> dict[str, str]:
  return {
    str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(folder.rglob('*'))
    if p.is_file()
  }


def poisoned(at_position: int):
  """``build_tiny`` whose loss is NaN (and so are its gradients) at the step
  that trains on the batch of ``at_position``."""

  def build(config):
    task = build_tiny(config)

    def train_batch(position):
      batch = dict(task.train_batch(position))
      size = len(batch['label'])
      batch['poison'] = np.full(size, np.nan if position == at_position else 0.0)
      return batch

    def loss_fn(weights, batch, rng):
      batch = dict(batch)
      poison = batch.pop('poison')
      loss, metrics = task.loss_fn(weights, batch, rng)
      return loss * (1 + jnp.sum(poison)), metrics

    return task._replace(train_batch=train_batch, loss_fn=loss_fn)

  return build


def test_a_non_finite_step_stops_the_run_and_nothing_bad_is_saved(
  tmp_path, monkeypatch, capsys
):
  workdir = tmp_path / 'run'
  monkeypatch.setattr(tasks, 'build', poisoned(at_position=2))
  config = reliability_config()
  monkeypatch.setattr(train.common, 'load_config', lambda spec: config)
  argv = ['--config', f'{experiments_test.CONFIG}:runlocal', '--workdir', str(workdir)]
  assert train.main(argv) == 2
  err = capsys.readouterr().err  # the progress bars, then the error
  assert err.endswith(
    '\nerror: step 3 has a non-finite loss or gradient (loss nan); stopped '
    f'without saving it, the last good checkpoint is step 2 in '
    f'{workdir / "checkpoints"}; lower lr, or pass nonfinite=skip to skip such '
    'steps\n'
  )
  assert os.listdir(workdir / 'checkpoints') == ['2']
  assert not (workdir / 'adapter.safetensors').exists()
  assert not (workdir / 'results.json').exists()


def test_with_nonfinite_skip_the_poisoned_step_is_skipped_and_counted(
  tmp_path, monkeypatch
):
  monkeypatch.setattr(tasks, 'build', poisoned(at_position=2))
  row = train.train_and_evaluate(
    reliability_config(nonfinite='skip'), str(tmp_path / 'run')
  )
  assert row['skipped_steps'] == 1
  logged = [json.loads(line) for line in metric_lines(tmp_path / 'run')]
  assert [m['skipped_steps'] for m in logged if 'loss' in m] == [0, 0, 1, 1, 1, 1]
  adapter = safetensors_numpy.load_file(str(tmp_path / 'run/adapter.safetensors'))
  assert all(np.isfinite(a).all() for a in adapter.values())


def test_checkpoints_are_due_by_steps_and_by_minutes():
  config = reliability_config(steps=1000, checkpoint_every=100, checkpoint_minutes=1.0)
  due = lambda step, seconds: train.checkpoint_due(config, step, seconds)
  assert due(100, 0.0) and due(1000, 0.0) and due(7, 60.0)
  assert not due(7, 59.0) and not due(999, 30.0)


KILLS = ['batch:2', 'save_start:4', 'save_async:4', 'save_done:4', 'results']


@pytest.mark.slow
def test_killed_at_any_moment_the_run_resumes_to_the_same_adapter(straight, tmp_path):
  """SIGKILL mid-training, on entering a save, while orbax writes in the
  background, right after a save, and between the adapter and results.json;
  each time the next process resumes, and the last one finishes with the
  uninterrupted run's adapter. The lock of a killed process is free."""
  workdir = tmp_path / 'run'
  env = {**os.environ, 'JAX_COMPILATION_CACHE_DIR': str(tmp_path / 'xla')}
  run = lambda *where: subprocess.run(
    [sys.executable, '-m', 'tests.experiments_kill_worker', str(workdir), *where],
    env=env,
    capture_output=True,
    text=True,
    check=False,
  )
  for where in KILLS:
    done = run(where)
    assert done.returncode == -9, (where, done.stderr[-2000:])
    assert not (workdir / 'results.json').exists()
  done = run()
  assert done.returncode == 0, done.stderr[-2000:]
  assert_same_adapter(straight / 'adapter.safetensors', workdir / 'adapter.safetensors')
  row = json.loads((workdir / 'results.json').read_text())
  assert row['steps'] == STEPS


def test_a_resume_may_change_logistics_but_nothing_else():
  recorded = train.config_json(reliability_config())
  later = train.config_json(
    reliability_config(checkpoint_every=3, checkpoint_minutes=5.0, log_every=2)
  )
  assert train.differing_keys(recorded, later) == ''
  older = {k: v for k, v in recorded.items() if k not in ('nonfinite',)}
  assert train.differing_keys(older, recorded) == ''  # recorded before the field
  assert train.differing_keys(older, {**recorded, 'nonfinite': 'skip'}) == 'nonfinite'
  assert (
    train.differing_keys(recorded, {**recorded, 'lr': 1.0, 'seed': 3}) == 'lr, seed'
  )
