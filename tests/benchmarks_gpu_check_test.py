"""The prepared GPU check, rehearsed on the CPU at the smoke size."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_rehearsal_writes_what_one_device_call_brings_back(tmp_path):
  no_torch = tmp_path / 'no_torch_python'
  no_torch.write_text('#!/bin/sh\nexit 1\n')
  no_torch.chmod(0o755)
  out = tmp_path / 'out'
  env = {**os.environ, 'OUT': str(out), 'SIZE': 'smoke', 'PYTHON': sys.executable,
         'TORCH_PYTHON': str(no_torch)}  # fmt: skip
  subprocess.run(['bash', 'benchmarks/gpu_check.sh'], cwd=REPO, env=env, check=True)
  files = sorted(str(p.relative_to(out)) for p in out.rglob('*') if p.is_file())
  assert files == [
    'log.txt',
    'lora_step_smoke.json',
    'lora_step_smoke.md',
    'profile_smoke.json',
    'profile_smoke.md',
    'traces/jax_lora_factored.hlo.txt',
    'traces/jax_lora_factored.perfetto_trace.json.gz',
  ]
  # What the device tool brings back: at most 8 files of 16 MiB, plain names.
  for name in files:
    assert (out / name).stat().st_size < 16 * 2**20
    assert all(re.fullmatch(r'[A-Za-z0-9._-]+', part) for part in name.split('/'))
  log = (out / 'log.txt').read_text()
  assert all(f'{stage} exit 0' in log for stage in ('lora_step', 'profile', 'merger'))
  rows = json.loads((out / 'lora_step_smoke.json').read_text())
  assert [r['setting'] for r in rows] == [
    'jax_full',
    'jax_lora_weight',
    'jax_lora_factored',
    'jax_lora_remat',
  ]
  assert all(r['compile_seconds'] > 0 for r in rows)
