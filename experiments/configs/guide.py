r"""The guide's head-to-head (Lialin et al., "Scaling Down to Scale Up"), one config.

The protocol of the coauthors' comparison repo (``xw-yao/peft_comparison``,
the guide's §2.4): 15 PEFT configurations under the repo's names
(``COMPARED``) plus full fine-tuning as the reference, each trained at every
rate of the learning-rate grid ``LEARNING_RATES`` with ``SEEDS`` seeds,
AdamW with weight decay 0.1, batch 32 and a short budget. Every method is
one group program (experiments/train_many.py): its 3 seeds × 5 rates = 15
adapters train together, so a sweep is 16 programs.

By default on what ships offline, MiniLM-L6 × Rotten Tomatoes (the model
and data of ``rotten_tomatoes.py``):

  python -m experiments.sweep \
      --config experiments/configs/guide.py --workdir runs/guide

and on the paper's SuperGLUE tasks with ``task=rte|copa|boolq``, a local
RoBERTa-base dir and a TFDS data dir holding the task (``glue.py``'s task;
its docstring says how to prepare them):

  DIRS=checkpoint=/models/roberta-base,data_dir=/data/tfds
  python -m experiments.sweep \
      --config experiments/configs/guide.py:task=boolq,$DIRS \
      --workdir runs/guide_boolq

One method, here the repo's first stage (the grid at seed 0; ``lrs=[1e-3]``
is a single rate):

  python -m experiments.train \
      --config experiments/configs/guide.py:method=hf_lora,seeds=1 \
      --workdir runs/guide_hf_lora

The sweep resumes where it stopped; ``experiments.compare`` writes
``comparison.md`` and, per method and rate (the rows' ``group``, e.g.
``hf_lora lr=0.001``), the mean ± std over seeds in ``seeds.md``.

Arguments (after ``:``): task (``TASKS``), checkpoint and data_dir (the
SuperGLUE tasks; data_dir defaults to ``$TFDS_DATA_DIR``), method (a key of
``METHODS``), steps (0 = the task's budget below), batch_size, seed (the
first seed), seeds (default 3), lrs (default the guide's grid), eval_limit
(the first N examples of each evaluation split; 0 = all), adapters_per_pass
(``train_many``'s; 0 = 1 on a CPU, all at once elsewhere), log_every,
checkpoint_every, checkpoint_minutes, nonfinite (default ``skip``: one
diverging rate does not stop the other 14 adapters of its group; a row
counts its skipped steps) and runlocal (a few steps on a few examples), as
in ``rotten_tomatoes.py``.

The budget: the repo's 3 epochs at total batch 32 (RTE, COPA and BoolQ
alike; the guide quotes it for BoolQ), at least 100 steps (its
``--min_train_steps 100``, read as a floor), over our training split (TFDS
``train`` less ``glue.py``'s held-out 10%): RTE 213 steps, COPA 100, BoolQ
798. Rotten Tomatoes has no repo budget; ``ROTTEN_TOMATOES_STEPS = 300``
(about 0.9 epoch of its ~10.8k training snippets, ``sam.py``'s default) keeps
the 16 groups short on a CPU. Warm-up is the repo's 6% of the steps, then
linear decay to 0, as its HF ``get_scheduler('linear')``.

Departures from the paper and its repo:

* Models and heads: T5-Large/3B/11B (and LLaMA-2-7B) as text-to-text
  (label words generated with 5 beams, target length 8) become encoder
  classifiers, MiniLM-L6 (22M) or RoBERTa-base (125M), with a new head (and
  RoBERTa's pooler) trained in full by every method. T5 has no biases; the
  BERT encoders do, so BitFit would be meaningful here but is not one of the
  15. Everything runs in float32, not bf16.
* Data: RTE is ``glue/rte`` (``peft_jax.data.glue.TASKS``), the same 2,490
  training and 277 validation pairs as ``super_glue/rte`` under other field
  names; COPA and BoolQ are ``super_glue``'s. As in ``glue.py``, TFDS
  ``validation`` is the test split and 10% of ``train`` the validation split;
  the repo trained on all of ``train`` and chose on ``validation``.
* Seeds and selection: the repo ran the grid at seed 0, then the best rate
  (by eval accuracy) at seeds 1 and 42, and reports the mean over
  {0, 1, 42}. A group trains consecutive seeds, so here every rate runs at
  seeds 0, 1 and 2 (``seeds=3``): a superset of its runs, from which the
  best rate per method is chosen on the validation split and its test
  accuracy read.
* Weight decay: the repo exempts biases and LayerNorm weights (its
  ``no_decay`` list); our AdamW decays every trained leaf, LN-tuning's
  LayerNorms included.
* Placements on an encoder-only model: the repo's LoRA variants also adapt
  the T5 decoder's self- and cross-attention; here there is only the
  encoder, so ``lora`` (adapters library) and ``hf_lora`` (HF PEFT) are the
  same update at the same init, trained on the same seeds. Prefixes go into
  the encoder's self-attention only (no decoder, no cross-attention).
"""

import math

from experiments.configs import common, rotten_tomatoes, sam
from experiments.configs.rotten_tomatoes import ALL_SIX, QV, SUB_LAYER_OUTPUTS
from peft_jax import PeftError, recipes

RT = rotten_tomatoes.METHODS
ATTENTION_KV = '.*/attention/attention_kv'
# The repo's adapter_config_string -> the rules on the encoder. Adapters
# library configs (``ADAPTER_CONFIG_MAP``, its vendored adapter_config.py)
# at their defaults; the hf_* ones HF PEFT configs with the repo's
# ``hf_adapter_config_string_to_peft_args`` ("selected to match Adapters
# default parameters").
METHODS = {
  # double_seq_bn: after the attention and the FFN outputs, d/16, swish,
  # init_weights='bert' (N(0, 0.02²); drawn here truncated at 2σ); unlike
  # rotten_tomatoes.py's houlsby, the LayerNorms stay frozen, as the
  # library's train_adapter leaves them.
  'houlsby': [(SUB_LAYER_OUTPUTS, 'houlsby(reduction_factor=16, init_std=0.02)')],
  # seq_bn: after the FFN output, d/16, ReLU, bert init.
  'pfeiffer': RT['pfeiffer'][0],
  # scaled_par_bn: beside the FFN, r = d/2, ReLU, the scale learned from 1.
  'scaled_parallel': [
    (
      '.*/ffn_block',
      'scaled_parallel(reduction_factor=2, scale=1.0, learned_scale=True)',
    )
  ],
  # The repo's own: every LayerNorm (T5's layer_norm) trained.
  'ln_tuning': RT['ln_tuning'][0],
  # LoRAConfig: q and v, r = 8, alpha = 8 (s = 1), A Kaiming-uniform, B = 0.
  'lora': [(QV, 'lora(rank=8, alpha=8)')],
  # LoraConfig(r=8, lora_alpha=8, target_modules=['q', 'v']).
  'hf_lora': [(QV, 'lora(rank=8, alpha=8)')],
  # target_modules k, q, v, o, wi, wo: every linear layer of the encoder.
  'hf_lora_all': [(ALL_SIX, 'lora(rank=8, alpha=8)')],
  # LoKrConfig(target_modules=['q', 'v']) at PEFT's r = alpha = 8, factor -1:
  # the larger factor at rank 8, as PEFT decides for MiniLM's 384 = 16 x 24
  # (8 < 24/2) and RoBERTa-base's 768 = 24 x 32 (8 < 32/2).
  'hf_krona': RT['lokr'][0],
  # CompacterConfig: Houlsby's two sites, d/32, GELU, n = 4, rank 1, one
  # shared rule A (one rule for both sites).
  'compacter': [(SUB_LAYER_OUTPUTS, 'compacter_adapter()')],
  # CompacterPlusPlusConfig ('compacter++'): Pfeiffer's site only.
  'compacter_pp': RT['compacter_adapter'][0],
  # IA3Config: output scales of the key, value and FFN-intermediate kernels.
  'ia3': RT['ia3'][0],
  # MAMConfig: prefix l = 30 through the 800-wide MLP + par_bn (r = d/2,
  # s = 4); rank=None gives scaled_parallel's r = d // 2.
  'mam': recipes.mam(rank=None),
  # PrefixTuningConfig: l = 30 through the 512-wide tanh MLP.
  'prefix_tuning': [(ATTENTION_KV, 'prefix_tuning(length=30, bottleneck=512)')],
  # PrefixTuningConfig(flat=True): l = 30, trained directly, N(0, 1).
  'prefix_tuning_flat': [(ATTENTION_KV, 'prefix_tuning(length=30, bottleneck=None)')],
  # UniPELTConfig: gated LoRA r = 8, prefix l = 10, seq_bn d/16.
  'unipelt': RT['unipelt'][0],
  # The reference: every encoder weight.
  'full': RT['full'][0],
}
REFERENCE = 'full'
COMPARED = tuple(m for m in METHODS if m != REFERENCE)
LEARNING_RATES = (2e-3, 1e-3, 5e-4, 1e-4, 5e-5)
SEEDS = 3
WEIGHT_DECAY = 0.1
BATCH_SIZE = 32  # the repo's total batch
WARMUP_SHARE = 0.06  # its lr_scheduler_warmup_percent
EPOCHS, MIN_STEPS = 3, 100
ROTTEN_TOMATOES_STEPS = 300
# TFDS ``train`` sizes of the SuperGLUE tasks (glue/rte has RTE's 2,490).
TRAIN_EXAMPLES = {'rte': 2490, 'copa': 400, 'boolq': 9427}
TASKS = ('rotten_tomatoes', *TRAIN_EXAMPLES)


def budget(task: str, batch_size: int, heldout: float) -> int:
  """The default steps: ``EPOCHS`` over the training split (``heldout`` of
  TFDS train removed, as ``glue.load`` rounds it), at least ``MIN_STEPS``;
  ``ROTTEN_TOMATOES_STEPS`` on Rotten Tomatoes."""
  if task == 'rotten_tomatoes':
    return ROTTEN_TOMATOES_STEPS
  n = TRAIN_EXAMPLES[task]
  n -= round(heldout * n)
  return max(MIN_STEPS, EPOCHS * math.ceil(n / batch_size))


def get_config(arg=None):
  """The run config; ``arg`` is e.g. ``'method=hf_lora,task=rte,...'``."""
  arg = common.parse_local_arg(
    arg,
    rotten_tomatoes.LOCAL,
    task='rotten_tomatoes',
    checkpoint='',
    data_dir='',
    method='lora',
    steps=0,
    batch_size=BATCH_SIZE,
    seed=0,
    eval_limit=0,
    log_every=25,
    eval_every=0,
    checkpoint_every=250,
    checkpoint_minutes=1.0,
    nonfinite='skip',
    runlocal=False,
    **{**common.GROUP_ARGS, 'seeds': SEEDS, 'lrs': list(LEARNING_RATES)},
  )
  common.lookup(dict.fromkeys(TASKS), 'task', arg.task)
  rules = common.lookup(METHODS, 'method', arg.method)
  if not arg.lrs:
    raise PeftError('lrs=[] leaves no learning rate; give one as lrs=[1e-3]')
  config = sam.base_config(arg)  # its steps are set below, once heldout is known
  head = config.adapters[0]  # The task's head rule: trained in full.
  config.name = f'guide_{arg.task}_{arg.method}'
  config.method = arg.method
  config.adapters = [head, *rules]
  config.steps = arg.steps or budget(
    arg.task, arg.batch_size, config.data.get('heldout', 0)
  )
  config.warmup_steps = int(WARMUP_SHARE * config.steps)
  config.weight_decay = WEIGHT_DECAY
  common.set_loop(config, arg)
  return config


def sweep(arg=None):
  """The head-to-head: the 15 compared methods, then the reference."""
  del arg
  return [f'method={method}' for method in METHODS]
