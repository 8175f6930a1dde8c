r"""GLUE and SuperGLUE tasks on RoBERTa-base, from TFDS data.

The SAM paper's (Fu et al., AAAI 2023) CoLA, STS-B, MRPC, RTE (GLUE) and CB,
COPA, WSC (SuperGLUE), the rest of GLUE (SST-2, QQP, QNLI, MNLI) and BoolQ
(SuperGLUE), scored by jiant's default metric (``after_test_score``; MNLI's
mismatched dev split also gives ``after_test_mismatched_score``; see
``peft_jax.data.glue``).
Nothing is downloaded: ``checkpoint`` is a local Hugging Face RoBERTa-base
directory (``config.json``, ``model.safetensors``, tokenizer files) and
``data_dir`` a TFDS data dir (default ``$TFDS_DATA_DIR``) holding the task
prepared as ``array_record``:

  tfds build glue/rte --file_format=array_record --data_dir=/data/tfds
  DIRS=checkpoint=/models/roberta-base,data_dir=/data/tfds
  python -m experiments.train \
      --config experiments/configs/glue.py:task=rte,method=lora,$DIRS \
      --workdir runs/glue_rte_lora

``tfds build`` needs TensorFlow, once, on any machine (then copy the dir);
the TFDS names are ``glue/{cola,sst2,mrpc,qqp,stsb,mnli,qnli,rte}`` and
``super_glue/{boolq,cb,copa,wsc.fixed}``. Splits follow the SAM code: TFDS
``validation`` (MNLI: ``validation_matched``, and ``validation_mismatched``
as ``test_mismatched``) is the test split, ``heldout`` of TFDS ``train`` the
validation split. The comparison over methods on one task:

  python -m experiments.sweep --config experiments/configs/glue.py:task=cb,$DIRS \
      --workdir runs/glue_cb_sweep

Arguments (after ``:``): task, method (any of ``rotten_tomatoes.METHODS``,
with its placement and default learning rate), checkpoint, data_dir, steps,
batch_size, lr (0 = the method's default), max_length (0 = 128, CB and
BoolQ 256), heldout, seed, eval_limit (evaluate on the first N examples of
each split; 0 = all), log_every (steps between logged metrics, default 25),
checkpoint_every (steps between checkpoints, default 250),
checkpoint_minutes (also checkpoint once this many minutes passed since the
last checkpoint, default 1.0), nonfinite (``stop``, the default, or
``skip``: what a step with a non-finite loss or gradient does), seeds and
lrs (train seeds seed..seed+seeds-1 at each learning rate of the list, e.g.
``lrs=[1e-3,3e-3]``, as one program: experiments/train_many.py; adapters_per_pass=K runs
them K at a time inside it; 0 = 1 on a CPU, all at once elsewhere), runlocal
(a few steps on a few examples; it changes the defaults of steps, batch_size,
eval_limit, log_every and checkpoint_every to 3, 8, 32, 1 and 2; a value
given explicitly wins).
"""

import os

import ml_collections

from experiments.configs import common, rotten_tomatoes
from peft_jax import PeftError
from peft_jax.data import glue

METHODS = rotten_tomatoes.METHODS
# The head, trained in full by every method: the classifier and the pooler
# (new in RoBERTa-base, which ships none), jiant's dense + tanh + out_proj.
HEAD = '(classifier|bert/pooler/dense)/(kernel|bias)'
# The SAM paper's comparison, as far as the methods are registered.
PAPER_METHODS = ('full', 'bitfit', 'lora', 'houlsby', 'sparse', 'sam')
# CB premises are long dialogue turns; BoolQ passages are Wikipedia paragraphs
# (about 110 words on average; pairs truncate the longer segment, the passage).
MAX_LENGTH = {'cb': 256, 'boolq': 256}


def require_dir(name: str, path: str, hint: str) -> str:
  """``path`` made absolute, or a one-line error if it is not a directory."""
  if not path:
    raise PeftError(f'{name}= is required: {hint}')
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise PeftError(f'{name}={path!r} is not a directory: {hint}')
  return path


def paths(arg) -> tuple[str, str]:
  """The checkpoint dir and the TFDS data dir, both checked."""
  checkpoint = require_dir(
    'checkpoint',
    arg.checkpoint,
    'a local Hugging Face checkpoint dir (config.json, model.safetensors, '
    'tokenizer files); nothing is downloaded',
  )
  data_dir = require_dir(
    'data_dir',
    arg.data_dir or os.environ.get('TFDS_DATA_DIR', ''),
    'a TFDS data dir with the task prepared as array_record (see this '
    "config's docstring), or set $TFDS_DATA_DIR",
  )
  return checkpoint, data_dir


def get_config(arg=None):
  """The run config; ``arg`` is e.g. ``'task=rte,method=lora,checkpoint=...'``."""
  arg = common.parse_local_arg(
    arg,
    rotten_tomatoes.LOCAL,
    task='rte',
    method='lora',
    checkpoint='',
    data_dir='',
    steps=1000,
    batch_size=16,
    lr=0.0,
    max_length=0,
    heldout=0.1,
    seed=0,
    eval_limit=0,
    log_every=25,
    eval_every=0,
    checkpoint_every=250,
    checkpoint_minutes=1.0,
    nonfinite='stop',
    runlocal=False,
    **common.GROUP_ARGS,
  )
  common.lookup(glue.TASKS, 'task', arg.task)
  encoder_rules, default_lr = common.lookup(METHODS, 'method', arg.method)
  checkpoint, data_dir = paths(arg)

  config = ml_collections.ConfigDict()
  config.name = f'glue_{arg.task}_{arg.method}'
  config.task = 'glue'
  config.seed = arg.seed
  max_length = arg.max_length or MAX_LENGTH.get(arg.task, 128)
  config.model = dict(checkpoint_dir=checkpoint, max_length=max_length)
  config.data = dict(
    task=arg.task,
    data_dir=data_dir,
    heldout=arg.heldout,
    eval_limit=arg.eval_limit or None,
  )
  config.adapters = [(HEAD, 'full()'), *encoder_rules]
  config.method = arg.method
  config.schedule = rotten_tomatoes.schedule_for(arg.method, arg.steps)
  config.steps = arg.steps
  config.batch_size = arg.batch_size  # jiant's and the SAM script's
  config.eval_batch_size = 64
  config.lr = arg.lr or default_lr
  config.factored = True
  config.warmup_steps = common.warmup_steps(arg.steps)
  config.weight_decay = 0.0
  common.set_loop(config, arg)

  if arg.runlocal:
    config.eval_batch_size = 16
    config.model.max_length = min(max_length, 64)
  return config


def sweep(arg=None):
  """One run per method of the paper's comparison that is registered."""
  del arg
  return [f'method={m}' for m in PAPER_METHODS if m in METHODS]
