"""Shared config helpers: ``file.py:key=value,...`` arguments, loading, the
meaning of every config field (``FIELDS``), and the checks a config passes
before the trainer loads a model or touches its workdir (``check_config``)."""

import ast
import difflib
import importlib.util
import inspect
import math
import numbers
import pathlib
import re

import ml_collections

import peft_jax as pj
from experiments import selection
from peft_jax import PeftError

# Every field a config may set (nested ones as ``block.field``) -> its meaning,
# one line each: ``python -m experiments.train --config FILE --help`` prints
# them beside the config's values, and a test checks that every field of
# every shipped config is here.
FIELDS = {
  'name': "the run's name (a sweep's subdirectory, the results row)",
  'task': 'the experiments/tasks module that builds model, data, loss, evaluation',
  'method': "the adaptation method (a key of the config module's METHODS)",
  'group': 'the label that seeds.md averages seeds over (default: method)',
  'seed': 'seed of the adapter and head init, dropout and the batch order',
  'seeds': 'adapters trained together, seeds seed, seed+1, ... (one program)',
  'lrs': 'peak learning rates trained together (each seed at each; [] = [lr])',
  'adapters_per_pass': 'adapters per pass of the group step (0: 1 on CPU, else all)',
  'model': 'the pretrained model and how it reads the inputs',
  'model.checkpoint': "the pretrained weights, by name (the task's CHECKPOINTS)",
  'model.checkpoint_dir': 'a local Hugging Face model directory (weights, tokenizer)',
  'model.family': "checkpoint_dir's encoder: bert (BERT/RoBERTa) or deberta (v2/v3)",
  'model.cls_dropout': "dropout before a DeBERTa's classifier (None: its config's)",
  'model.max_length': 'tokens per example (longer inputs are cut)',
  'model.frozen': 'how the frozen weights are stored: float32, bfloat16, int8, int4, '
  "nf4 (pj.quantize, groups of 64) or gguf (the file's own Q4_1/Q8_0 blocks)",
  'model.pooling': "how the encoder's tokens become one vector for the head",
  'model.system': 'the system message of every chat prompt',
  'model.user': "the user turn of every chat prompt ('{text}' is the example)",
  'data': 'the data set and its splits',
  'data.name': "the data set, by name (the task's DATASETS)",
  'data.task': 'the GLUE/SuperGLUE task (peft_jax.data.glue.TASKS)',
  'data.data_dir': 'the TFDS data directory holding the task',
  'data.heldout': 'share of the training data held out as the validation split',
  'data.n_validation': 'examples in the validation split',
  'data.n_test': 'examples in the test split',
  'data.eval_limit': 'evaluate on the first N examples of each split (None: all)',
  'generate': 'greedy answers printed at each evaluation',
  'generate.num_examples': 'test prompts answered (the first ones)',
  'generate.max_new_tokens': 'most tokens generated per answer',
  'adapters': 'ordered (path regex, method spec) rules; the first match wins',
  'selection': 'how a selective method picks its entries (None: not selective)',
  'selection.scorer': 'sam | fisher | magnitude | random | lt_sft',
  'selection.p': 'the share of the scored entries that trains',
  'selection.scope': 'per_leaf (top p of each leaf) or global (of all)',
  'selection.where': 'the scored leaves (regex on leaf names)',
  'selection.batches': 'batches of the training stream scored (sam, fisher)',
  'selection.curvature': "'' | lambda_max | hutchinson (sam)",
  'selection.clip_norm': 'per-batch gradient clipping (sam; 0 = none)',
  'selection.dense_steps': 'lt_sft: steps of the dense run that gives θ1',
  'selection.dense_lr': 'lt_sft: the learning rate of that run',
  'schedule': '(peft_jax.schedules factory, kwargs) run beside training, or None',
  'steps': 'training steps',
  'batch_size': 'training examples per step (split over the data x fsdp devices)',
  'eval_batch_size': 'examples per evaluation batch',
  'lr': 'peak learning rate of AdamW',
  'warmup_steps': 'steps of linear warm-up from 0, then linear decay to 0',
  'weight_decay': "AdamW's decoupled weight decay",
  'weight_decay_mask': "'all' (default) or 'hf_trainer': not biases or norms",
  'factored': 'adapted matmuls as x @ w + (x @ a) @ b, with no merged weight',
  'log_every': 'steps between logged training metrics',
  'eval_every': 'steps between evaluations during training (0: before and after only)',
  'checkpoint_every': 'steps between checkpoints',
  'checkpoint_minutes': 'also checkpoint once this many minutes passed (None: never)',
  'nonfinite': "at a step with a non-finite loss or gradient: 'stop' or 'skip' it",
  'mesh': 'device mesh sizes {axis: size}, under the --mesh flag',
}


def did_you_mean(name: str, choices) -> str:
  """``" (did you mean 'x'?)"`` for the choice closest to ``name``, or ``''``."""
  close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
  return f' (did you mean {close[0]!r}?)' if close else ''


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # A bare word is a string.


# A comma between arguments: not one inside a list (``lrs=[1e-3,2e-3]``).
ARG_SEPARATOR = re.compile(r',(?![^\[\]]*\])')


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``'method=lora,steps=300,runlocal'`` against typed defaults.

  Values are Python literals cast to the default's type; a bare key means
  ``True``; a list keeps its commas (``lrs=[1e-3,2e-3]``). A key without a
  default is an error that lists the known keys.

  Args:
    arg: the text after ``:`` in ``--config file.py:arg`` (or None).
    **defaults: the accepted keys and their default values.

  Returns:
    A ConfigDict of the defaults, updated from ``arg``.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, ARG_SEPARATOR.split(arg or '')):
    key, _, text = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise PeftError(
        f'unknown config argument {key!r}{did_you_mean(key, defaults)}; '
        f'known: {", ".join(sorted(defaults))}'
      )
    value = _literal(text.strip()) if text else True
    kind = type(defaults[key])
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    # A bare key is True, which isinstance counts as an int: not a step count.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
      given = f'{key}={text!r}' if text else f'{key} (bare, so True)'
      raise PeftError(
        f'config argument {given} should be a {kind.__name__} '
        f'(default {defaults[key]!r})'
      )
    parsed[key] = value
  return parsed


def parse_local_arg(
  arg: str | None, local: dict, **defaults
) -> ml_collections.ConfigDict:
  """``parse_arg``, where ``runlocal`` in ``arg`` also changes the defaults
  of ``local``'s keys to its values: a value given in ``arg`` still wins
  (``'runlocal,log_every=5'`` logs every 5 steps)."""
  parsed = parse_arg(arg, **defaults)
  return parse_arg(arg, **{**defaults, **local}) if parsed.runlocal else parsed


# The arguments of several adapters trained as one program
# (``experiments.train_many``), at their one-adapter defaults.
GROUP_ARGS = dict(seeds=1, lrs=[], adapters_per_pass=0)


def set_loop(config: ml_collections.ConfigDict, arg) -> None:
  """The training loop's fields (``set_loop_fields``) and the group's
  (``set_group``), as every config but ``sam.py`` (no groups) takes them."""
  set_loop_fields(config, arg)
  set_group(config, arg)


def set_loop_fields(config: ml_collections.ConfigDict, arg) -> None:
  """``log_every``, ``eval_every``, ``checkpoint_every``,
  ``checkpoint_minutes`` and ``nonfinite`` from the parsed arguments."""
  config.log_every = arg.log_every
  config.eval_every = arg.eval_every
  config.checkpoint_every = arg.checkpoint_every
  config.checkpoint_minutes = arg.checkpoint_minutes
  config.nonfinite = arg.nonfinite


def set_group(config: ml_collections.ConfigDict, arg) -> None:
  """``config.seeds``, ``config.lrs`` and ``config.adapters_per_pass`` from
  the parsed ``GROUP_ARGS``; with ``lrs``, ``config.lr`` is its first rate
  (a single run, ``seeds=1`` and one rate, trains at ``config.lr``)."""
  config.seeds = arg.seeds
  config.lrs = list(arg.lrs)
  config.adapters_per_pass = arg.adapters_per_pass
  if config.lrs:
    config.lr = float(config.lrs[0])


def warmup_steps(steps: int) -> int:
  """A tenth of ``steps`` of warm-up, at least 1 and fewer than ``steps``
  (0 for a one-step run)."""
  return max(0, min(max(1, steps // 10), steps - 1))


def lookup(table: dict, kind: str, name: str):
  """``table[name]``, or a one-line error naming the value and the choices."""
  if name not in table:
    raise PeftError(
      f'{kind}={name!r} is unknown{did_you_mean(name, table)}; '
      f'expected one of {", ".join(table)}'
    )
  return table[name]


def load_module(path: str):
  """Imports a config module from its file path."""
  file = pathlib.Path(path)
  if not file.is_file():
    problem = 'is not a file' if file.exists() else 'does not exist'
    raise PeftError(f'config file {path!r} {problem}')
  if file.suffix != '.py':
    raise PeftError(f'config file {path!r} is not a Python module (FILE.py)')
  spec = importlib.util.spec_from_file_location(f'config_{file.stem}', file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise PeftError(f'config file {path!r} defines no get_config(arg)')
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``'experiments/configs/x.py:method=lora'`` -> ``get_config('method=lora')``."""
  path, _, arg = spec.partition(':')
  return load_module(path).get_config(arg or None)


def flatten(config: ml_collections.ConfigDict, prefix: str = '') -> dict:
  """``{'steps': 500, 'data.eval_limit': None, ...}``: every field of
  ``config``, nested blocks' fields as ``block.field``."""
  fields = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      fields.update(flatten(value, f'{prefix}{key}.'))
    else:
      fields[f'{prefix}{key}'] = value
  return fields


def describe_fields(config: ml_collections.ConfigDict, width: int = 60) -> str:
  """Two lines per field of ``config``: ``name = value`` (the value's repr,
  shortened to ``width``), then its meaning from ``FIELDS``."""
  lines = []
  for name, value in flatten(config).items():
    shown = repr(value)
    shown = shown if len(shown) <= width else shown[: width - 3] + '...'
    lines += [f'  {name} = {shown}', f'      {FIELDS.get(name, "(undocumented)")}']
  return '\n'.join(lines)


# Fields the trainer divides or loops by.
POSITIVE_FIELDS = (
  'steps',
  'batch_size',
  'eval_batch_size',
  'log_every',
  'checkpoint_every',
)
# config.nonfinite: what the trainer does at a step whose loss or gradients
# are not finite.
NONFINITE = ('stop', 'skip')
# Where weight decay acts (experiments.train.decay_mask).
DECAY_MASKS = ('all', 'hf_trainer')
SEED_LIMIT = 2**31  # seeds are in [0, SEED_LIMIT)
SCOPES = ('per_leaf', 'global')  # config.selection.scope


def is_positive_int(value) -> bool:
  """Whether ``value`` is an int > 0 (``True`` is not a step count)."""
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_int(value) -> bool:
  """Whether ``value`` is an int (``True`` is not one)."""
  return isinstance(value, int) and not isinstance(value, bool)


def is_finite(value) -> bool:
  """Whether ``value`` is a finite real number (``True`` is not one)."""
  return (
    isinstance(value, numbers.Real)
    and not isinstance(value, bool)
    and math.isfinite(value)
  )


def _require(ok: bool, name: str, value, expected: str) -> None:
  if not ok:
    raise PeftError(f'{name}={value!r} should be {expected}')


def _choose(choices, name: str, value) -> None:
  """A one-line error unless ``value`` is one of ``choices`` (``lookup``'s)."""
  if not isinstance(value, str):
    raise PeftError(f'{name}={value!r} should be one of {", ".join(choices)}')
  lookup(dict.fromkeys(choices), name, value)


def check_config(config) -> None:
  """Raises a one-line ``PeftError`` naming the first field the trainer
  cannot run with, its value and what is expected. Reads the config only:
  the trainer calls it before it loads the model or touches the workdir.

  Checked: the ``POSITIVE_FIELDS`` (positive ints); ``eval_limit`` (None or
  a positive int); ``lr`` (finite, > 0); ``weight_decay`` (finite, >= 0)
  and ``weight_decay_mask`` (absent, or one of ``DECAY_MASKS``);
  ``warmup_steps`` (an int in ``[0, steps)``); ``seed`` (an int in
  ``[0, 2**31)``); ``seeds`` (a positive int) and ``lrs`` (distinct
  finite numbers > 0; neither with a ``selection``), ``adapters_per_pass``
  (an int >= 0); ``factored`` (a
  bool); ``adapters`` (a non-empty list of rules that ``pj.by_rules``
  accepts); ``schedule`` (None, or a
  ``peft_jax.schedules`` factory and kwargs it takes, whose ``total_steps``
  is ``steps``); ``checkpoint_minutes`` (finite, > 0; None or absent: no
  timed checkpoints); ``eval_every`` (absent, or an int >= 0; > 0 needs a
  validation split: not ``data.heldout = 0``); where the config has them,
  ``nonfinite`` (one of ``NONFINITE``), ``model.max_length``
  (a positive int), ``data.heldout`` (in ``[0, 1)``) and the ``selection``
  block's scorer, ``p`` (in ``(0, 1]``), scope and batches.
  """
  for name in POSITIVE_FIELDS:
    if not is_positive_int(config.get(name)):
      raise PeftError(f'{name}={config.get(name)!r} should be a positive int')
  data, model = config.get('data') or {}, config.get('model') or {}
  limit = data.get('eval_limit')
  if limit is not None and not is_positive_int(limit):
    raise PeftError(
      f'eval_limit={limit!r} should be a positive int, the examples per '
      'evaluation split (all of them: 0 after --config FILE:, None in a config)'
    )
  steps = config.steps
  lr, decay, warmup = (config.get(k) for k in ('lr', 'weight_decay', 'warmup_steps'))
  _require(is_finite(lr) and lr > 0, 'lr', lr, 'a finite number > 0')
  _require(
    is_finite(decay) and decay >= 0, 'weight_decay', decay, 'a finite number >= 0'
  )
  _choose(DECAY_MASKS, 'weight_decay_mask', config.get('weight_decay_mask', 'all'))
  _require(
    is_int(warmup) and 0 <= warmup < steps,
    'warmup_steps',
    warmup,
    f'an int in [0, steps={steps})',
  )
  seed = config.get('seed')
  _require(
    is_int(seed) and 0 <= seed < SEED_LIMIT, 'seed', seed, 'an int in [0, 2**31)'
  )
  _check_group(config)
  factored = config.get('factored')
  _require(isinstance(factored, bool), 'factored', factored, 'a bool')
  minutes = config.get('checkpoint_minutes')  # None or absent: no timed ones
  _require(
    minutes is None or (is_finite(minutes) and minutes > 0),
    'checkpoint_minutes',
    minutes,
    'a finite number > 0',
  )
  if 'nonfinite' in config:
    _choose(NONFINITE, 'nonfinite', config.nonfinite)
  if 'max_length' in model:
    _require(
      is_positive_int(model.max_length),
      'max_length',
      model.max_length,
      'a positive int',
    )
  if 'heldout' in data:
    held = data.heldout
    _require(is_finite(held) and 0 <= held < 1, 'heldout', held, 'a share in [0, 1)')
  _check_eval_every(config.get('eval_every', 0), data)
  _check_adapters(config.get('adapters'))
  _check_schedule(config.get('schedule'), steps)
  _check_selection(config.get('selection'))


def _check_eval_every(every, data) -> None:
  _require(
    is_int(every) and every >= 0,
    'eval_every',
    every,
    'an int >= 0 (0: evaluate before and after training only)',
  )
  if every and data.get('heldout') == 0:
    raise PeftError(
      f'eval_every={every} picks the evaluation with the best validation '
      'metric, and heldout=0 leaves no validation split; hold some out '
      '(heldout=0.1) or pass eval_every=0'
    )


def _check_group(config) -> None:
  seeds, lrs = config.get('seeds', 1), config.get('lrs') or []
  _require(
    is_positive_int(seeds) and config.seed + seeds <= SEED_LIMIT,
    'seeds',
    seeds,
    f'a positive int with seed + seeds <= 2**31 (seed={config.seed})',
  )
  _require(
    isinstance(lrs, list | tuple)
    and all(is_finite(lr) and lr > 0 for lr in lrs)
    and len(set(lrs)) == len(lrs),
    'lrs',
    lrs,
    'a list of distinct finite numbers > 0 (or [] for lr alone)',
  )
  per_pass = config.get('adapters_per_pass', 0)
  _require(
    is_int(per_pass) and per_pass >= 0,
    'adapters_per_pass',
    per_pass,
    'an int >= 0 (0: one per pass on a CPU, all in one pass elsewhere)',
  )
  if (seeds > 1 or lrs) and config.get('selection'):
    raise PeftError(
      f'seeds={seeds}, lrs={list(lrs)} train adapters of one structure together, '
      f'but {config.method} selects other entries per seed: run its seeds apart '
      '(seed=0, seed=1, ...)'
    )


def _check_adapters(adapters) -> None:
  if not isinstance(adapters, list | tuple) or not adapters:
    raise PeftError(
      f'adapters={adapters!r} should be a non-empty list of (path regex, '
      'method spec) rules'
    )
  try:
    pj.by_rules(list(adapters))  # parses every rule's regex and method spec
  except PeftError as e:
    raise PeftError(f'adapters: {e}') from None


def _check_schedule(schedule, steps: int) -> None:
  if not schedule:
    return
  if not (
    isinstance(schedule, list | tuple)
    and len(schedule) == 2
    and isinstance(schedule[0], str)
    and isinstance(schedule[1], dict)
  ):
    raise PeftError(
      f'schedule={schedule!r} should be None or (a peft_jax.schedules factory '
      'name, its kwargs dict)'
    )
  name, kwargs = schedule
  factories = {
    n: f
    for n, f in vars(pj.schedules).items()
    if n.endswith('_schedule') and callable(f)
  }
  factory = lookup(factories, 'schedule', name)
  try:
    inspect.signature(factory).bind(None, **kwargs)
  except TypeError as e:
    raise PeftError(f'schedule {name}: {e}') from None
  total = kwargs.get('total_steps', steps)
  _require(
    total == steps,
    f'schedule {name} total_steps',
    total,
    f'steps={steps}, the length of the run',
  )


def _check_selection(spec) -> None:
  if not spec:
    return
  _choose(selection.SCORERS, 'selection.scorer', spec.get('scorer'))
  p = spec.get('p')
  _require(is_finite(p) and 0 < p <= 1, 'selection.p', p, 'a share in (0, 1]')
  _choose(SCOPES, 'selection.scope', spec.get('scope'))
  batches = spec.get('batches')
  _require(is_positive_int(batches), 'selection.batches', batches, 'a positive int')
