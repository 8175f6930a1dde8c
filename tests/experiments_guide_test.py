"""The guide's head-to-head config (experiments/configs/guide.py).

Its 16 entries build and match MiniLM's leaves and hook points at the
adapters library's and HF PEFT's sizes; the protocol is the guide's; a
group run writes one row per seed and rate (on ``experiments_test``'s tiny
task, and in the slow test on the real MiniLM and data); bad arguments are one
line.
"""

import json

import pytest

import peft_jax as pj
from experiments import tasks, train
from experiments.configs import common, guide
from peft_jax._src import paths
from tests.experiments_test import abstract_init, build_tiny, minilm_shapes

GUIDE = 'experiments/configs/guide.py'
# The comparison repo's 15 adapter_config_strings (compacter++ spelled
# compacter_pp), from its classification scripts, and the guide's grid.
NAMES = (
  'houlsby',
  'pfeiffer',
  'scaled_parallel',
  'ln_tuning',
  'lora',
  'hf_lora',
  'hf_lora_all',
  'hf_krona',
  'compacter',
  'compacter_pp',
  'ia3',
  'mam',
  'prefix_tuning',
  'prefix_tuning_flat',
  'unipelt',
)
GRID = [2e-3, 1e-3, 5e-4, 1e-4, 5e-5]
# MiniLM-L6: width, layers, FFN width.
D, L, FF = 384, 6, 1536
HEAD = D * 2 + 2


def bottleneck(r: int, d: int = D) -> int:
  """A sequential adapter's count: down, up and both biases."""
  return 2 * d * r + r + d


def prefix_mlp(length: int, width: int) -> int:
  """Prefix tuning through its MLP: the shared embedding and hidden layer,
  and each layer's output slice to keys and values."""
  return length * D + D * width + width + L * (width * 2 * D + 2 * D)


# Trainable encoder entries per method at the libraries' defaults.
COUNTS = {
  'houlsby': 2 * L * bottleneck(D // 16),
  'pfeiffer': L * bottleneck(D // 16),
  'scaled_parallel': L * (2 * D * (D // 2) + D // 2 + 1),  # no up bias; scale
  'ln_tuning': 2 * D * (1 + 2 * L),
  'lora': L * 2 * 8 * 2 * D,
  'hf_lora': L * 2 * 8 * 2 * D,
  'hf_lora_all': L * 8 * (4 * 2 * D + 2 * (D + FF)),
  'hf_krona': L * 2 * (16 * 16 + 2 * 24 * 8),  # 384 = 16 x 24
  'compacter': 2 * L * (2 * (D + D // 32) + D + D // 32) + 4**3,
  'compacter_pp': L * (2 * (D + D // 32) + D + D // 32) + 4**3,
  'ia3': L * (2 * D + FF),
  'mam': prefix_mlp(30, 800) + L * (2 * D * (D // 2) + D // 2),
  'prefix_tuning': prefix_mlp(30, 512),
  'prefix_tuning_flat': L * 2 * 30 * D,
  'unipelt': (
    L * 2 * (8 * 2 * D + D + 1)  # gated LoRA
    + prefix_mlp(10, 512)
    + L * (D + 1)  # the prefix's gate
    + L * (bottleneck(D // 16) + D + 1)  # gated seq_bn
  ),
}


def test_the_protocol_is_the_guides(tmp_path):
  assert guide.COMPARED == NAMES and guide.REFERENCE == 'full'
  assert guide.sweep() == [f'method={m}' for m in (*NAMES, 'full')]
  config = guide.get_config()
  assert (config.method, config.task, config.data.name) == (
    'lora',
    'text_classification',
    'rotten_tomatoes',
  )
  assert config.lrs == GRID and config.lr == GRID[0]
  assert (config.seed, config.seeds, config.weight_decay) == (0, 3, 0.1)
  assert (config.batch_size, config.steps, config.warmup_steps) == (32, 300, 18)
  dirs = f'checkpoint={tmp_path},data_dir={tmp_path}'
  # 3 epochs at batch 32 of TFDS train less the 10% held out, at least 100:
  # RTE 2,241 of 2,490 examples, COPA 360 of 400, BoolQ 8,484 of 9,427.
  for task, steps in [('rte', 3 * 71), ('copa', 100), ('boolq', 3 * 266)]:
    config = guide.get_config(f'task={task},method=unipelt,{dirs}')
    common.check_config(config)
    assert (config.name, config.task, config.data.task) == (
      f'guide_{task}_unipelt',
      'glue',
      task,
    )
    assert (config.steps, config.warmup_steps) == (steps, int(0.06 * steps))
    assert config.model.checkpoint_dir == str(tmp_path)
    assert (config.lrs, config.seeds, config.weight_decay) == (GRID, 3, 0.1)
  one = guide.get_config('lrs=[1e-4],seeds=1,steps=40')
  assert (one.lr, one.steps, one.warmup_steps) == (1e-4, 40, 2)


def test_every_entry_builds_and_matches_minilm_at_the_libraries_sizes():
  frozen, hooks = minilm_shapes()
  # Full fine-tuning: every encoder leaf but the CLS pooler, which the
  # mean-pooled head never calls (on GLUE the head's rule takes the pooler).
  encoder = pj.count(frozen['bert']) - pj.count(frozen['bert']['pooler'])
  counts = {**COUNTS, 'full': encoder}
  for entry in guide.sweep():
    config = common.load_config(f'{GUIDE}:{entry}')
    common.check_config(config)
    assert config.adapters[0] == ('classifier/(kernel|bias)', 'full()')
    params, _ = abstract_init(config.adapters, frozen, hooks)  # every rule matches
    assert pj.count(params) - HEAD == counts[config.method], config.method
  # Compacter shares one rule A across both sites of every layer.
  compacter = common.load_config(f'{GUIDE}:method=compacter').adapters
  params, _ = abstract_init(compacter, frozen, hooks)
  assert params['@shared']['compacter_adapter'].a.shape == (4, 4, 4)
  # houlsby leaves the LayerNorms frozen, as the adapters library does.
  houlsby = common.load_config(f'{GUIDE}:method=houlsby').adapters
  params, _ = abstract_init(houlsby, frozen, hooks)
  assert not [name for name in paths.flatten(params) if 'layer_norm' in name]


def group_rows(workdir, method: str) -> list[dict]:
  """Trains ``method`` at seeds 0, 1 and two rates (``runlocal``) through
  the command line; returns the rows of its ``results.json``."""
  arg = f'method={method},runlocal,seeds=2,lrs=[1e-3,5e-4]'
  assert train.main(['--config', f'{GUIDE}:{arg}', '--workdir', str(workdir)]) == 0
  return json.loads((workdir / 'results.json').read_text())


def test_a_group_writes_one_row_per_seed_and_rate(tmp_path, monkeypatch):
  # UniPELT: weight-space and activation parts, parameters shared by layers.
  monkeypatch.setattr(tasks, 'build', build_tiny)
  check_rows(group_rows(tmp_path, 'unipelt'), 'unipelt', tmp_path)


def check_rows(rows, method: str, workdir) -> None:
  """One row and one adapter per (seed, rate), seed-major, each at its rate."""
  members = [(0, 1e-3), (0, 5e-4), (1, 1e-3), (1, 5e-4)]
  assert [(r['seed'], r['lr']) for r in rows] == members
  assert [r['group'] for r in rows] == [f'{method} lr=0.001', f'{method} lr=0.0005'] * 2
  assert {r['method'] for r in rows} == {method}
  assert {r['steps'] for r in rows} == {3}
  for seed, lr in members:
    assert (workdir / 'adapters' / f'seed={seed},lr={lr:g}.safetensors').is_file()


@pytest.mark.slow
def test_a_group_on_the_real_minilm_and_data(tmp_path):
  check_rows(group_rows(tmp_path, 'hf_lora'), 'hf_lora', tmp_path)


@pytest.mark.parametrize(
  ('arg', 'named'),
  [
    ('task=sst2', "task='sst2' is unknown; expected one of rotten_tomatoes, rte,"),
    ('method=krona', "method='krona' is unknown (did you mean 'hf_krona'?)"),
    ('method=compacter++', "method='compacter++' is unknown (did you mean"),
    ('lr=1e-3', "unknown config argument 'lr' (did you mean 'lrs'?)"),
    ('lrs=[]', 'lrs=[] leaves no learning rate; give one as lrs=[1e-3]'),
    ('lrs=[1e-3,1e-3]', 'lrs=[0.001, 0.001] should be a list of distinct'),
    ('seeds=0', 'seeds=0 should be a positive int'),
    ('task=rte,data_dir=/nowhere', 'checkpoint= is required'),
  ],
)
def test_a_bad_argument_is_one_error_line(arg, named, tmp_path, capsys, monkeypatch):
  monkeypatch.delenv('TFDS_DATA_DIR', raising=False)
  workdir = tmp_path / 'run'
  assert train.main(['--config', f'{GUIDE}:{arg}', '--workdir', str(workdir)]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1 and named in err, err
  assert not workdir.exists()
