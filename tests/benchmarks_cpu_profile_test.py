"""The CPU profile: self times of nested trace events, and the script end to end."""

import gzip
import json

import pytest

from benchmarks import cpu_profile


def event(name, ts, dur, tid=1):
  return {'ph': 'X', 'name': name, 'ts': ts, 'dur': dur, 'pid': 7, 'tid': tid}


def test_self_times_subtract_nested_events_on_the_same_thread_only():
  events = [
    event('while', 0, 100),  # Holds two body ops: 100 - 30 - 50 of its own.
    event('dot', 10, 30),
    event('add', 50, 50),  # Ends where the loop ends.
    event('dot', 100, 5),  # After the loop: not nested.
    event('copy', 20, 40, tid=2),  # Overlaps in time, another thread.
  ]
  assert cpu_profile.self_times(events) == {
    'while': 20,
    'dot': 35,
    'add': 50,
    'copy': 40,
  }


def test_smoke_profile_end_to_end(tmp_path):
  out, kept = tmp_path / 'profile.json', tmp_path / 'traces'
  argv = ['--size', 'smoke', '--settings', 'jax_lora_factored', '--warmup', '1',
          '--steps', '1', '--out', str(out), '--keep-trace', str(kept)]  # fmt: skip
  assert cpu_profile.main(argv) == 0
  (row,) = json.loads(out.read_text())['rows']
  assert row['dtype'] == 'float32'  # auto on the CPU
  # The kept trace is the one read: its op events name the HLO's fusions.
  with gzip.open(kept / 'jax_lora_factored.perfetto_trace.json.gz') as file:
    trace = json.load(file)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  names = {e.get('name') for e in events}
  hlo = (kept / 'jax_lora_factored.hlo.txt').read_text()
  assert hlo.startswith('HloModule')
  ops = [op['op'] for op in row['largest'] if op['category'] != 'runtime'][:3]
  assert len(ops) == 3 and all(op in names and op in hlo for op in ops)
  categories = row['by_category']
  # The step's matmuls are all there: frozen projections, LoRA's rank-16
  # dots, attention, the LM head.
  assert {'dot:projection', 'dot:adapter', 'dot:attention', 'dot:lm_head'} <= set(
    categories
  )
  assert all(ms > 0 for ms in categories.values())
  assert row['traced_ms'] == pytest.approx(sum(categories.values()))
  assert row['step_ms'] > 0
  assert '### jax_lora_factored' in out.with_suffix('.md').read_text()


def test_unknown_setting_is_a_clear_error(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cpu_profile.main(['--settings', 'hf_peft_eager'])
  assert exit_info.value.code == 2
  assert "--settings ['hf_peft_eager']" in capsys.readouterr().err
