"""Bad input to ``python -m experiments.train``: one line ``error: ...``
naming the value and what was expected, exit status 2, before the model
loads and with the workdir as it was (``common.check_config``); and every
shipped config's settings pass those checks."""

import hashlib
import math
import pathlib

import pytest

import peft_jax as pj
from experiments import compare, tasks, train
from experiments.configs import (
  common,
  glue,
  rotten_tomatoes,
  sam,
  smollm2_rotten_tomatoes,
)

RT = 'experiments/configs/rotten_tomatoes.py'
SMOLLM2 = 'experiments/configs/smollm2_rotten_tomatoes.py'
GLUE = 'experiments/configs/glue.py'
SAM = 'experiments/configs/sam.py'
# Fields no shipped config takes as an argument (weight_decay, warmup_steps,
# factored, adapters, schedule, ...) come from this config: rotten_tomatoes.py's
# for ``BASE_ARG``, then each ``;field=literal`` set as written.
OVERRIDE = 'override.py'
OVERRIDE_MODULE = """
import ast

import ml_collections

from experiments.configs import rotten_tomatoes


def get_config(arg=None):
  base, *fields = (arg or '').split(';')
  config = rotten_tomatoes.get_config(base or None).to_dict()
  for item in fields:
    key, _, text = item.partition('=')
    config[key] = ast.literal_eval(text)
  return ml_collections.ConfigDict(config)
"""

# (config, its argument, the fragment of the one error line, extra argv).
# GLUE (and sam's GLUE tasks) get existing checkpoint and data dirs first
# (``DIRS``; a later ``checkpoint=`` wins).
DIRS = 'DIRS'
CASES = [
  # The arguments' names and types (common.parse_arg).
  (RT, 'stesp=3', "unknown config argument 'stesp' (did you mean 'steps'?)"),
  (RT, 'steps=many', "config argument steps='many' should be a int (default 500)"),
  (RT, 'steps', 'config argument steps (bare, so True) should be a int'),
  (RT, 'lr=fast', "config argument lr='fast' should be a float (default 0.0)"),
  (RT, 'eval_limit=2.5', "config argument eval_limit='2.5' should be a int"),
  (RT, 'nonfinite=1', "config argument nonfinite='1' should be a str"),
  # Names looked up in a table (common.lookup: the closest name, the choices).
  (RT, 'method=lora2', "method='lora2' is unknown (did you mean 'lora'?); expected"),
  (SMOLLM2, 'method=qlora', "method='qlora' is unknown (did you mean 'lora'?)"),
  (SMOLLM2, 'frozen=bfloat', "frozen='bfloat' is unknown (did you mean 'bfloat16'?)"),
  (DIRS + GLUE, 'method=lora2', "method='lora2' is unknown (did you mean 'lora'?)"),
  (DIRS + GLUE, 'task=rtee', "task='rtee' is unknown (did you mean 'rte'?)"),
  (SAM, 'method=lora2', "method='lora2' is unknown (did you mean 'lora'?)"),
  (SAM, 'scope=globl', "scope='globl' is unknown (did you mean 'global'?)"),
  (SAM, 'study=tabel', "study='tabel' is unknown (did you mean 'table'?)"),
  (RT, 'nonfinite=maybe', "nonfinite='maybe' is unknown; expected one of stop, skip"),
  (RT, 'nonfinite=skp', "nonfinite='skp' is unknown (did you mean 'skip'?)"),
  # Directories GLUE needs.
  (GLUE, 'task=rte', 'checkpoint= is required: a local Hugging Face'),
  (DIRS + GLUE, 'checkpoint=/no/such/dir', "checkpoint='/no/such/dir' is not a dir"),
  (SAM, 'task=cola', 'checkpoint= is required'),
  # Counts the trainer divides or loops by.
  (RT, 'steps=0', 'steps=0 should be a positive int'),
  (RT, 'steps=-5', 'steps=-5 should be a positive int'),
  (RT, 'batch_size=-4', 'batch_size=-4 should be a positive int'),
  (RT, 'checkpoint_every=0', 'checkpoint_every=0 should be a positive int'),
  (RT, 'runlocal,checkpoint_every=0', 'checkpoint_every=0 should be a positive'),
  (RT, 'log_every=-2', 'log_every=-2 should be a positive int'),
  (SMOLLM2, 'log_every=0', 'log_every=0 should be a positive int'),
  (SMOLLM2, 'runlocal,checkpoint_every=-1', 'checkpoint_every=-1 should be a'),
  (DIRS + GLUE, 'batch_size=0', 'batch_size=0 should be a positive int'),
  (SAM, 'log_every=-2', 'log_every=-2 should be a positive int'),
  (SAM, 'runlocal,checkpoint_every=0', 'checkpoint_every=0 should be a positive'),
  (RT, 'eval_limit=-1', 'eval_limit=-1 should be a positive int'),
  (SMOLLM2, 'eval_limit=-1', 'eval_limit=-1 should be a positive int'),
  (SAM, 'eval_limit=-3', 'eval_limit=-3 should be a positive int'),
  # Ranges (common.check_config).
  (RT, 'lr=-1', 'lr=-1.0 should be a finite number > 0'),
  (RT, 'lr=1e400', 'lr=inf should be a finite number > 0'),
  (SMOLLM2, 'lr=-0.001', 'lr=-0.001 should be a finite number > 0'),
  (DIRS + GLUE, 'lr=-2e-5', 'lr=-2e-05 should be a finite number > 0'),
  (SAM, 'lr=-1e400', 'lr=-inf should be a finite number > 0'),
  (RT, 'seed=-1', 'seed=-1 should be an int in [0, 2**31)'),
  (SAM, 'seed=2147483648', 'seed=2147483648 should be an int in [0, 2**31)'),
  (RT, 'checkpoint_minutes=0', 'checkpoint_minutes=0.0 should be a finite number > 0'),
  (DIRS + GLUE, 'checkpoint_minutes=-1', 'checkpoint_minutes=-1.0 should be a'),
  (SMOLLM2, 'checkpoint_minutes=1e400', 'checkpoint_minutes=inf should be a'),
  (DIRS + GLUE, 'nonfinite=never', "nonfinite='never' is unknown; expected one of"),
  (DIRS + GLUE, 'heldout=1.5', 'heldout=1.5 should be a share in [0, 1)'),
  (DIRS + GLUE, 'max_length=-1', 'max_length=-1 should be a positive int'),
  (SAM, 'p=0', 'selection.p=0.0 should be a share in (0, 1]'),
  (SAM, 'method=fisher,p=1.5', 'selection.p=1.5 should be a share in (0, 1]'),
  (SAM, 'score_batches=0', 'selection.batches=0 should be a positive int'),
  # Fields no shipped config takes as an argument.
  (OVERRIDE, 'runlocal;weight_decay=-0.1', 'weight_decay=-0.1 should be a finite'),
  (OVERRIDE, ';weight_decay=1e400', 'weight_decay=inf should be a finite number'),
  (
    OVERRIDE,
    ";weight_decay_mask='hf'",
    "weight_decay_mask='hf' is unknown; expected one of all, hf_trainer",
  ),
  (
    OVERRIDE,
    'runlocal;warmup_steps=5',
    'warmup_steps=5 should be an int in [0, steps=3)',
  ),
  (OVERRIDE, ';warmup_steps=-1', 'warmup_steps=-1 should be an int in [0, steps=500)'),
  (OVERRIDE, ';seed=True', 'seed=True should be an int in [0, 2**31)'),
  (OVERRIDE, ";lr='1e-3'", "lr='1e-3' should be a finite number > 0"),
  (OVERRIDE, ';eval_batch_size=0', 'eval_batch_size=0 should be a positive int'),
  (OVERRIDE, ";factored='yes'", "factored='yes' should be a bool"),
  (OVERRIDE, ';nonfinite=None', 'nonfinite=None should be one of stop, skip'),
  (OVERRIDE, ";checkpoint_minutes='1'", "checkpoint_minutes='1' should be a finite"),
  (OVERRIDE, ';adapters=[]', 'adapters=[] should be a non-empty list of'),
  (OVERRIDE, ";adapters=[('(', 'lora()')]", "adapters: rule 0: pattern '(' is not a"),
  (OVERRIDE, ";adapters=[('.*', 'lroa()')]", "adapters: rule 0 ('.*'): unknown method"),
  (OVERRIDE, ";adapters=[('.*',)]", "adapters: rule 0: ('.*',) is not a (pattern"),
  (
    OVERRIDE,
    'method=adalora,runlocal;steps=10',
    'schedule adalora_schedule total_steps=3 should be steps=10',
  ),
  (
    OVERRIDE,
    ";schedule=('adalora_scheduel', {})",
    "schedule='adalora_scheduel' is unknown (did you mean 'adalora_schedule'?)",
  ),
  (
    OVERRIDE,
    "method=lora_dash;schedule=('lora_dash_schedule', {'warmup_step': 5})",
    "schedule lora_dash_schedule: got an unexpected keyword argument 'warmup_step'",
  ),
  (OVERRIDE, ";schedule='adalora'", "schedule='adalora' should be None or (a"),
  # The config file and the command line.
  ('experiments/configs/nope.py', '', "nope.py' does not exist"),
  ('README.md', '', "'README.md' is not a Python module"),
  ('experiments/configs/common.py', '', 'defines no get_config(arg)'),
  (RT, '', 'unrecognized arguments: --step 3', ['--step', '3']),
]


def config_spec(config: str, arg: str, tmp_path: pathlib.Path) -> str:
  """``--config``'s value for a case: ``DIRS`` made existing dirs (GLUE),
  ``OVERRIDE`` written to ``tmp_path``."""
  if config.startswith(DIRS):
    dirs = tmp_path / 'dirs'
    dirs.mkdir(exist_ok=True)
    config = config.removeprefix(DIRS)
    arg = f'checkpoint={dirs},data_dir={dirs},{arg}'
  if config == OVERRIDE:
    module = tmp_path / OVERRIDE
    module.write_text(OVERRIDE_MODULE)
    config = str(module)
  return f'{config}:{arg}' if arg else config


def case_id(case) -> str:
  config, arg, _, *extra = case
  name = pathlib.Path(config.removeprefix(DIRS)).stem
  return ' '.join([f'{name}:{arg}', *(extra[0] if extra else [])])


def model_loaded(config):
  raise AssertionError('model loaded')


def snapshot(workdir: pathlib.Path) -> dict[str, str]:
  """``{path: sha256 of its bytes, or 'dir'}`` of everything under ``workdir``."""
  return {
    str(path.relative_to(workdir)): (
      'dir' if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    )
    for path in sorted(workdir.rglob('*'))
  }


def test_the_catalogue_is_long_and_has_no_duplicates():
  ids = [case_id(case) for case in CASES]
  assert len(ids) >= 25 and len(set(ids)) == len(ids)


@pytest.mark.parametrize('case', CASES, ids=case_id)
def test_bad_input_is_one_error_line_before_the_model_and_the_workdir(
  case, tmp_path, monkeypatch, capsys
):
  config, arg, named, *extra = case
  monkeypatch.setattr(tasks, 'build', model_loaded)
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('kept as it is\n')
  (workdir / 'config.json').write_text('{"someone": ["else\'s", "run"], "n": 1}\n')
  before = snapshot(workdir)
  argv = ['--config', config_spec(config, arg, tmp_path), '--workdir', str(workdir)]
  assert train.main([*argv, *(extra[0] if extra else [])]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1, err
  assert named in err, err
  assert snapshot(workdir) == before


@pytest.mark.parametrize('case', [c for c in CASES if len(c) == 3], ids=case_id)
def test_get_config_or_check_config_names_each_bad_input(case, tmp_path):
  """The catalogue without the trainer: the config's own checks, then
  ``common.check_config``."""
  config, arg, named = case
  with pytest.raises(pj.PeftError) as info:
    common.check_config(common.load_config(config_spec(config, arg, tmp_path)))
  message = str(info.value)
  assert named in message and '\n' not in message, message


def shipped_args(tmp_path) -> list[tuple[str, str]]:
  """``(config file, argument)``: every method of every shipped config, as
  given and with ``runlocal``, and the other choices each config offers."""
  dirs = f'checkpoint={tmp_path},data_dir={tmp_path}'
  found = []
  for module, path, prefix in [
    (rotten_tomatoes, RT, ''),
    (smollm2_rotten_tomatoes, SMOLLM2, ''),
    (glue, GLUE, f'{dirs},'),
    (sam, SAM, ''),
  ]:
    for method in module.METHODS:
      found += [
        (path, f'{prefix}method={method}{local}') for local in ('', ',runlocal')
      ]
  found += [(GLUE, f'{dirs},task={task}') for task in glue.glue.TASKS]
  found += [(SAM, f'{dirs},task={task},method=sam') for task in ('cola', 'cb')]
  found += [(SAM, 'study=sparsity,scope=global,p=1,method=lt_sft')]
  found += [(SMOLLM2, f'frozen={frozen}') for frozen in tasks.FROZEN_FORMATS]
  found += [(path, 'steps=1') for path in (RT, SMOLLM2, SAM)]
  return found


def test_every_shipped_setting_passes_check_config(tmp_path):
  args = shipped_args(tmp_path)
  assert len(args) > 2 * len(rotten_tomatoes.METHODS)
  for path, arg in args:
    config = common.load_config(f'{path}:{arg}')
    common.check_config(config)
    assert (config.checkpoint_minutes, config.nonfinite) == (1.0, 'stop'), arg
    assert config.checkpoint_every <= config.steps or config.steps < 50, arg


@pytest.mark.parametrize(
  ('path', 'prefix', 'log_every', 'checkpoint_every'),
  [
    (RT, '', 25, 250),
    (SMOLLM2, '', 10, 50),
    (GLUE, 'DIRS', 25, 250),
    (SAM, '', 25, 250),
  ],
)
def test_run_arguments_set_the_fields_and_win_over_runlocal(
  path, prefix, log_every, checkpoint_every, tmp_path
):
  prefix = f'checkpoint={tmp_path},data_dir={tmp_path},' if prefix else ''
  config = common.load_config(f'{path}:{prefix}lr=0')
  assert (config.log_every, config.checkpoint_every) == (log_every, checkpoint_every)
  assert config.lr > 0  # lr=0: the method's default
  local = common.load_config(f'{path}:{prefix}runlocal')
  assert (local.log_every, local.checkpoint_every, local.steps) == (1, 2, 3)
  assert local.data.eval_limit in (8, 32)
  given = (
    'runlocal,log_every=5,checkpoint_every=4,eval_limit=0,checkpoint_minutes=0.5,'
    'nonfinite=skip,steps=20,batch_size=4'
  )
  config = common.load_config(f'{path}:{prefix}{given}')
  assert (config.steps, config.batch_size) == (20, 4)  # not runlocal's 3 and 8
  assert (config.log_every, config.checkpoint_every, config.data.eval_limit) == (
    5,
    4,
    None,
  )
  assert (config.checkpoint_minutes, config.nonfinite) == (0.5, 'skip')
  common.check_config(config)


def test_check_config_reads_missing_fields_as_none_and_optional_ones_as_absent():
  config = common.load_config(f'{RT}:runlocal')
  del config['checkpoint_minutes'], config['nonfinite']
  common.check_config(config)  # a config written before these fields
  config.checkpoint_minutes = None  # no timed checkpoints
  common.check_config(config)
  config.selection = None
  config.schedule = None
  common.check_config(config)
  del config['lr']
  with pytest.raises(pj.PeftError, match=r'^lr=None should be a finite number > 0$'):
    common.check_config(config)
  config = common.load_config(f'{RT}:runlocal')
  config.lr = math.nan
  with pytest.raises(pj.PeftError, match=r'^lr=nan should be a finite number > 0$'):
    common.check_config(config)
  del config['steps']
  with pytest.raises(pj.PeftError, match=r'^steps=None should be a positive int$'):
    common.check_config(config)


def test_warmup_is_a_tenth_of_the_steps_and_fewer_than_them():
  assert [common.warmup_steps(s) for s in (1, 2, 9, 10, 55, 500)] == [0, 1, 1, 1, 5, 50]


def test_compare_names_a_directory_without_results_in_one_line(tmp_path, capsys):
  (tmp_path / 'run').mkdir()
  assert compare.main([str(tmp_path)]) == 2
  assert capsys.readouterr().err == (
    f'error: no */results.json under {tmp_path}: no run has finished\n'
  )
  (tmp_path / 'run' / 'results.json').write_text('{"name": ')
  assert compare.main([str(tmp_path)]) == 2
  assert capsys.readouterr().err == (
    f'error: {tmp_path}/run/results.json is not a results row or list of rows '
    '(rerun that run)\n'
  )
  assert compare.main([str(tmp_path / 'nope')]) == 2
  assert 'is not a directory of runs' in capsys.readouterr().err
