"""experiments.claims: the intervals against textbook formulas and table
quantiles, the verdicts, and the report from results files."""

import json

import numpy as np
import pytest

from experiments import claims
from peft_jax import PeftError

T_975_4 = 2.776445  # Student t, 4 degrees of freedom, 0.975 quantile (tables)
F_975_4_4 = 9.6045  # F(4, 4) 0.975 quantile (tables); F_0.025(4, 4) = 1 / it


def rows(method: str, accuracies, seeds=None) -> list[dict]:
  seeds = range(len(accuracies)) if seeds is None else seeds
  return [
    {
      'method': method,
      'group': method,
      'seed': seed,
      'after_test_accuracy': acc / 100,
      'trainable_params': 10,
      'steps': 200,
      'batch_size': 32,
      'task': 'text_classification',
      'model': 'minilm',
      'dataset': 'rotten_tomatoes',
      'eval_limit': None,
    }
    for seed, acc in zip(seeds, accuracies, strict=True)
  ]


def test_paired_difference_is_the_t_interval_of_seed_differences():
  a = rows('a', [80, 82, 84, 86, 88])
  b = rows('b', [79, 80, 83, 84, 86])  # differences 1, 2, 1, 2, 2
  d = claims.difference(a, b)
  half = T_975_4 * np.sqrt(0.3) / np.sqrt(5)  # sample variance of the diffs 0.3
  assert d.pairs == 5
  assert d.estimate == pytest.approx(1.6)
  assert (d.low, d.high) == pytest.approx((1.6 - half, 1.6 + half), abs=1e-5)
  assert claims.at_least(d).startswith('supported')


def test_unmatched_seeds_use_welchs_interval():
  a = rows('a', [80, 84, 82], seeds=[0, 1, 2])
  b = rows('b', [70, 75, 78, 73], seeds=[3, 4, 5, 6])
  d = claims.difference(a, b)
  va, vb = np.var([80, 84, 82], ddof=1) / 3, np.var([70, 75, 78, 73], ddof=1) / 4
  df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)  # Welch–Satterthwaite
  half = claims.scipy.stats.t.ppf(0.975, df) * np.sqrt(va + vb)
  assert d.pairs is None and d.estimate == pytest.approx(82 - 74)
  assert (d.low, d.high) == pytest.approx((8 - half, 8 + half), rel=1e-6)


def test_variance_ratio_interval_is_the_f_interval():
  a = rows('lora', [80, 84, 78, 86, 82])  # sample variance 10
  b = rows('mpc', [81, 82, 80, 83, 84])  # sample variance 2.5
  r = claims.variance_ratio(a, b)
  assert r.estimate == pytest.approx(4.0)
  assert (r.low, r.high) == pytest.approx((4 / F_975_4_4, 4 * F_975_4_4), rel=1e-4)


def test_verdicts_say_not_supported_when_the_interval_does_not_decide():
  within = claims.Difference(0.5, -0.2, 1.2, 5)
  assert claims.at_least(within).startswith('not supported by this run')
  assert claims.about_equal(within).startswith('consistent')
  below = claims.Difference(-2.0, -3.0, -1.0, 5)
  assert claims.at_least(below).startswith('contradicted')
  assert claims.about_equal(below).startswith('not supported by this run')


def test_repeated_seeds_and_single_runs_are_errors():
  with pytest.raises(PeftError, match='each seed may appear once'):
    claims.difference(rows('a', [1, 2], seeds=[0, 0]), rows('b', [1, 2]))
  with pytest.raises(PeftError, match='2 or more seeds'):
    claims.difference(rows('a', [1], seeds=[7]), rows('b', [1, 2]))
  with pytest.raises(PeftError, match='2 or more seeds'):
    claims.variance_ratio(rows('a', [1]), rows('b', [1, 2]))


def write_runs(directory, groups: dict[str, list[float]]) -> None:
  for method, accuracies in groups.items():
    run = directory / method
    run.mkdir(parents=True)
    (run / 'results.json').write_text(json.dumps(rows(method, accuracies)))


def test_report_reads_results_and_names_each_verdict(tmp_path, capsys):
  write_runs(
    tmp_path,
    {
      'ssb': [81, 82, 83, 82, 81],
      'ssl': [80, 80, 82, 81, 80],  # SSB − SSL = 1, 2, 1, 1, 1
      'ia3': [80, 81, 81, 82, 80],
      'lora': [78, 84, 80, 86, 82],
      'mpc': [81, 82, 81, 83, 82],
      'dora': [79, 84, 80, 85, 82],
    },
  )
  assert claims.main([str(tmp_path)]) == 0
  text = (tmp_path / 'claims.md').read_text()
  assert capsys.readouterr().out == text + '\n'
  line = next(x for x in text.splitlines() if x.startswith('| SSB ≥ SSL |'))
  assert '| +1.20 |' in line and 'supported: above' in line
  assert 'SSL ≈ (IA)³' in text and 'dora ≥ LoRA (See Further Table III' in text
  ratio = next(x for x in text.splitlines() if x.startswith('| s²(lora) / s²(mpc)'))
  assert '| 14.29 |' in ratio  # 10 / 0.7
  gain = next(x for x in text.splitlines() if x.startswith('| MPC ≥ LoRA |'))
  assert '| -0.20 |' in gain
  assert gain.endswith('| not supported by this run: within noise |')
  assert 'trilora' not in text  # only the methods that ran


def test_missing_methods_are_said_and_a_bad_directory_is_one_line(tmp_path, capsys):
  write_runs(tmp_path / 'runs', {'lora': [80, 81], 'bitfit': [79, 80]})
  text = claims.write_claims(tmp_path / 'runs')
  assert 'Claim 1 needs ssb, ssl and ia3 runs' in text
  write_runs(tmp_path / 'part', {'ssl': [80, 81, 79], 'ia3': [80, 82, 80]})
  part = claims.write_claims(tmp_path / 'part')
  assert '| SSL ≈ (IA)³ | -0.67 |' in part and 'Not run here: ssb.' in part
  assert '| SSB ≥' not in part  # no row for the comparisons with SSB
  assert 'Claim 2 needs lora and mpc runs' in text
  assert claims.main([str(tmp_path / 'nothing')]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1
