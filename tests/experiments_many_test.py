"""Several adapters trained as one program by the trainer (``seeds``, ``lrs``).

Runs are LoRA on the tiny task of ``experiments_test``: a group of two
seeds × two learning rates, each adapter checked against the single run of
its seed and rate, a resume after an interruption, the rows ``compare``
and ``seeds`` read, the sweep, and the refusals.
"""

import json
import os

import jax
import numpy as np
import pytest

import peft_jax as pj
from experiments import compare, sweep, tasks, train, train_many
from experiments.configs import common
from experiments.tasks import text_classification
from peft_jax._src import paths
from tests import experiments_test
from tests.experiments_test import CONFIG, assert_same_adapter, build_tiny
from tests.references import compiled_programs

STEPS = 4
EMBEDDINGS = 'bert/embeddings/word_embeddings/embedding'
LRS = [2e-3, 5e-3]
LABELS = ['seed=0,lr=0.002', 'seed=0,lr=0.005', 'seed=1,lr=0.002', 'seed=1,lr=0.005']


def group_config(**changes):
  """LoRA, ``STEPS`` steps, seeds 0 and 1 at each of ``LRS``."""
  config = experiments_test.local_config('lora')
  config.update(steps=STEPS, seeds=2, lrs=LRS, checkpoint_every=2, log_every=1)
  config.update(changes)
  return config


@pytest.fixture(scope='module')
def group_run(tmp_path_factory):
  """``(workdir, rows, evaluation_programs)`` of the uninterrupted group
  run; the last counts the evaluation programs it compiled."""
  workdir = tmp_path_factory.mktemp('group') / 'lora'  # alone in its sweep dir
  text_classification.correct_count.clear_cache()
  with pytest.MonkeyPatch.context() as patch, compiled_programs() as compiled:
    patch.setattr(tasks, 'build', build_tiny)
    rows = train.train_and_evaluate(group_config(), str(workdir))
  return workdir, rows, compiled.count('jit(correct_count)')


def test_the_adapters_of_a_group_share_one_compiled_evaluation(group_run):
  # 4 adapters, each evaluated before and after training on two splits of
  # one batch shape: one program, where per-seed tasks once compiled 4.
  assert group_run[2] == 1


@pytest.mark.parametrize('seed, lr', [(1, 5e-3), (0, 2e-3)])
def test_each_adapter_of_a_group_equals_its_single_run(
  group_run, seed, lr, tmp_path, monkeypatch
):
  workdir = group_run[0]
  monkeypatch.setattr(tasks, 'build', build_tiny)
  single = experiments_test.local_config('lora')
  single.update(steps=STEPS, seed=seed, lr=lr)
  row = train.train_and_evaluate(single, str(tmp_path))
  label = f'seed={seed},lr={lr:g}'
  # adamw_per_adapter computes η·shape(t) where optax.adamw takes the
  # schedule's η(t): equal up to float rounding, over 4 steps.
  assert_same_adapter(
    tmp_path / 'adapter.safetensors',
    workdir / 'adapters' / f'{label}.safetensors',
    rtol=1e-5,
    atol=1e-6,
  )
  (group_row,) = [r for r in group_run[1] if r['name'].endswith(f'[{label}]')]
  for key in ('trainable_params', 'seed', 'lr', 'method', 'steps', 'task'):
    assert group_row[key] == row[key], key
  # The head is each seed's own (its init differs by seed): compare counts.
  assert group_row['changed_params'] == row['changed_params']
  for split in ('validation', 'test'):
    assert group_row[f'before_{split}_accuracy'] == row[f'before_{split}_accuracy']


def test_a_group_writes_one_row_and_one_adapter_per_member(group_run):
  workdir, rows, _ = group_run
  assert [r['name'] for r in rows] == [f'rotten_tomatoes_lora[{x}]' for x in LABELS]
  assert [r['group'] for r in rows] == ['lora lr=0.002', 'lora lr=0.005'] * 2
  assert [(r['seed'], r['lr']) for r in rows] == [
    (0, 2e-3),
    (0, 5e-3),
    (1, 2e-3),
    (1, 5e-3),
  ]
  assert {r['adapters_in_program'] for r in rows} == {4}
  assert json.loads((workdir / 'results.json').read_text()) == rows
  assert sorted(os.listdir(workdir / 'adapters')) == [
    f'{x}.safetensors' for x in sorted(LABELS)
  ]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']  # one for all 4
  lines = [json.loads(x) for x in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [x['step'] for x in lines] == [0, 1, 2, 3, 4, 4]
  for label in LABELS:
    assert f'{label}/loss' in lines[1] and f'{label}/before_test_accuracy' in lines[0]
  # compare reads the list as four runs; seeds.md averages each rate's seeds.
  table = compare.write_comparison(workdir.parent)
  assert table.count('| lora |') == 4
  seeds_md = (workdir.parent / 'seeds.md').read_text()
  assert '| lora lr=0.002 | 2 |' in seeds_md and '| lora lr=0.005 | 2 |' in seeds_md


def test_a_finished_group_is_reported_not_rerun(group_run, monkeypatch):
  workdir, rows, _ = group_run
  monkeypatch.setattr(tasks, 'build', None)  # building anything would fail
  assert train.train_and_evaluate(group_config(), str(workdir)) == rows


def test_a_group_in_one_vmapped_pass_ends_as_in_passes_of_one(
  group_run, tmp_path, monkeypatch
):
  # On a CPU the default (adapters_per_pass=0) is passes of one adapter.
  assert train_many.adapters_per_pass(group_config()) == 1
  assert train_many.adapters_per_pass(group_config(adapters_per_pass=4)) == 4
  monkeypatch.setattr(tasks, 'build', build_tiny)
  rows = train.train_and_evaluate(group_config(adapters_per_pass=4), str(tmp_path))
  assert len(rows) == 4
  for label in LABELS:
    name = f'{label}.safetensors'
    got, want = tmp_path / 'adapters' / name, group_run[0] / 'adapters' / name
    assert_same_adapter(want, got, rtol=1e-5, atol=1e-6)


def test_an_interrupted_group_resumes_to_the_same_adapters(
  group_run, tmp_path, monkeypatch
):
  monkeypatch.setattr(tasks, 'build', experiments_test.build_tiny_stopping_at(3))
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(group_config(), str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']
  monkeypatch.setattr(tasks, 'build', build_tiny)
  rows = train.train_and_evaluate(group_config(), str(tmp_path))
  assert len(rows) == 4
  for label in LABELS:
    name = f'{label}.safetensors'
    assert_same_adapter(group_run[0] / 'adapters' / name, tmp_path / 'adapters' / name)


def test_group_arguments_parse_from_the_command_line():
  config = common.load_config(f'{CONFIG}:runlocal,seeds=3,lrs=[1e-3,2e-3],steps=5')
  assert (config.seeds, config.lrs, config.steps) == (3, [1e-3, 2e-3], 5)
  assert train_many.group_size(config) == 6
  single = common.load_config(f'{CONFIG}:runlocal')
  assert (single.seeds, single.lrs, train_many.group_size(single)) == (1, [], 1)
  common.check_config(config)
  # One rate and one seed is a single run: it trains at that rate, not the
  # method's default (lrs was once silently ignored there).
  one_rate = common.load_config(f'{CONFIG}:runlocal,lrs=[3e-3]')
  assert train_many.group_size(one_rate) == 1 and one_rate.lr == 3e-3


@pytest.mark.parametrize(
  'changes, message',
  [
    (dict(seeds=0), 'seeds=0 should be a positive int with seed + seeds <= 2**31'),
    (dict(seed=2**31 - 2, seeds=3), 'seeds=3 should be a positive int'),
    (dict(lrs=[1e-3, 0.0]), 'lrs=[0.001, 0.0] should be a list of distinct finite'),
    (dict(lrs=[1e-3, 1e-3]), 'lrs=[0.001, 0.001] should be a list of distinct'),
    (dict(lrs=['fast']), "lrs=['fast'] should be a list of distinct finite"),
    (dict(adapters_per_pass=-1), 'adapters_per_pass=-1 should be an int >= 0'),
  ],
)
def test_bad_group_arguments_are_one_line_errors(changes, message):
  config = group_config()
  config.update(changes)
  with pytest.raises(pj.PeftError, match=r'^[^\n]*$') as error:
    common.check_config(config)
  assert message in str(error.value)


def test_a_selective_method_cannot_group_its_seeds():
  config = common.load_config(
    'experiments/configs/sam.py:runlocal,method=sam,task=rotten_tomatoes'
  )
  config.seeds = 2
  with pytest.raises(pj.PeftError, match='sam selects other entries per seed'):
    common.check_config(config)


def test_a_leaf_that_differs_between_seeds_must_be_trained_whole(tmp_path, monkeypatch):
  def build(config):  # the word embeddings depend on the seed
    task = build_tiny(config)
    shift = lambda name, w: w + config.seed if name == EMBEDDINGS else w
    return task._replace(frozen=paths.map_named(shift, task.frozen))

  monkeypatch.setattr(tasks, 'build', build)
  with pytest.raises(pj.PeftError) as error:
    train.train_and_evaluate(group_config(), str(tmp_path))
  assert str(error.value) == (
    f'{EMBEDDINGS} differs between seeds and is '
    'adapted by no method, not trained whole (full()); train these seeds apart '
    '(seeds=1, seed=...)'
  )
  assert not (tmp_path / 'checkpoints').exists() or not os.listdir(
    tmp_path / 'checkpoints'
  )


def test_the_sweep_runs_one_program_per_method_and_a_row_per_adapter(
  tmp_path, monkeypatch
):
  monkeypatch.setattr(tasks, 'build', build_tiny)
  sweep.run_sweep(f'{CONFIG}:runlocal,seeds=2', str(tmp_path), only={'lora', 'ia3'})
  rows = compare.load_rows(tmp_path)
  assert sorted((r['method'], r['seed']) for r in rows) == [
    ('ia3', 0),
    ('ia3', 1),
    ('lora', 0),
    ('lora', 1),
  ]
  assert {r['adapters_in_program'] for r in rows} == {2}
  assert sorted(os.listdir(tmp_path)) == sorted(
    [
      'comparison.md',
      'comparison.png',
      'seeds.md',
      'spread.png',
      'stability.png',
      'tradeoff.png',
      'rotten_tomatoes_ia3',
      'rotten_tomatoes_lora',
    ]
  )
  ia3 = [r for r in rows if r['method'] == 'ia3']
  assert np.isfinite([r['after_test_accuracy'] for r in ia3]).all()


@pytest.mark.parametrize('mask', ['all', 'hf_trainer'])
def test_single_and_group_optimizers_decay_where_the_config_says(mask):
  """After one zero-gradient step at the peak rate (no warm-up), a kernel
  is θ·(1 − η·λ) under either mask, a bias only under 'all' (the Trainer's
  groups spare it), for ``train.make_optimizer`` and the group's
  ``member_optimizer`` alike."""
  config = experiments_test.local_config('lora')
  config.warmup_steps, config.weight_decay, config.weight_decay_mask = 0, 0.5, mask
  params = {'dense': {'kernel': np.full((2, 3), 2.0), 'bias': np.full((3,), 2.0)}}
  zeros = {'dense': {'kernel': np.zeros((2, 3)), 'bias': np.zeros((3,))}}
  member = train_many.Member('m', config, None, {})
  decayed = 2.0 * (1 - config.lr * 0.5)
  want_bias = decayed if mask == 'all' else 2.0
  for optimizer in (
    train.make_optimizer(config),
    train_many.member_optimizer(config, member),
  ):
    updates, _ = optimizer.update(zeros, optimizer.init(params), params)
    new = jax.tree.map(lambda p, u: p + u, params, updates)
    np.testing.assert_allclose(new['dense']['kernel'], decayed, rtol=1e-6)
    np.testing.assert_allclose(new['dense']['bias'], want_bias, rtol=1e-6)
