"""The trainer, configs, sweep and comparison.

Fast tests run the trainer on the real configs' rules with the task built on
a tiny random BERT and random tokens (``text_classification.make_task``);
the slow ones train the real MiniLM on the real data.
"""

import functools
import json
import pathlib
import re
import shutil
import time

import jax
import matplotlib.pyplot as plt
import numpy as np
import pytest
import transformers
from safetensors import numpy as safetensors_numpy

import peft_jax as pj
from experiments import compare, sweep, tasks, train
from experiments.configs import common, rotten_tomatoes, smollm2_rotten_tomatoes
from experiments.tasks import glue as glue_task
from experiments.tasks import text_classification
from peft_jax._src import paths
from peft_jax.models import bert

CONFIG = 'experiments/configs/rotten_tomatoes.py'
SMOLLM2 = 'experiments/configs/smollm2_rotten_tomatoes.py'
TINY = bert.BertConfig(
  vocab_size=40,
  hidden_size=16,
  num_layers=2,
  num_heads=2,
  intermediate_size=32,
  max_position_embeddings=32,
  # Dropout on the embeddings, sub-layer outputs and head keeps the training
  # step random (the resumed run must restore the RNG); dropout on the
  # attention probabilities would only double the step's compile time.
  attention_dropout=0.0,
)
SEQ = 12
# Real-model trainings run on one device: the 8 simulated devices share the
# machine's CPU cores (2 in CI), so a mesh only slows them down; the meshes
# are tested on the tiny task.
ONE_DEVICE = {'data': 1}
HEAD = TINY.hidden_size * 2 + 2  # classifier kernel (d, 2) and bias (2,)


def random_split(rng, n: int) -> dict[str, np.ndarray]:
  """Padded random token rows; the label says whether token 7 occurs."""
  ids = rng.integers(1, TINY.vocab_size, (n, SEQ), dtype=np.int32)
  lengths = rng.integers(4, SEQ + 1, n)
  mask = (np.arange(SEQ) < lengths[:, None]).astype(np.int32)
  ids = ids * mask
  return {
    'input_ids': ids,
    'attention_mask': mask,
    'label': np.any(ids == 7, axis=1).astype(np.int32),
  }


def build_tiny(config) -> tasks.Task:
  """The classification task on a tiny random BERT and random tokens."""
  rng = np.random.default_rng(0)
  arrays = {
    name: random_split(rng, n)
    for name, n in [('train', 64), ('validation', 24), ('test', 24)]
  }
  sample = arrays['train']['input_ids'][:1], arrays['train']['attention_mask'][:1]
  encoder = bert.BertModel(TINY).init(jax.random.key(1), *sample)['params']
  return text_classification.make_task(config, TINY, encoder, arrays, 'tiny BERT')


def build_tiny_stopping_at(stop: int, error: type[BaseException] = KeyboardInterrupt):
  """``build_tiny`` whose data raises ``error`` at step ``stop``: a run
  interrupted after the checkpoints before that step."""

  def build(config) -> tasks.Task:
    task = build_tiny(config)

    def train_batch(step):
      if step == stop:
        raise error
      return task.train_batch(step)

    return task._replace(train_batch=train_batch)

  return build


def assert_same_adapter(want_path, got_path, **tolerance) -> None:
  """The two safetensors adapter files hold the same arrays (bit for bit,
  or within ``assert_allclose``'s ``tolerance``)."""
  want = safetensors_numpy.load_file(str(want_path))
  got = safetensors_numpy.load_file(str(got_path))
  assert want.keys() == got.keys()
  for name in want:
    if tolerance:
      np.testing.assert_allclose(got[name], want[name], err_msg=name, **tolerance)
    else:
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.fixture
def tiny_task(monkeypatch):
  monkeypatch.setattr(tasks, 'build', build_tiny)


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory):
  """``(workdir, row)`` of one finished LoRA run on the tiny task, shared by
  the tests that only read it (each run compiles its own training step)."""
  workdir = tmp_path_factory.mktemp('lora_run')
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(tasks, 'build', build_tiny)
    row = train.train_and_evaluate(local_config('lora'), str(workdir))
  return workdir, row


def local_config(method: str = 'lora'):
  return common.load_config(f'{CONFIG}:runlocal,method={method}')


def metric_lines(workdir) -> list[dict]:
  return [
    json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()
  ]


def test_parse_arg_types_and_errors():
  arg = common.parse_arg(
    'method=lora,steps=7,runlocal,lr=1', method='ssb', steps=1, lr=0.0, runlocal=False
  )
  assert (arg.method, arg.steps, arg.lr, arg.runlocal) == ('lora', 7, 1.0, True)
  with pytest.raises(
    pj.PeftError,
    match=r"unknown config argument 'stpes' \(did you mean 'steps'\?\); known: ",
  ):
    common.parse_arg('stpes=3', steps=1)
  with pytest.raises(pj.PeftError, match="steps='many' should be a int"):
    common.parse_arg('steps=many', steps=1)


def minilm_shapes():
  """MiniLM's parameter tree and hook points, abstractly (config file only)."""
  hf_config = transformers.AutoConfig.from_pretrained(bert.minilm_dir())
  model = bert.BertForSequenceClassification(bert.BertConfig.from_hf(hf_config), 2)
  ids = np.zeros((1, 64), np.int32)
  frozen = jax.eval_shape(model.init, jax.random.key(0), ids, ids)['params']
  return frozen, pj.hook_points(model, ids, ids)


def abstract_init(rules, frozen, hooks):
  """``by_rules(rules).init`` on abstract shapes: no FLOPs, every rule checked."""
  init = functools.partial(pj.by_rules(rules).init, hooks=hooks)
  return jax.eval_shape(init, jax.random.key(0), frozen)


def test_new_head_is_model_inits_head_and_encoder_stays_pretrained():
  # The tasks compile the head's init so that XLA draws no random encoder;
  # the head must still be what a plain model.init draws from the seed (the
  # head from_pretrained rebuilds), and every encoder leaf the checkpoint's.
  config = local_config('lora')
  task = build_tiny(config)
  sample = (np.ones((1, SEQ), np.int32),) * 2
  model = bert.BertForSequenceClassification(TINY, num_labels=2, pooling='mean')
  drawn = model.init(jax.random.key(config.seed), *sample)['params']
  assert task.frozen.keys() == {'bert', 'classifier'}
  for name in ('kernel', 'bias'):
    want = drawn['classifier'][name]
    np.testing.assert_array_equal(task.frozen['classifier'][name], want)
  # A checkpoint without a pooler (RoBERTa masked-LM): GLUE's CLS head draws it.
  cls_model = bert.BertForSequenceClassification(TINY, num_labels=3, pooling='cls')
  encoder = bert.BertModel(TINY).init(jax.random.key(1), *sample)['params']
  encoder = {name: tree for name, tree in encoder.items() if name != 'pooler'}
  frozen = glue_task.init_frozen(cls_model, encoder, sample, 5, 'bert')
  drawn = cls_model.init(jax.random.key(5), *sample)['params']
  got, want = (
    paths.flatten(frozen),
    paths.flatten({**drawn, 'bert': {**drawn['bert'], **encoder}}),
  )
  assert got.keys() == want.keys()
  assert any(name.startswith('bert/pooler/') for name in got)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_every_method_config_builds_and_its_rules_match_minilm():
  # Every registered method can run, and the mpc wrapper on LoRA (stacked and
  # matrix_view wrap methods for scanned and N-D kernels, absent here), but
  # the DECODER_ONLY ones (no BERT hook point), which the SmolLM2 config runs;
  # and the two hybrids of pj.recipes.
  decoder_only = set(rotten_tomatoes.DECODER_ONLY)
  expected = set(pj.names()) - decoder_only | {'mpc', 'mam', 'unipelt'}
  assert set(rotten_tomatoes.METHODS) == expected
  assert decoder_only <= set(smollm2_rotten_tomatoes.METHODS)
  frozen, hooks = minilm_shapes()
  for method in rotten_tomatoes.METHODS:
    config = common.load_config(f'{CONFIG}:method={method}')
    assert config.adapters[0] == ('classifier/(kernel|bias)', 'full()')
    params, buffers = abstract_init(config.adapters, frozen, hooks)  # rules match
    assert pj.count(params['classifier']) == 384 * 2 + 2, method
    # The mean-pooled head never calls BERT's pooler: its leaves cannot train.
    assert 'pooler' not in params.get('bert', {}), method
    schedule = train.make_schedule(config, pj.by_rules(config.adapters))
    assert (schedule is None) == (config.schedule is None), method
    if schedule is not None:  # its arguments fit, and it governs these leaves
      jax.eval_shape(schedule.init, frozen, params, buffers)
  with pytest.raises(pj.PeftError, match='does not exist'):
    common.load_config('experiments/configs/nope.py')
  with pytest.raises(ValueError, match="method='nope'"):
    common.load_config(f'{CONFIG}:method=nope')


def test_activation_methods_sit_at_minilm_hook_points():
  frozen, hooks = minilm_shapes()
  d, layers = 384, 6
  prompt = common.load_config(f'{CONFIG}:method=prompt_tuning').adapters
  params, _ = abstract_init(prompt, frozen, hooks)
  assert params['bert']['embeddings']['input_embeddings'].prompt.shape == (10, d)
  houlsby = common.load_config(f'{CONFIG}:method=houlsby').adapters
  params, _ = abstract_init(houlsby, frozen, hooks)
  layer_params = params['bert']['encoder']['layer_3']
  r = d // 16
  for bottleneck in (
    layer_params['attention']['attention_output'],
    layer_params['ffn_output'],
  ):
    assert (bottleneck.down.shape, bottleneck.up.shape) == ((d, r), (r, d))
  # Every LayerNorm is trained: the embeddings' and two per layer.
  norms = [n for n in paths.flatten(params) if 'layer_norm' in n]
  assert len(norms) == 2 * (1 + 2 * layers)


def test_run_writes_everything_and_refuses_a_different_config(
  lora_run, capsys, tiny_task
):
  config = local_config('lora')
  workdir, row = lora_run
  for name in ('config.json', 'describe.txt', 'metrics.jsonl', 'adapter.safetensors'):
    assert (workdir / name).exists(), name
  assert json.loads((workdir / 'results.json').read_text()) == row
  # Head, then LoRA rank 8 on query and value (a (d, 8), b (8, d)) of 2 layers.
  d = TINY.hidden_size
  assert row['trainable_params'] == HEAD + 2 * 2 * (d * 8 + 8 * d)
  frozen = jax.tree.leaves(build_tiny(config).frozen)
  total = sum(x.size for x in frozen)
  assert row['total_params'] == total
  # The step holds at least the frozen weights and LoRA's params with Adam's
  # two moments (float32), plus the activations it keeps for the gradient.
  held = sum(x.nbytes for x in frozen) + 3 * 4 * row['trainable_params']
  assert held < row['step_memory_mib'] * 2**20 < 50 * held
  assert 0 <= row['after_test_accuracy'] <= 1 and 'device' in row and 'date' in row
  # LoRA changes every entry of 2 layers' query and value kernels, and the
  # head; its update's rank is r = 8 (the head is not counted in the rank).
  assert row['changed_params'] == 2 * 2 * d * d + HEAD
  assert row['update_rank'] == 8
  lines = metric_lines(workdir)
  assert [m['step'] for m in lines if 'loss' in m] == [1, 2, 3]
  assert all(np.isfinite(m['loss']) for m in lines if 'loss' in m)
  described = (workdir / 'describe.txt').read_text().splitlines()
  query = next(line for line in described if 'layer_1/attention/query/kernel' in line)
  # trainable 2·d·r, changed d·d (every entry of w), rank r = 8.
  assert 'lora(' in query and query.split()[-3:] == [f'{2 * d * 8}', f'{d * d}', '8']

  # A finished run is reported, not redone.
  assert train.train_and_evaluate(config, str(workdir)) == row
  # A different config never overwrites a run.
  other = local_config('bitfit')
  with pytest.raises(pj.PeftError, match='holds a run with a different config'):
    train.train_and_evaluate(other, str(workdir))
  assert json.loads((workdir / 'results.json').read_text()) == row
  assert (
    train.main(
      ['--config', f'{CONFIG}:runlocal,method=bitfit', '--workdir', str(workdir)]
    )
    == 2
  )
  assert 'error: ' in capsys.readouterr().err


def test_the_adapter_file_describes_the_run(lora_run, tiny_task):
  """The trainer's file records its rules and what the task knows, and
  loads back in one call (``load_adapter_file``)."""
  workdir, row = lora_run
  config = local_config('lora')
  task = build_tiny(config)
  path = str(workdir / 'adapter.safetensors')
  loaded = pj.load_adapter_file(path, task.frozen, task.hooks)
  assert pj.count(loaded.params) == row['trainable_params']
  assert loaded.metadata == {
    **task.adapter_metadata,
    'name': config.name,
    'adapters': pj.serialize_rules(config.adapters),
    'format_version': 1,
    'peft_jax_version': loaded.metadata['peft_jax_version'],
  }
  assert task.adapter_metadata == {
    'task': 'text_classification',
    'base_model': 'minilm',
    'tokenizer': 'minilm',
    'head': {
      'kind': 'sequence_classification',
      'num_labels': 2,
      'pooling': 'mean',
      'seed': config.seed,
    },
    'labels': ['rotten', 'fresh'],
    'max_length': config.model.max_length,
  }


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_adapter(
  lora_run, tmp_path, monkeypatch, tiny_task
):
  check_resume(lora_run, tmp_path, monkeypatch)


def check_resume(lora_run, tmp_path, monkeypatch):
  config = local_config('lora')
  straight_dir, _ = lora_run
  monkeypatch.setattr(tasks, 'build', build_tiny_stopping_at(2))
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert not (tmp_path / 'resumed' / 'results.json').exists()
  monkeypatch.setattr(tasks, 'build', build_tiny)
  train.train_and_evaluate(config, str(tmp_path / 'resumed'))

  assert_same_adapter(
    straight_dir / 'adapter.safetensors', tmp_path / 'resumed/adapter.safetensors'
  )


def test_a_run_resumed_at_its_last_step_times_no_step(lora_run, tmp_path, tiny_task):
  """Stopped after the last checkpoint, before its results: the rerun only
  evaluates, and its row says it timed no step (not 0 ms per step)."""
  straight_dir, row = lora_run
  again = tmp_path / 'again'
  shutil.copytree(straight_dir, again)
  (again / 'results.json').unlink()
  rerun = train.train_and_evaluate(local_config('lora'), str(again))
  assert rerun['ms_per_step'] is None and rerun['train_seconds'] == 0
  assert rerun['after_test_accuracy'] == row['after_test_accuracy']
  table = compare.markdown_table([rerun])
  assert '| – |' in table


@pytest.mark.slow
def test_scheduled_and_non_mergeable_methods_train_through_the_trainer(
  tmp_path, tiny_task
):
  for method in ('adalora', 'parallel_adapter'):
    config = local_config(method)
    row = train.train_and_evaluate(config, str(tmp_path / method))
    assert row['method'] == method and row['trainable_params'] > HEAD
    assert 0 <= row['after_test_accuracy'] <= 1
  assert local_config('adalora').schedule[0] == 'adalora_schedule'
  # The schedule ran: the last update (t = 3 > T - t_f = 2) masked e down to
  # the final budget, target rank 4 x 4 matrices (query, value of 2 layers).
  params, _, _ = pj.load_adapter(str(tmp_path / 'adalora/adapter.safetensors'))
  es = [v for n, v in paths.flatten(params).items() if n.endswith('/e')]
  assert len(es) == 4 and sum(int(np.sum(e != 0)) for e in es) == 4 * 4


@pytest.mark.slow
def test_sweep_trains_activation_adapters_and_writes_the_comparison(
  tmp_path, tiny_task
):
  only = {'prompt_tuning', 'houlsby'}
  table = sweep.run_sweep(f'{CONFIG}:runlocal', str(tmp_path), only=only)
  assert (tmp_path / 'comparison.png').stat().st_size > 10_000
  assert (tmp_path / 'comparison.md').read_text() == table
  assert table.splitlines()[0].startswith(
    '2 runs of minilm on rotten_tomatoes, 3 steps of batch 8, the first 32 '
  )
  assert table.splitlines()[2].startswith('| method | trainable |')
  d, layers = TINY.hidden_size, TINY.num_layers
  r = max(1, d // 16)
  norms = 2 * d * (1 + 2 * layers)  # LayerNorm scale, bias: embeddings', 2 a layer
  rows = compare.load_rows(tmp_path)
  assert [(row['method'], row['trainable_params']) for row in rows] == [
    ('prompt_tuning', HEAD + 10 * d),  # fewest params first
    ('houlsby', HEAD + 2 * layers * (2 * d * r + r + d) + norms),
  ]
  for name in ('rotten_tomatoes_prompt_tuning', 'rotten_tomatoes_houlsby'):
    losses = [m['loss'] for m in metric_lines(tmp_path / name) if 'loss' in m]
    assert len(losses) == 3 and np.all(np.isfinite(losses)), name
  describe = (tmp_path / 'rotten_tomatoes_houlsby/describe.txt').read_text()
  assert 'bert/encoder/layer_1/ffn_output' in describe and 'houlsby(' in describe
  params, buffers, metadata = pj.load_adapter(
    str(tmp_path / 'rotten_tomatoes_prompt_tuning/adapter.safetensors')
  )
  assert params['bert']['embeddings']['input_embeddings']['prompt'].shape == (10, d)
  assert buffers == {} and metadata['name'] == 'rotten_tomatoes_prompt_tuning'


def test_sweep_only_with_a_name_it_does_not_run_stops_before_training(tmp_path, capsys):
  """A misspelt method must not be dropped silently while the rest trains."""
  args = ['--config', f'{CONFIG}:runlocal', '--workdir', str(tmp_path)]
  assert sweep.main([*args, '--only', 'lora,ia4']) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1
  assert "--only names 'ia4' (did you mean 'ia3'?), not in the sweep of" in err
  assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written


def test_help_with_a_config_lists_its_fields_values_and_meanings(capsys):
  with pytest.raises(SystemExit) as exit_info:
    train.main(['--config', f'{CONFIG}:method=lora,steps=7', '--help'])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert '--workdir' in out and 'Arguments (after ``:``)' in out  # its docstring
  assert f'  steps = 7\n      {common.FIELDS["steps"]}\n' in out
  assert f"  method = 'lora'\n      {common.FIELDS['method']}\n" in out
  assert f'  data.eval_limit = None\n      {common.FIELDS["data.eval_limit"]}' in out


# Configs that need a checkpoint dir (with a config.json) and a data dir.
LOCAL_DIR_CONFIGS = ('glue', 'see_further')


def shipped_configs(tmp_path) -> dict[str, list[str]]:
  """``{config file: [get_config args]}``: every method of every shipped
  config (those of ``LOCAL_DIR_CONFIGS`` with ``tmp_path`` as their
  checkpoint, a DeBERTa-v2 config.json in it, and data dir)."""
  transformers.DebertaV2Config().save_pretrained(tmp_path)
  dirs = f'checkpoint={tmp_path},data_dir={tmp_path},'
  found = {}
  for path in sorted(pathlib.Path('experiments/configs').glob('*.py')):
    if 'def get_config' in path.read_text():
      module = common.load_module(str(path))
      prefix = dirs if path.stem in LOCAL_DIR_CONFIGS else ''
      found[str(path)] = [f'{prefix}method={m}' for m in module.METHODS]
  return found


def test_every_field_of_every_shipped_config_has_a_meaning(tmp_path):
  configs = shipped_configs(tmp_path)
  assert len(configs) == 6 and len(configs[CONFIG]) == len(rotten_tomatoes.METHODS)
  undocumented = set()
  for path, args in configs.items():
    module = common.load_module(path)
    for arg in args:
      fields = common.flatten(module.get_config(arg))
      undocumented |= {f'{path}:{arg} {f}' for f in fields if f not in common.FIELDS}
  assert not undocumented, 'add their meanings to common.FIELDS'


@pytest.mark.parametrize(
  ('argv', 'named'),
  [
    (
      ['--config', f'{SMOLLM2}:method=qlora'],
      "method='qlora' is unknown (did you mean 'lora'?); expected one of lora,",
    ),
    (['--config', 'experiments/configs/nope.py'], "nope.py' does not exist"),
    (['--config', 'README.md'], "'README.md' is not a Python module"),
    (['--config', 'experiments/configs/common.py'], 'defines no get_config(arg)'),
    (['--config', f'{CONFIG}:steps=many'], "config argument steps='many' should"),
    (['--config', f'{CONFIG}:steps'], 'config argument steps (bare, so True)'),
    (['--config', f'{CONFIG}:stesp=3'], "'stesp' (did you mean 'steps'?)"),
    (['--config', f'{CONFIG}:steps=0'], 'steps=0 should be a positive int'),
    (['--config', f'{CONFIG}:steps=-5'], 'steps=-5 should be a positive int'),
    (['--config', f'{CONFIG}:batch_size=0'], 'batch_size=0 should be a positive'),
    (['--config', f'{CONFIG}:eval_limit=-3'], 'eval_limit=-3 should be a positive'),
    (['--config', f'{CONFIG}:eval_limit=2.5'], "eval_limit='2.5' should be a int"),
    (['--config', f'{CONFIG}', '--step', '3'], 'unrecognized arguments: --step 3'),
  ],
)
def test_a_bad_argument_is_one_error_line_naming_it(argv, named, tmp_path, capsys):
  workdir = tmp_path / 'run'
  assert train.main([*argv, '--workdir', str(workdir)]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1 and named in err, err
  assert not workdir.exists()


def test_a_limited_run_says_so_and_times_its_steps_without_the_compile(
  tmp_path, monkeypatch, capsys, tiny_task
):
  """``eval_limit`` cuts both evaluations (the tiny splits have 24 examples)
  and the row says so; every step is waited for; ``train_seconds`` leaves
  out the step's compile, here made to take a second longer."""
  compile_step = jax.stages.Lowered.compile
  slow_compile = lambda lowered: time.sleep(1.0) or compile_step(lowered)
  monkeypatch.setattr(jax.stages.Lowered, 'compile', slow_compile)
  block, waited = jax.block_until_ready, []
  monkeypatch.setattr(jax, 'block_until_ready', lambda x: waited.append(x) or block(x))
  config = local_config('lora')
  config.data.eval_limit = 10
  row = train.train_and_evaluate(config, str(tmp_path))
  assert row['eval_limit'] == 10
  for key in ('validation', 'test'):
    assert row[f'before_{key}_examples'] == row[f'after_{key}_examples'] == 10
  assert 'evaluating validation' in capsys.readouterr().err  # the progress bar
  losses = [x for x in waited if isinstance(x, jax.Array) and x.shape == ()]
  assert len(losses) == config.steps
  assert row['compile_seconds'] > 1.0 > row['train_seconds']
  assert row['ms_per_step'] == pytest.approx(1000 * row['train_seconds'] / 3)
  assert (row['model'], row['dataset'], row['seed']) == ('minilm', 'rotten_tomatoes', 0)


def synthetic_row(method: str, seed: int, steps: int = 100, model: str = 'minilm'):
  """A results row as ``train.results_row`` writes it (the fields compare
  reads), accuracy 0.7 + seed / 100."""
  accuracy = 0.7 + seed / 100
  return {
    'name': f'rotten_tomatoes_{method}',
    'task': 'text_classification',
    'model': model,
    'dataset': 'rotten_tomatoes',
    'method': method,
    'seed': seed,
    'trainable_params': {'lora': 74_498, 'ssb': 21_506}[method],
    'trainable_percent': 0.3,
    'steps': steps,
    'batch_size': 32,
    'eval_limit': None,
    **{f'before_{s}_accuracy': 0.5 for s in ('validation', 'test')},
    **{f'after_{s}_accuracy': accuracy for s in ('validation', 'test')},
    'metric': 'accuracy',
    'ms_per_step': 700.0,
    'device': 'cpu:cpu x1',
    'cpu_count': '2',
    'jax': '0.10.2',
    'date': '2026-12-01 10:00 UTC',
  }


def test_compare_tables_each_setting_apart_and_says_what_it_is(tmp_path):
  rows = {
    'lora_0': synthetic_row('lora', 0),
    'lora_1': synthetic_row('lora', 1),
    'ssb_0': synthetic_row('ssb', 0),
    'ssb_1': synthetic_row('ssb', 1),
    'lora_300_steps': synthetic_row('lora', 0, steps=300),
    'smollm2_lora': synthetic_row('lora', 0, model='smollm2'),
  }
  for name, row in rows.items():
    (tmp_path / name).mkdir()
    (tmp_path / name / 'results.json').write_text(json.dumps(row))
  text = compare.write_comparison(tmp_path)
  written = (tmp_path / 'comparison.md').read_text()
  assert text.startswith(written)  # then the seed summary
  tables = re.split(r'\n(?=\d+ runs? of )', written)
  heads = [table.splitlines()[0] for table in tables]
  assert heads == [
    '4 runs of minilm on rotten_tomatoes, 100 steps of batch 32, every '
    'evaluation example, seeds 0, 1 (comparison_1.png)',
    '1 run of minilm on rotten_tomatoes, 300 steps of batch 32, every '
    'evaluation example, seed 0 (comparison_2.png)',
    '1 run of smollm2 on rotten_tomatoes, 100 steps of batch 32, every '
    'evaluation example, seed 0 (comparison_3.png)',
  ]
  runs = [sum(x.startswith(('| lora', '| ssb')) for x in t.split('\n')) for t in tables]
  assert runs == [4, 1, 1]
  assert '\n300 steps, batch 32; measured on cpu:cpu x1 (2 CPUs)' in tables[1]
  for number in (1, 2, 3):
    assert (tmp_path / f'comparison_{number}.png').stat().st_size > 10_000
  # Several seeds only in the first setting: its seed table, numbered.
  assert (tmp_path / 'seeds_1.md').exists() and not (tmp_path / 'seeds_2.md').exists()
  assert '| lora | 2 |' in (tmp_path / 'seeds_1.md').read_text()


def test_comparison_plot_is_titled_by_model_steps_and_seeds():
  rows = [synthetic_row(m, seed) for m in ('ssb', 'lora') for seed in (0, 1, 2)]
  fig = compare.figure(rows)
  (ax,) = fig.axes
  assert ax.get_title() == 'minilm on rotten_tomatoes: 100 steps, 3 seeds'
  assert [text.get_text() for text in ax.texts] == ['ssb', 'lora']  # once each
  plt.close(fig)


# ---------------------------------------------------------------------------
# The real MiniLM on the real data.


def losses_of(workdir) -> list[float]:
  return [m['loss'] for m in metric_lines(workdir) if 'loss' in m]


@pytest.mark.slow
def test_real_minilm_loss_falls_in_a_few_dozen_steps(tmp_path):
  config = common.load_config(f'{CONFIG}:steps=40')
  config.log_every, config.data.eval_limit = 1, 200
  row = train.train_and_evaluate(config, str(tmp_path), ONE_DEVICE)
  # Head, then SSB on key, value (384 + 384 each) and FFN-in (384 + 1536).
  assert row['trainable_params'] == 384 * 2 + 2 + 6 * (2 * (384 + 384) + 384 + 1536)
  losses = losses_of(tmp_path)
  assert len(losses) == 40
  assert np.mean(losses[-10:]) < np.mean(losses[:5]) - 0.05, losses
  assert row['after_validation_accuracy'] > row['before_validation_accuracy'] + 0.1


def fixed_set_loss(task, tree, params, buffers) -> float:
  """Mean loss (no dropout) on 256 fixed training examples, batches 1000-1007
  (past the steps trained)."""
  loss = jax.jit(pj.adapted(tree, task.loss_fn, factored=True))
  batches = [task.train_batch(step) for step in range(1000, 1008)]
  return float(
    np.mean([loss(task.frozen, params, buffers, b, None)[0] for b in batches])
  )


@pytest.mark.slow
def test_real_minilm_trains_prompt_tuning_and_houlsby(tmp_path):
  hf_config = transformers.AutoConfig.from_pretrained(bert.minilm_dir())
  d, layers = hf_config.hidden_size, hf_config.num_hidden_layers
  r = d // 16
  head = d * 2 + 2
  expected = {
    'prompt_tuning': head + 10 * d,
    # Two bottlenecks a layer; LayerNorm scale and bias: embeddings', 2 a layer.
    'houlsby': head + 2 * layers * (2 * d * r + r + d) + 2 * d * (1 + 2 * layers),
  }
  for method, trainable in expected.items():
    config = common.load_config(f'{CONFIG}:method={method},steps=30')
    config.data.eval_limit = 64
    row = train.train_and_evaluate(config, str(tmp_path / method), ONE_DEVICE)
    saved = json.loads((tmp_path / method / 'results.json').read_text())
    assert saved['trainable_params'] == row['trainable_params'] == trainable, method
    # The loss on fixed examples falls from the fresh adapter to the trained one.
    run = train.setup(config, tmp_path / method, train.make_mesh(config, ONE_DEVICE))
    task, tree, fresh = run.task, run.tree, train.initial_state(run)
    params, buffers, _ = pj.load_adapter(
      str(tmp_path / method / 'adapter.safetensors'), like=(fresh.params, fresh.buffers)
    )
    before = fixed_set_loss(task, tree, fresh.params, fresh.buffers)
    after = fixed_set_loss(task, tree, params, buffers)
    assert after < before - 0.04, (method, before, after)


def test_bad_meshes_are_one_line_errors_before_anything_is_written(
  tmp_path, capsys, monkeypatch
):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda: calls.append('init'))
  argv = ['--config', f'{CONFIG}:runlocal', '--workdir', str(tmp_path / 'd')]
  assert train.main([*argv, '--distributed', '--mesh', 'data=16']) == 2
  assert calls == ['init']  # --distributed joins the cluster before anything else
  capsys.readouterr()
  for mesh, message in [
    ('model=2', "mesh axis 'model' is unknown"),
    ('data=16', 'does not fit 8 devices'),
    ('data=two', "'data=two' is not an integer"),
  ]:
    workdir = tmp_path / mesh
    argv = ['--config', f'{CONFIG}:runlocal', '--workdir', str(workdir), '--mesh', mesh]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and message in err and err.count('\n') == 1
  config = local_config('lora')  # batch_size 8
  config.batch_size = 12
  with pytest.raises(
    pj.PeftError, match=r'batch_size=12 does not split over data x fsdp = 8'
  ):
    train.make_mesh(config)
  config.mesh = {'data': 2, 'tensor': 4}  # 12 rows split over 2
  assert dict(train.make_mesh(config).shape) == {'data': 2, 'fsdp': 1, 'tensor': 4}
  assert dict(train.make_mesh(config, {'tensor': 2, 'fsdp': 2}).shape) == {
    'data': 2,
    'fsdp': 2,
    'tensor': 2,
  }


@pytest.mark.slow
def test_a_run_on_a_2d_mesh_resumes_on_fsdp_and_matches_data_parallel(
  lora_run, tmp_path, monkeypatch
):
  """The same LoRA training on (data 2, fsdp 2, tensor 2), interrupted after
  its step-2 checkpoint and resumed with the weights split 8 ways on fsdp,
  ends with the adapter of the data-parallel run (``lora_run``, 8 devices on
  ``data``), up to float reduction order."""
  straight_dir, straight_row = lora_run
  workdir = tmp_path / 'meshes'
  config = local_config('lora')
  monkeypatch.setattr(tasks, 'build', build_tiny_stopping_at(2))
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(workdir), {'data': 2, 'fsdp': 2, 'tensor': 2})
  monkeypatch.setattr(tasks, 'build', build_tiny)
  row = train.train_and_evaluate(config, str(workdir), {'data': 1, 'fsdp': 8})
  assert (
    row['mesh'] == 'data=1,fsdp=8,tensor=1'
    and straight_row['mesh'] == 'data=8,fsdp=1,tensor=1'
  )
  assert_same_adapter(
    straight_dir / 'adapter.safetensors',
    workdir / 'adapter.safetensors',
    rtol=1e-5,
    atol=1e-6,
  )


def test_a_config_json_cannot_record_fails_before_anything_is_written(
  tmp_path, tiny_task
):
  config = local_config('lora')
  config.adapters = [(lambda name, leaf: name.endswith('kernel'), 'lora(rank=2)')]
  with pytest.raises(pj.PeftError, match=r"JSON cannot record .*'function'"):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
