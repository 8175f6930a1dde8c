"""The trainer under ``jax.distributed``: two local processes (4 CPU devices
each) train the tiny LoRA task on one 8-device mesh, are interrupted after
a checkpoint, resume on another mesh layout, and end with the adapter a
one-process run on 8 devices trains; only process 0 writes the run's
files."""

import json
import pathlib

import pytest

from experiments import tasks, train
from tests import experiments_test
from tests._src.multihost_test import two_processes

WORKER = pathlib.Path(__file__).with_name('experiments_multihost_worker.py')


@pytest.mark.slow  # two processes each compile the trainer's step
def test_two_processes_train_resume_on_another_mesh_and_match_one(
  tmp_path, monkeypatch
):
  config = experiments_test.local_config('lora')
  two = tmp_path / 'two_processes'
  logs = two_processes(WORKER, str(two), 'data=4,fsdp=2', '2', timeout=400)
  assert all('stopped at step 2' in log for log in logs)
  assert not (two / 'results.json').exists()
  logs = two_processes(WORKER, str(two), 'data=2,fsdp=2,tensor=2', timeout=400)
  assert all('finished' in log for log in logs)
  assert 'resumed from step 2' in logs[0]

  monkeypatch.setattr(tasks, 'build', experiments_test.build_tiny)
  one = train.train_and_evaluate(config, str(tmp_path / 'one_process'))
  row = json.loads((two / 'results.json').read_text())
  assert (row['processes'], row['mesh']) == ('2', 'data=2,fsdp=2,tensor=2')
  assert row['after_test_accuracy'] == one['after_test_accuracy']
  lines = (two / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(line)['step'] for line in lines if 'loss' in line] == [1, 2, 3]
  experiments_test.assert_same_adapter(
    tmp_path / 'one_process/adapter.safetensors',
    two / 'adapter.safetensors',
    rtol=1e-5,
    atol=1e-6,
  )
