r"""The *See Further* paper's GLUE protocol (Si, Yang, Shen, arXiv 2407.05417).

Every method of the paper's GLUE tables on DeBERTaV3-base (or RoBERTa-base
and -large: the family follows the checkpoint's ``config.json``), on one of
its eight tasks (MNLI, SST-2, CoLA, QQP, QNLI, RTE, MRPC, STS-B), with its
Table VI learning rate and epochs at batch 32, five seeds trained as one
program (``experiments/train_many.py``). Nothing is downloaded: prepare the
model dir and the TFDS data once, where torch, sentencepiece and TensorFlow
are installed, then copy them::

  python -c "import transformers as t; n, d = 'microsoft/deberta-v3-base', \
      '/models/deberta-v3-base'; t.AutoModel.from_pretrained(n).save_pretrained(d); \
      t.AutoTokenizer.from_pretrained(n).save_pretrained(d)"
  for t in mnli sst2 cola qqp qnli rte mrpc stsb; do
    tfds build glue/$t --file_format=array_record --data_dir=/data/tfds
  done

(``save_pretrained`` writes ``model.safetensors`` and a fast tokenizer's
``tokenizer.json``, which needs no sentencepiece to load.) One cell of the
table (a method at a rank, five seeds), then the whole table for one task
(the six rank-free methods, then the twelve rank-based ones at r = 2, 4, 8,
16; finished runs are skipped, so an interrupted sweep continues; ``--only
lora,dora`` picks methods)::

  DIRS=checkpoint=/models/deberta-v3-base,data_dir=/data/tfds
  python -m experiments.train \
      --config experiments/configs/see_further.py:task=rte,method=lora,rank=8,$DIRS \
      --workdir runs/sf_rte_lora_r8
  python -m experiments.sweep \
      --config experiments/configs/see_further.py:task=rte,$DIRS --workdir runs/sf_rte

Arguments (after ``:``): task (``SETTINGS``), method (``METHODS``), rank (of
the rank-based methods: 2, 4, 8 or 16; default 8), ranks (the sweep's, default
[2,4,8,16]), alpha (0 = the task's ``SETTINGS`` value), checkpoint, data_dir
(default ``$TFDS_DATA_DIR``), epochs (0 = Table VI's), steps (0 = epochs ×
ceil(train examples / batch_size), the train examples being TFDS train less
the held-out share: ``train_steps``), batch_size (32), lr (0 = Table VI's;
full fine-tuning 2e-5), max_length (0 = the task's), heldout (0.1), seed,
seeds (5), lrs, adapters_per_pass (see ``experiments/configs/glue.py``),
eval_limit (0 = every example), log_every (100), eval_every (0 = a tenth of
the run's steps, none with heldout=0; steps or more: the final adapter
only), checkpoint_every (1000),
checkpoint_minutes (5.0), nonfinite (``stop`` or ``skip``), runlocal (3 steps
of batch 8 of one seed on 32 evaluation examples of length <= 64; a value
given explicitly wins).

Where the paper is silent, the values are the AdaLoRA NLU scripts' that the
paper's repository (Chongjie-Si/Subspace-Tuning, ``NLU/scripts``) ships
(``SETTINGS``): max_seq_length, warm-up, weight decay, cls_dropout,
lora_alpha, reg_orth_coef and AdaLoRA's t_i, t_f, Δ. Their step counts are
for the whole TFDS train split at batch 32 (``paper_steps``) and scale with
the run's length (``scaled``). Choices and departures:

* Splits: TFDS ``validation`` (GLUE dev, what the paper reports) is the test
  split, a seeded ``heldout`` share of TFDS ``train`` the validation split,
  so the model trains on 90% of what the paper's did (``heldout=0`` trains on
  all of it, but ``experiments.compare`` tables need a validation split).
* Evaluation: the scripts evaluate every ``eval_steps`` and the paper reports
  the best dev score, chosen on dev itself. Here a run evaluates every
  ``eval_every`` steps and its row also holds the evaluation with the best
  held-out validation score (``best_step``, ``best_test_score``): ``python -m
  experiments.compare DIR --at best`` tables those, ``--at final`` (the
  default) the final adapter's.
* Every batch is full (a batch may span two epochs), where the scripts end
  each epoch with a short one.
* max_length: 256 MNLI, 128 SST-2/STS-B, 64 CoLA, 320 QQP/RTE/MRPC, 512 QNLI.
* Weight decay (the scripts': 0, 0.01 or 0.1) spares biases and
  LayerNorms, as Hugging Face's Trainer does (``weight_decay_mask =
  'hf_trainer'``, ``peft_jax.hf_decay_mask``).
  cls_dropout applies to the DeBERTa head only.
* α (LoRA, DoRA, FLoRA, AdaLoRA) is the scripts' lora_alpha, 16 (MNLI, QQP,
  SST-2) or 32, at every rank, so the scale α/r falls as r grows, as a sweep
  that changes only ``--lora_r`` gives. TriLoRA has no scale and FLoRA is
  loralib's (``style='loralib'``), the code the paper's GLUE runs used. On
  DeBERTa, LoRA's and DoRA's A start as N(0, 0.02²), as the NLU code's
  DeBERTa init hook sets them.
* MPC_o/MPC_d and AdaLoRA's orthogonality penalty are the code's unsquared
  mean (``form='mean'``) at γ = reg_orth_coef (0.3 RTE/STS-B, else 0.1);
  MPC_n is PA (``parallel_adapter``), one run for both columns.
* AdaLoRA starts at rank r and ends at r/2 on average (the scripts' 2 → 1).
* HAdapter (Houlsby, with the LayerNorms trained) and PAdapter (Pfeiffer) have
  a bottleneck of r, at the sub-layer outputs (``reduction_factor = d // r``).
* Full fine-tuning runs at 2e-5: Table VI's rates are PEFT rates (the
  paper's FT row is the published RoBERTa-base one).
* SAM-PARSER's SVD is taken of the pretrained weights; the paper's code took
  it lazily and never trained it (see the spec), which its low row reflects.
"""

import math
from typing import NamedTuple

import ml_collections

from experiments.configs import common, rotten_tomatoes
from experiments.configs import glue as glue_config
from peft_jax import PeftError
from peft_jax.models import checkpoints


class Setting(NamedTuple):
  """One GLUE task in the paper (Table VI) and in the repository's scripts."""

  lr: float  # Table VI
  epochs: int  # Table VI
  train_size: int  # examples of TFDS glue/<task> train
  max_length: int  # --max_seq_length
  warmup: int | None  # --warmup_steps (None: --warmup_ratio 0.1)
  weight_decay: float
  cls_dropout: float
  alpha: float  # --lora_alpha
  gamma: float  # --reg_orth_coef
  adalora: tuple[int, int, int]  # --init_warmup, --final_warmup, --mask_interval


# In the paper's column order. lr and epochs are Table VI's (the scripts use
# 5e-4 for QNLI and 8e-4 for QQP and CoLA); the rest is from
# QingruZhang/AdaLoRA's NLU/scripts/run_debertav3_<task>.sh, which
# Subspace-Tuning's NLU scripts copy.
SETTINGS = {
  'mnli': Setting(5e-4, 7, 392_702, 256, 1000, 0.0, 0.15, 16, 0.1, (8000, 50000, 100)),
  'sst2': Setting(8e-4, 24, 67_349, 128, 1000, 0.01, 0.0, 16, 0.1, (6000, 22000, 100)),
  'cola': Setting(5e-4, 25, 8_551, 64, 100, 0.0, 0.1, 32, 0.1, (800, 3500, 10)),
  'qqp': Setting(5e-4, 5, 363_846, 320, 2000, 0.01, 0.15, 16, 0.1, (8000, 25000, 100)),
  'qnli': Setting(1.2e-3, 5, 104_743, 512, 500, 0.01, 0.1, 32, 0.1, (2000, 8000, 100)),
  'rte': Setting(1.2e-3, 50, 2_490, 320, 200, 0.01, 0.2, 32, 0.3, (600, 1800, 1)),
  'mrpc': Setting(1e-3, 30, 3_668, 320, None, 0.01, 0.0, 32, 0.1, (600, 1800, 1)),
  'stsb': Setting(2.2e-3, 25, 5_749, 128, 100, 0.1, 0.2, 32, 0.3, (800, 2000, 10)),
}
PAPER_BATCH = 32
FULL_LR = 2e-5
RANKS = (2, 4, 8, 16)

# method -> the paper's name, in its tables' order.
RANK_FREE = {
  'full': 'FT',
  'sam_parser': 'SAM-PARSER',
  'ia3': '(IA)³',
  'ssl': 'SSL',
  'ssb': 'SSB',
  'bitfit': 'BitFit',
}
RANK_BASED = {
  'houlsby': 'HAdapter',
  'pfeiffer': 'PAdapter',
  'parallel_adapter': 'PA = LoRA+MPC_n',
  'lora': 'LoRA',
  'lora_mpc_o': 'LoRA+MPC_o',
  'lora_mpc_d': 'LoRA+MPC_d',
  'trilora': 'TriLoRA',
  'trilora_mpc_o': 'TriLoRA+MPC_o',
  'adalora_no_mpc_o': 'AdaLoRA−MPC_o',
  'adalora': 'AdaLoRA',
  'flora': 'FLoRA',
  'dora': 'DoRA',
}
METHODS = {**RANK_FREE, **RANK_BASED}


class Places(NamedTuple):
  """Where a model family's methods go: regexes on the task model's leaves."""

  head: str  # the new head, trained in full by every method
  encoder: str  # every encoder leaf (full fine-tuning)
  biases: str  # BitFit: every encoder bias, the LayerNorms' included
  layer_norms: str  # trained beside the Houlsby adapters
  six: str  # the Q, K, V, attention-output, FFN-in and FFN-out kernels
  kv_ffn1: str  # the K, V and FFN-in kernels: (IA)³, SSL, SSB (spec §1)


DEBERTA_LAYER = r'deberta/encoder/layer_\d+'
# model_type of config.json -> family (experiments/tasks/glue.py FAMILIES).
FAMILIES = {'deberta-v2': 'deberta', 'bert': 'bert', 'roberta': 'bert'}
PLACES = {
  'deberta': Places(
    head='(classifier|pooler/dense)/(kernel|bias)',
    encoder='deberta/.*',
    biases='deberta/.*/bias',
    layer_norms='deberta/.*LayerNorm/(scale|bias)',
    six=DEBERTA_LAYER + '/(attention/(self/(query|key|value)_proj|output/dense)'
    '|intermediate/dense|output/dense)/kernel',
    kv_ffn1=DEBERTA_LAYER + '/(attention/self/(key|value)_proj|intermediate/dense)'
    '/kernel',
  ),
  'bert': Places(
    head=glue_config.HEAD,
    encoder='bert/.*',
    biases='bert/.*/bias',
    layer_norms=rotten_tomatoes.LAYER_NORMS,
    six=rotten_tomatoes.ALL_SIX,
    kv_ffn1=rotten_tomatoes.KV_FFN1,
  ),
}
# LoRA's and DoRA's init of A: the NLU code's DeBERTa init hook, else loralib's.
A_INIT = {'deberta': 'normal', 'bert': 'kaiming_uniform'}

DEFAULTS = dict(
  task='rte',
  method='lora',
  rank=8,
  ranks=list(RANKS),
  alpha=0.0,
  checkpoint='',
  data_dir='',
  epochs=0,
  steps=0,
  batch_size=PAPER_BATCH,
  lr=0.0,
  max_length=0,
  heldout=0.1,
  seed=0,
  eval_limit=0,
  log_every=100,
  eval_every=0,
  checkpoint_every=1000,
  checkpoint_minutes=5.0,
  nonfinite='stop',
  runlocal=False,
  **{**common.GROUP_ARGS, 'seeds': 5},
)
LOCAL = {**rotten_tomatoes.LOCAL, 'seeds': 1}


def paper_steps(task: str) -> int:
  """The scripts' run: Table VI's epochs of ``ceil(train_size / 32)`` steps."""
  setting = SETTINGS[task]
  return setting.epochs * math.ceil(setting.train_size / PAPER_BATCH)


def scaled(count: int, task: str, steps: int) -> int:
  """A step count of the scripts' run, in proportion to a run of ``steps``:
  ``floor(count · steps / paper_steps(task))`` (``count`` itself at the
  paper's length)."""
  return count * steps // paper_steps(task)


def train_steps(task: str, epochs: int, heldout: float, batch_size: int) -> int:
  """``epochs · ceil(n / batch_size)``, ``n`` the TFDS train examples less
  the ``round(heldout · size)`` that ``peft_jax.data.glue.load`` holds out."""
  if not 0 <= heldout < 1:
    raise PeftError(f'heldout={heldout} should be a share in [0, 1)')
  if epochs < 1 or batch_size < 1:
    raise PeftError(
      f'epochs={epochs} and batch_size={batch_size} should be positive ints'
    )
  size = SETTINGS[task].train_size
  return epochs * math.ceil((size - round(heldout * size)) / batch_size)


def encoder_of(checkpoint: str) -> tuple[str, int]:
  """``(family, d)``: the encoder family and width of the checkpoint's
  ``config.json``."""
  hf_config = checkpoints.read_hf_config(checkpoint)
  model_type = getattr(hf_config, 'model_type', None)
  if model_type not in FAMILIES:
    raise PeftError(
      f'checkpoint={checkpoint!r} holds a {model_type!r} model; expected one of '
      f'{", ".join(FAMILIES)} (DeBERTaV3, BERT, RoBERTa)'
    )
  return FAMILIES[model_type], hf_config.hidden_size


def check_ranks(ranks) -> None:
  """Raises unless every rank is one of the paper's ``RANKS``."""
  for rank in ranks:
    if rank not in RANKS:
      raise PeftError(f'rank={rank!r} should be one of the paper ranks {RANKS}')


def encoder_rules(
  method: str, family: str, width: int, rank: int, setting: Setting, alpha: float
) -> list[tuple[str, str]]:
  """The method's ``(regex, spec)`` rules on the encoder (module docstring)."""
  p = PLACES[family]
  lora = f'lora(rank={rank}, alpha={alpha}, a_init={A_INIT[family]!r})'
  trilora = f'trilora(rank={rank})'
  mpc = lambda spec, kind: (
    f"mpc({spec!r}, kind={kind!r}, gamma={setting.gamma}, form='mean')"
  )
  adalora = lambda gamma: f'adalora(rank={rank}, alpha={alpha}, reg_orth_coef={gamma})'
  factor = width // rank  # the adapters' bottleneck is then r
  rules = {
    'full': [(p.encoder, 'full()')],
    'sam_parser': [(p.six, 'sam_parser()')],
    'ia3': [(p.kv_ffn1, 'ia3()')],
    'ssl': [(p.kv_ffn1, 'ssl()')],
    'ssb': [(p.kv_ffn1, 'ssb()')],
    'bitfit': [(p.biases, 'bitfit()')],
    'houlsby': [
      (rotten_tomatoes.SUB_LAYER_OUTPUTS, f'houlsby(reduction_factor={factor})'),
      (p.layer_norms, 'ln_tuning()'),
    ],
    'pfeiffer': [('.*/ffn_output', f'pfeiffer(reduction_factor={factor})')],
    'parallel_adapter': [(p.six, f'parallel_adapter(rank={rank})')],
    'lora': [(p.six, lora)],
    'lora_mpc_o': [(p.six, mpc(lora, 'o'))],
    'lora_mpc_d': [(p.six, mpc(lora, 'd'))],
    'trilora': [(p.six, trilora)],
    'trilora_mpc_o': [(p.six, mpc(trilora, 'o'))],
    'adalora_no_mpc_o': [(p.six, adalora(0.0))],
    'adalora': [(p.six, adalora(setting.gamma))],
    'flora': [(p.six, f"flora(rank={rank}, alpha={alpha}, style='loralib')")],
    'dora': [(p.six, f'dora(rank={rank}, alpha={alpha}, a_init={A_INIT[family]!r})')],
  }
  return rules[method]


def schedule_for(method: str, task: str, rank: int, steps: int):
  """AdaLoRA's budget schedule (the scripts' t_i, t_f, Δ, ``scaled``; the
  average rank r → r/2), for both AdaLoRA rows; None for the others."""
  if not method.startswith('adalora'):
    return None
  t_i, t_f, interval = SETTINGS[task].adalora
  kwargs = dict(
    total_steps=steps,
    init_warmup=scaled(t_i, task, steps),
    final_warmup=scaled(t_f, task, steps),
    mask_interval=interval,
    target_rank=max(1, rank // 2),
  )
  return 'adalora_schedule', kwargs


def parse(arg: str | None) -> ml_collections.ConfigDict:
  """The arguments (``DEFAULTS``; ``runlocal`` changes ``LOCAL``'s)."""
  return common.parse_local_arg(arg, LOCAL, **DEFAULTS)


def get_config(arg=None):
  """The run config; ``arg`` is e.g. ``'task=rte,method=lora,rank=8,...'``."""
  arg = parse(arg)
  setting = common.lookup(SETTINGS, 'task', arg.task)
  common.lookup(METHODS, 'method', arg.method)
  check_ranks([arg.rank])
  checkpoint, data_dir = glue_config.paths(arg)
  family, width = encoder_of(checkpoint)
  epochs = arg.epochs or setting.epochs
  steps = arg.steps or train_steps(arg.task, epochs, arg.heldout, arg.batch_size)
  rank_based = arg.method in RANK_BASED
  alpha = arg.alpha or setting.alpha

  config = ml_collections.ConfigDict()
  rank_suffix = f'_r{arg.rank}' if rank_based else ''
  config.name = f'see_further_{arg.task}_{arg.method}{rank_suffix}'
  config.task = 'glue'
  config.seed = arg.seed
  max_length = arg.max_length or setting.max_length
  config.model = dict(
    checkpoint_dir=checkpoint,
    family=family,
    max_length=max_length,
    cls_dropout=setting.cls_dropout if family == 'deberta' else None,
  )
  config.data = dict(
    task=arg.task,
    data_dir=data_dir,
    heldout=arg.heldout,
    eval_limit=arg.eval_limit or None,
  )
  rules = encoder_rules(arg.method, family, width, arg.rank, setting, alpha)
  config.adapters = [(PLACES[family].head, 'full()'), *rules]
  config.method = arg.method
  config.group = f'{arg.method} r={arg.rank}' if rank_based else arg.method
  config.schedule = schedule_for(arg.method, arg.task, arg.rank, steps)
  config.steps = steps
  config.batch_size = arg.batch_size
  config.eval_batch_size = 64
  config.lr = arg.lr or (FULL_LR if arg.method == 'full' else setting.lr)
  config.factored = True
  if setting.warmup is None:
    config.warmup_steps = common.warmup_steps(steps)
  else:
    config.warmup_steps = scaled(setting.warmup, arg.task, steps)
  config.weight_decay = setting.weight_decay
  config.weight_decay_mask = 'hf_trainer'
  common.set_loop(config, arg)
  # The scripts evaluate every --eval_steps and the paper reports the best;
  # here every tenth of the run, chosen on the held-out split.
  config.eval_every = arg.eval_every or (steps // 10 if arg.heldout else 0)

  if arg.runlocal:
    config.eval_batch_size = 16
    config.model.max_length = min(max_length, 64)
  return config


def sweep(arg=None):
  """The paper's table on one task: every rank-free method, then every
  rank-based one at each of ``ranks`` (default all four)."""
  ranks = parse(arg).ranks
  check_ranks(ranks)
  return [f'method={m}' for m in RANK_FREE] + [
    f'method={m},rank={r}' for r in ranks for m in RANK_BASED
  ]
