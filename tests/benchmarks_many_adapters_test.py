"""The many-adapters benchmark runs end to end at its smoke setting."""

import json
import math

from benchmarks import many_adapters


def test_tiny_benchmark_writes_samples_medians_and_ratios(tmp_path):
  # A child process loads the programs an earlier one compiled from the
  # session's compilation cache (tests/conftest.py), which it inherits.
  smoke = ['--tiny', '--adapters', '2', '--steps', '2', '--repeats', '1']
  many_adapters.main([*smoke, '--out', str(tmp_path)])
  result = json.loads((tmp_path / 'many_adapters.json').read_text())
  assert [s['mode'] for s in result['samples']] == ['one', 'many', 'passes']
  one, many, passes = result['samples']
  assert (one['adapters'], many['adapters'], passes['adapters']) == (1, 2, 2)
  assert len(one['step_s']) == len(many['step_s']) == len(passes['step_s']) == 2
  assert len(many['last_loss']) == len(passes['last_loss']) == 2
  losses = one['last_loss'] + many['last_loss'] + passes['last_loss']
  assert all(math.isfinite(x) for x in losses)
  # Seed 0 of the group takes the step it takes alone; both group modes agree.
  assert math.isclose(many['last_loss'][0], one['last_loss'][0], rel_tol=1e-4)
  for got, want in zip(passes['last_loss'], many['last_loss'], strict=True):
    assert math.isclose(got, want, rel_tol=1e-4)
  assert many['temp_bytes'] > one['temp_bytes']
  for mode in ('many', 'passes'):
    for key in ('throughput_excluding_compile', 'peak_rss', 'compiled_temp', 'flops'):
      assert result['ratios'][mode][key] > 0, (mode, key)
  for key in ('date', 'jax', 'flax', 'optax', 'cpu_count', 'device'):
    assert result['environment'][key], key
  markdown = (tmp_path / 'many_adapters.md').read_text()
  assert '| many (N=2) |' in markdown and '| passes (N=2) |' in markdown
  assert 'Where the time goes (`many`)' in markdown
  assert 'Where the time goes (`passes`)' in markdown
