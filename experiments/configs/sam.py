r"""The SAM paper's Table 1 protocol (Fu et al., AAAI 2023), one config.

By default on what ships offline: MiniLM-L6 × Rotten Tomatoes
(``rotten_tomatoes.py``'s task: mean-pooled head trained in full by every
method); with ``task=`` one of the paper's GLUE/SuperGLUE tasks (cola, stsb,
mrpc, rte, cb, copa, wsc) and ``checkpoint=`` a local RoBERTa-base dir,
``data_dir=`` a TFDS dir holding the task (``glue.py``'s task). The paper's
methods at one sparsity ``p``, several seeds each; the mean ± std table and
the stability and sparsity figures come from ``experiments.compare``:

  python -m experiments.sweep \
      --config experiments/configs/sam.py --workdir runs/sam_rt
  python -m experiments.sweep \
      --config experiments/configs/sam.py:study=sparsity \
      --workdir runs/sam_rt_sparsity
  python -m experiments.sweep \
      --config experiments/configs/sam.py:task=rte,checkpoint=$ROBERTA,data_dir=$TFDS \
      --workdir runs/sam_rte

Arguments (after ``:``): task, checkpoint, data_dir (GLUE tasks), method
(one of METHODS), p (the share of the
encoder's entries that may change), scope (``per_leaf`` as the released
code, ``global`` as the paper), seed, steps, batch_size, lr (0 = the
method's default), eval_limit (the first N examples of each evaluation
split; 0 = all), score_batches (T of SAM and FishMask), study (``table``:
every method × ``seeds``; ``sparsity``: SAM over ``SPARSITIES`` ×
``seeds``), seeds, and the run arguments of ``glue.py``: log_every,
checkpoint_every, checkpoint_minutes, nonfinite and runlocal, with the same
meanings and defaults.

How each method of the paper's Table 1 is realised (``p`` the same for all
selective ones; the selected entries are those of the encoder
``bert/(embeddings|encoder)/.*``, embeddings included, as in the released
code; the head, and RoBERTa's pooler, train in full):

* full: every encoder weight. random: ``sparse`` on a uniformly random mask.
* mixout: Mixout (Lee et al.) on every encoder weight with mixing
  probability ``MIXOUT_P`` (a different knob from ``p``).
* bitfit: the biases. lora: r=16 on query, key, value, attention output, FFN
  in and out (the paper's loralib placement).
* magnitude: MagPruning's top-``p`` ``|θ0|`` per leaf (the paper prunes after
  a dense burn-in; we score the pretrained weights).
* diff_pruning: hard-concrete gates and the L0 penalty until ``steps/5``,
  then the top-``p`` ``|α|`` mask fixed (``diff_pruning_schedule``).
* child_pruning: dense training projected to the top-``p`` ``|θ − θ0|``
  every ``steps/5`` steps and at the end (``child_pruning_schedule``).
* sam: SAM's gradient scores at θ0 over ``score_batches`` batches.
* fisher, lt_sft: the guide's FishMask and LT-SFT (not in the paper's table).

Learning rates are one per family, chosen before any run and not tuned:
dense methods 1e-4 (the released code's), selective ``sparse`` values and
DiffPruning 1e-3 (far fewer entries move), LoRA and BitFit as in
``rotten_tomatoes.py``.
"""

import ml_collections

from experiments.configs import common, glue, rotten_tomatoes

ENCODER = rotten_tomatoes.ENCODER
MIXOUT_P = 0.1
DENSE_LR, SPARSE_LR = 1e-4, 1e-3
SPARSITIES = (0.0005, 0.002, 0.005, 0.02, 0.05, 0.2)
SELECTED = ('random', 'magnitude', 'sam', 'fisher', 'lt_sft')
# method -> (encoder rules, learning rate); selective methods have no rules:
# their rules come from the mask (experiments/selection.py).
METHODS = {
  'full': ([(ENCODER, 'full()')], DENSE_LR),
  'random': ([], SPARSE_LR),
  'mixout': ([(ENCODER, f'mixout(p={MIXOUT_P})')], DENSE_LR),
  'bitfit': ([(ENCODER + '/bias', 'bitfit()')], 5e-3),
  'magnitude': ([], SPARSE_LR),
  'lora': ([(rotten_tomatoes.ALL_SIX, 'lora(rank=16, alpha=16)')], 2e-3),
  'diff_pruning': ([(ENCODER, 'diff_pruning(p={p})')], SPARSE_LR),
  'child_pruning': ([(ENCODER, 'child_pruning(p={p})')], DENSE_LR),
  'sam': ([], SPARSE_LR),
  'fisher': ([], SPARSE_LR),
  'lt_sft': ([], SPARSE_LR),
}
TABLE = tuple(m for m in METHODS if m not in ('fisher', 'lt_sft'))
STUDIES = ('table', 'sparsity')
# Arguments of both get_config and sweep (a sweep's ``:arg`` reaches both).
SHARED = dict(
  task='rotten_tomatoes',
  checkpoint='',
  data_dir='',
  p=0.005,
  scope='per_leaf',
  steps=300,
  batch_size=32,
  lr=0.0,
  eval_limit=0,
  score_batches=32,
  study='table',
  seeds=5,
  log_every=25,
  eval_every=0,
  checkpoint_every=250,
  checkpoint_minutes=1.0,
  nonfinite='stop',
  runlocal=False,
)


def selection_for(arg) -> ml_collections.ConfigDict | None:
  """The selection block of selective methods (experiments/selection.py)."""
  if arg.method not in SELECTED:
    return None
  return ml_collections.ConfigDict(
    dict(
      scorer=arg.method,
      p=arg.p,
      scope=arg.scope,
      where=ENCODER,
      batches=arg.score_batches,
      curvature='',
      clip_norm=1.0,  # The released code clips every scoring step at 1.0.
      dense_steps=max(1, arg.steps // 5),
      dense_lr=DENSE_LR,
    )
  )


def base_config(arg) -> ml_collections.ConfigDict:
  """The task's own config (``method=full`` as a placeholder for the rules)."""
  shared = (
    f'method=full,steps={arg.steps},batch_size={arg.batch_size},seed={arg.seed},'
    f'eval_limit={arg.eval_limit}'
  )
  shared += ',runlocal' if arg.runlocal else ''
  if arg.task == 'rotten_tomatoes':
    return rotten_tomatoes.get_config(shared)
  given = dict(task=arg.task, checkpoint=arg.checkpoint, data_dir=arg.data_dir)
  dirs = ','.join(f'{k}={v}' for k, v in given.items() if v)
  return glue.get_config(f'{dirs},{shared}')


def get_config(arg=None):
  """The run config; ``arg`` is e.g. ``'method=sam,p=0.005,seed=1'``."""
  arg = common.parse_local_arg(
    arg, rotten_tomatoes.LOCAL, method='sam', seed=0, **SHARED
  )
  rules, default_lr = common.lookup(METHODS, 'method', arg.method)
  common.lookup(dict.fromkeys(common.SCOPES), 'scope', arg.scope)
  common.lookup(dict.fromkeys(STUDIES), 'study', arg.study)
  config = base_config(arg)
  common.set_loop_fields(config, arg)
  head = config.adapters[0]  # The task's head rule: trained in full.
  config.name = f'sam_{arg.task}_{arg.method}_p{arg.p:g}_seed{arg.seed}'
  config.method = arg.method
  config.group = arg.method if arg.study == 'table' else f'{arg.method} p={arg.p:g}'
  config.adapters = [head, *[(s, spec.format(p=arg.p)) for s, spec in rules]]
  config.selection = selection_for(arg)
  config.schedule = rotten_tomatoes.schedule_for(arg.method, config.steps)
  config.lr = arg.lr or default_lr
  config.factored = True
  config.weight_decay = 0.01  # The released code's AdamW decay.
  if arg.runlocal and config.selection:
    config.selection.update(batches=2, dense_steps=2)
  return config


def sweep(arg=None):
  """``study=table``: every method of the paper's table × seeds;
  ``study=sparsity``: SAM at every p of ``SPARSITIES`` × seeds (seed-major,
  so that an interrupted sweep has every p at its first seeds)."""
  arg = common.parse_arg(arg, **SHARED)
  common.lookup(dict.fromkeys(STUDIES), 'study', arg.study)
  seeds = range(arg.seeds)
  if arg.study == 'sparsity':
    return [f'method=sam,p={p},seed={s}' for s in seeds for p in SPARSITIES]
  return [f'method={m},seed={s}' for m in TABLE for s in seeds]
