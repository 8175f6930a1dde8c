"""The LoRA step benchmark: interleaved rounds, per-child fields, torch skipped."""

import json
import subprocess
import sys

from benchmarks import lora_step


def test_smoke_rounds_write_medians_and_skip_torch(tmp_path, capsys):
  # A child process loads the programs an earlier one compiled from the
  # session's compilation cache (tests/conftest.py), which it inherits.
  no_torch = tmp_path / 'no_torch_python'
  no_torch.write_text('#!/bin/sh\nexit 1\n')
  no_torch.chmod(0o755)
  out = tmp_path / 'step.json'
  settings = 'jax_lora_weight,hf_peft_eager,jax_lora_factored'
  argv = ['--size', 'smoke', '--settings', settings, '--repeats', '2',
          '--warmup', '1', '--steps', '2', '--torch-python', str(no_torch),
          '--out', str(out)]  # fmt: skip
  assert lora_step.main(argv) == 0
  skips = [
    line for line in capsys.readouterr().err.splitlines() if line.startswith('skip')
  ]
  assert len(skips) == 1 and 'hf_peft_eager' in skips[0], skips
  rows = json.loads(out.read_text())
  assert [r['setting'] for r in rows] == ['jax_lora_weight', 'jax_lora_factored']
  for row in rows:
    assert row['repeats'] == 2 and [r['round'] for r in row['rounds']] == [0, 1]
    assert row['step_ms'] > 0 and row['compile_seconds'] > 0
    assert row['peak_rss_mib'] > 100 and row['dtype'] == 'float32'
    assert row['framework'].startswith('jax ') and row['device'] and row['date']
    for one in row['rounds']:
      assert one['compile_seconds'] > 0 and len(one['loadavg']) == 3
    times = sorted(one['step_ms'] for one in row['rounds'])
    assert row['step_ms'] == (times[0] + times[1]) / 2
  assert '| jax_lora_factored | float32 |' in out.with_suffix('.md').read_text()


def test_rounds_are_interleaved_in_the_given_order(monkeypatch):
  commands = []

  def fake_run(command, **kwargs):
    commands.append(command[command.index('--one') + 1])
    row = {'setting': commands[-1], 'step_ms': float(len(commands))}
    row.update(tokens_per_s=1.0, model_tflops=1.0)
    return subprocess.CompletedProcess(command, 0, json.dumps(row), '')

  monkeypatch.setattr(lora_step.subprocess, 'run', fake_run)
  rows = lora_step.run_interleaved(
    'benchmarks.lora_step', ['b', 'a', 'c'], [], 3, sys.executable
  )
  assert commands == ['b', 'a', 'c'] * 3
  assert [r['setting'] for r in rows] == ['b', 'a', 'c']
  assert [r['step_ms'] for r in rows] == [4.0, 5.0, 6.0]  # medians of rounds
  assert [x['step_ms'] for x in rows[1]['rounds']] == [2.0, 5.0, 8.0]


def test_ratios_pair_like_with_like():
  ours = ['jax_lora_factored', 'jax_lora_factored_no_dropout', 'jax_full']
  theirs = ['hf_peft_eager', 'hf_peft_eager_no_dropout', 'torch_full_eager']
  settings = ours + theirs
  rows = [
    {'setting': s, 'tokens_per_s': 100.0 * (i + 1), 'peak_rss_mib': 10.0}
    for i, s in enumerate(settings)
  ]
  table = lora_step.ratio_lines(rows)[5:]
  pairs = [tuple(line.split(' | ')[:2]) for line in table]
  assert pairs == [
    ('| jax_lora_factored', 'hf_peft_eager'),
    ('| jax_lora_factored_no_dropout', 'hf_peft_eager_no_dropout'),
    ('| jax_full', 'torch_full_eager'),
  ]
  assert table[0].endswith('| 0.25 | 1.00 |')  # 100 / 400 tokens/s


def test_a_child_past_its_timeout_is_skipped_and_rows_are_saved_as_they_come(
  monkeypatch, capsys
):
  saved = []

  def fake_run(command, timeout=None, **kwargs):
    setting = command[command.index('--one') + 1]
    if setting == 'slow':
      raise subprocess.TimeoutExpired(command, timeout)
    row = {'setting': setting, 'step_ms': 2.0, 'tokens_per_s': 1.0, 'model_tflops': 1.0}
    return subprocess.CompletedProcess(command, 0, json.dumps(row), '')

  monkeypatch.setattr(lora_step.subprocess, 'run', fake_run)
  rows = lora_step.run_interleaved(
    'benchmarks.lora_step',
    ['a', 'slow', 'b'],
    [],
    1,
    sys.executable,
    child_timeout=7.0,
    save=lambda rows: saved.append([r['setting'] for r in rows]),
  )
  assert [r['setting'] for r in rows] == ['a', 'b']
  assert saved == [['a'], ['a', 'b']]
  assert 'slow timed out after 7 s' in capsys.readouterr().err
