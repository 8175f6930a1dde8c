"""``save_adapter`` under ``jax.distributed``: two local processes (4 CPU
devices each) hold a θ sharded over both; the file process 0 writes holds
the whole θ, and process 1 writes nothing."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import peft_jax as pj

ROOT = pathlib.Path(__file__).parents[2]


def adapter_frozen_and_theta():
  """LoRA on a ``(16, 8)`` kernel, ``θ = (a (16, 2), b (2, 8))`` drawn by
  NumPy (the same in every process); ``a`` splits over 8 devices."""
  rng = np.random.default_rng(0)
  draw = lambda *shape: rng.normal(size=shape).astype(np.float32)
  frozen = {'body': {'kernel': draw(16, 8)}}
  adapter = pj.by_rules([('body/kernel', 'lora(rank=2)')])
  params, buffers = adapter.init(jax.random.key(1), frozen)
  lora = params['body']['kernel']._replace(a=draw(16, 2), b=draw(2, 8))
  return adapter, frozen, ({'body': {'kernel': lora}}, buffers)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def two_processes(worker: pathlib.Path, *args: str, timeout: float = 240) -> list[str]:
  """Runs ``python worker RANK PORT *args`` for ranks 0 and 1 (a 2-process
  ``jax.distributed`` job on localhost); returns their logs, asserting both
  exit 0."""
  port = str(free_port())
  env = {**os.environ, 'PYTHONPATH': str(ROOT)}
  procs = [
    subprocess.Popen(
      [sys.executable, str(worker), str(rank), port, *args],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for rank in (0, 1)
  ]
  logs = [p.communicate(timeout=timeout)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
  return logs


@pytest.mark.slow
def test_save_adapter_gathers_and_writes_from_process_0(tmp_path):
  two_processes(pathlib.Path(__file__).with_name('multihost_worker.py'), str(tmp_path))
  assert not (tmp_path / 'adapter_1.safetensors').exists()
  adapter, frozen, (want, _) = adapter_frozen_and_theta()
  like = jax.eval_shape(adapter.init, jax.random.key(1), frozen)
  params, _, metadata = pj.load_adapter(str(tmp_path / 'adapter_0.safetensors'), like)
  jax.tree.map(np.testing.assert_array_equal, params, want)
  assert metadata['rank'] == 0
