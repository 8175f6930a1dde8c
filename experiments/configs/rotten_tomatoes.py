r"""Fine-tune MiniLM-L6 (all-MiniLM-L6-v2) on Rotten Tomatoes fresh/rotten snippets.

The default experiment (``make demo``): SSB, the paper's new method, on the
key, value and FFN-intermediate kernels (the (IA)³ placement the paper's
budgets imply), plus a fully trained classification head on the mean-pooled
encoder output. Real weights and real data, both offline.

  python -m experiments.train \
      --config experiments/configs/rotten_tomatoes.py --workdir runs/rt_ssb
  python -m experiments.train \
      --config experiments/configs/rotten_tomatoes.py:method=lora,steps=600 \
      --workdir runs/rt_lora

Arguments (after ``:``): method (one of METHODS), steps, batch_size, lr
(0 = the method's default below), seed, runlocal (a few steps on a few
examples, for smoke tests). The sweep over all methods:

  python -m experiments.sweep \
      --config experiments/configs/rotten_tomatoes.py --workdir runs/rt_sweep
"""

import ml_collections

from experiments.configs import common

KV_FFN1 = '.*/(attention/(key|value)|intermediate)/kernel'
QV = '.*/attention/(query|value)/kernel'

# method -> (rules for the encoder, default learning rate)
METHODS = {
  'lora': ([(QV, 'lora(rank=8, alpha=16)')], 2e-3),
  'ia3': ([(KV_FFN1, 'ia3()')], 1e-2),
  'ssl': ([(KV_FFN1, 'ssl()')], 1e-2),
  'ssb': ([(KV_FFN1, 'ssb()')], 1e-2),
  'bitfit': ([('bert/.*/bias', 'bitfit()')], 5e-3),
  'full': ([('bert/.*', 'full()')], 1e-4),
}


def get_config(arg=None):
  """The run config; ``arg`` is e.g. ``'method=lora,steps=300'``."""
  arg = common.parse_arg(
    arg, method='ssb', steps=500, batch_size=32, lr=0.0, seed=0, runlocal=False
  )
  if arg.method not in METHODS:
    raise ValueError(f'method={arg.method!r}; expected one of {", ".join(METHODS)}')
  encoder_rules, default_lr = METHODS[arg.method]

  config = ml_collections.ConfigDict()
  config.name = f'rotten_tomatoes_{arg.method}'
  config.task = 'text_classification'
  config.seed = arg.seed
  config.model = dict(checkpoint='minilm', pooling='mean', max_length=64)
  config.data = dict(
    name='rotten_tomatoes', n_validation=1000, n_test=1000, eval_limit=0
  )
  # First match wins: the head is trained in full by every method.
  config.adapters = [('classifier/(kernel|bias)', 'full()'), *encoder_rules]
  config.method = arg.method
  config.steps = arg.steps
  config.batch_size = arg.batch_size
  config.eval_batch_size = 250
  config.lr = arg.lr or default_lr
  # Adapted matmuls in factored form: no w' and no weight gradient (SSB's
  # step takes ~0.6x the weight-space time on a 2-core CPU).
  config.factored = True
  config.warmup_steps = max(1, arg.steps // 10)
  config.weight_decay = 0.0  # Decay would pull SSB/(IA)³ scales towards 0.
  config.log_every = 25
  config.checkpoint_every = 250

  if arg.runlocal:
    config.steps, config.batch_size, config.eval_batch_size = 3, 8, 16
    config.warmup_steps, config.log_every, config.checkpoint_every = 1, 1, 2
    config.data.eval_limit = 32
  return config


def sweep(arg=None):
  """One run per method, same task, same steps: the comparison table."""
  del arg
  return [f'method={method}' for method in METHODS]
