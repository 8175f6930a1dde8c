"""The main job's step benchmark runs end to end on the real MiniLM-L6."""

import json

import pytest

from benchmarks import minilm_step


@pytest.mark.slow
def test_the_jax_setting_writes_a_row_and_torch_is_skipped(tmp_path, capsys):
  no_torch = tmp_path / 'no_torch_python'
  no_torch.write_text('#!/bin/sh\nexit 1\n')
  no_torch.chmod(0o755)
  out = tmp_path / 'minilm.json'
  argv = ['--settings', 'jax_lora_factored,hf_peft_eager', '--repeats', '1',
          '--warmup', '1', '--steps', '1', '--torch-python', str(no_torch),
          '--out', str(out)]  # fmt: skip
  assert minilm_step.main(argv) == 0
  assert 'hf_peft_eager' in capsys.readouterr().err
  (row,) = json.loads(out.read_text())
  assert row['setting'] == 'jax_lora_factored' and row['workload'] == 'minilm'
  assert (row['batch'], row['seq']) == (minilm_step.BATCH, minilm_step.SEQ)
  # LoRA r8 on 6 layers' query and value kernels (384 x 384), plus the
  # 2-way head on the 384-wide pooled output.
  assert row['trainable_params'] == 6 * 2 * (8 * 384 * 2) + 384 * 2 + 2
  assert row['step_ms'] > 0 and row['compile_seconds'] > 0
