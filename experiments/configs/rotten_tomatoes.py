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

Arguments (after ``:``): method (any of METHODS: every registered method
but the DECODER_ONLY ones, with its default placement and learning rate;
``prompt_tuning`` and ``houlsby`` act at the encoder's hook points), steps,
batch_size, lr (0 = the method's default below), seed, eval_limit (evaluate
on the first N examples of each split; 0 = all 1,000), log_every (steps
between logged metrics, default 25), checkpoint_every (steps between
checkpoints, default 250), checkpoint_minutes (also checkpoint once this
many minutes passed since the last checkpoint, default 1.0), nonfinite
(``stop``, the default, or ``skip``: what a step with a non-finite loss or
gradient does), seeds and lrs (train seeds
seed..seed+seeds-1 at each learning rate of the list, e.g.
``lrs=[1e-3,3e-3]``, as one program: experiments/train_many.py; adapters_per_pass=K runs
them K at a time inside it; 0 = 1 on a CPU, all at once elsewhere),
runlocal (a few steps on a few examples, for smoke tests;
it changes the defaults of steps, batch_size, eval_limit, log_every and
checkpoint_every to 3, 8, 32, 1 and 2; a value given explicitly wins). The
sweep over all methods:

  python -m experiments.sweep \
      --config experiments/configs/rotten_tomatoes.py --workdir runs/rt_sweep
"""

import ml_collections

from experiments.configs import common
from peft_jax import recipes

KV_FFN1 = '.*/(attention/(key|value)|intermediate)/kernel'
QV = '.*/attention/(query|value)/kernel'
ALL_SIX = '.*/(attention/(query|key|value|output)|intermediate|output)/kernel'
LAYER_NORMS = 'bert/.*layer_norm/(scale|bias)'
# Every encoder leaf the mean-pooled head depends on: BERT's CLS pooler
# (bert/pooler) is never called, so its gradient is 0 and a rule that
# selected it would count parameters that cannot train.
ENCODER = 'bert/(embeddings|encoder)/.*'
# Hook points (bert.py): every layer's attention and FFN outputs, before the
# residual and LayerNorm, where Houlsby et al. put their two adapters.
SUB_LAYER_OUTPUTS = '.*/(attention/attention_output|ffn_output)'
LOW_RANK_LR = 2e-3

# method -> (rules for the encoder, default learning rate). The six methods of
# the core comparison come first; every registered method can run.
METHODS = {
  'lora': ([(QV, 'lora(rank=8, alpha=16)')], LOW_RANK_LR),
  'ia3': ([(KV_FFN1, 'ia3()')], 1e-2),
  'ssl': ([(KV_FFN1, 'ssl()')], 1e-2),
  'ssb': ([(KV_FFN1, 'ssb()')], 1e-2),
  'bitfit': ([(ENCODER + '/bias', 'bitfit()')], 5e-3),
  'full': ([(ENCODER, 'full()')], 1e-4),
  'ln_tuning': ([(LAYER_NORMS, 'ln_tuning()')], 5e-3),
  'sam_parser': ([(ALL_SIX, 'sam_parser()')], 1e-3),
  'svdiff': ([(ALL_SIX, 'svdiff()')], 1e-3),
  'pissa': ([(QV, 'pissa(rank=8, alpha=16)')], 5e-4),
  'milora': ([(QV, 'milora(rank=8, alpha=16)')], LOW_RANK_LR),
  'adalora': ([(QV, 'adalora(rank=8, alpha=16)')], LOW_RANK_LR),
  'flora': ([(QV, 'flora(rank=8, alpha=16)')], LOW_RANK_LR),
  'moslora': ([(QV, 'moslora(rank=8, alpha=16)')], LOW_RANK_LR),
  'trilora': ([(QV, 'trilora(rank=8, alpha=16)')], LOW_RANK_LR),
  'liera': ([(QV, 'liera(rank=8, alpha=16)')], LOW_RANK_LR),
  'vera': ([(QV, 'vera(rank=256)')], 1e-2),
  'loha': ([(QV, 'loha(rank=4, alpha=8)')], LOW_RANK_LR),
  'lokr': ([(QV, 'lokr(rank=8, alpha=8)')], LOW_RANK_LR),
  # FourierFT (Gao et al.): HF PEFT's defaults (1000 coefficients per kernel,
  # scale 150, N(0, 1) init); the learning rate is an untuned guess.
  'fourierft': ([(QV, 'fourierft(n_frequency=1000)')], 1e-2),
  'intrinsic_said': ([(QV, 'intrinsic_said(dim=256)')], 1e-2),
  'parallel_adapter': ([(QV, 'parallel_adapter(rank=8)')], LOW_RANK_LR),
  # UniPELT's gated LoRA (no α/r: the gate scales the branch).
  'gated_lora': ([(QV, 'gated_lora(rank=8)')], LOW_RANK_LR),
  'compacter': ([('.*/output/kernel', 'compacter()')], LOW_RANK_LR),
  'mpc': ([(QV, "mpc('lora(rank=8, alpha=16)', kind='o', gamma=0.01)")], LOW_RANK_LR),
  'dora': ([(QV, 'dora(rank=8, alpha=16)')], LOW_RANK_LR),
  'spectral_adapter': ([(QV, 'spectral_adapter(rank=8, alpha=16)')], LOW_RANK_LR),
  'lora_dash': ([(QV, 'lora_dash(rank=8, alpha=16)')], LOW_RANK_LR),
  'flexlora': ([(QV, 'flexlora(rank=8, alpha=16)')], LOW_RANK_LR),
  'oft': ([(QV, 'oft(block_size=32)')], 5e-3),
  'boft': ([(QV, 'boft(block_size=4, n_butterfly_factor=2)')], 5e-3),
  # The SAM paper's baselines (experiments/configs/sam.py runs
  # its whole table); sparse on a random 0.5% of each encoder leaf.
  'sparse': ([(ENCODER + '/kernel', 'sparse(k=737)')], 1e-3),
  'diff_pruning': ([(ENCODER, 'diff_pruning()')], 1e-3),
  'child_pruning': ([(ENCODER, 'child_pruning()')], 1e-4),
  'mixout': ([(ENCODER, 'mixout(p=0.1)')], 1e-4),
  # Activation side: a soft prompt before the word embeddings (Lester et al.),
  # and bottleneck adapters with the LayerNorms trained, as Houlsby et al. do.
  'prompt_tuning': (
    [('bert/embeddings/input_embeddings', 'prompt_tuning(length=10)')],
    1e-2,
  ),
  'p_tuning': ([('bert/embeddings/input_embeddings', 'p_tuning(length=10)')], 1e-3),
  'houlsby': (
    [
      (SUB_LAYER_OUTPUTS, 'houlsby(reduction_factor=16)'),
      (LAYER_NORMS, 'ln_tuning()'),
    ],
    1e-3,
  ),
  # The guide's additive family (learning rates untuned guesses): Pfeiffer's
  # one adapter after the FFN, He et al.'s scaled parallel FFN adapter,
  # prefix tuning at MAM's GLUE length (16) through its shared MLP, and
  # (IA)³ on the keys, values and FFN activations.
  'pfeiffer': ([('.*/ffn_output', 'pfeiffer(reduction_factor=16)')], 1e-3),
  'scaled_parallel': ([('.*/ffn_block', 'scaled_parallel(rank=16, scale=2.0)')], 1e-3),
  'prefix_tuning': ([('.*/attention/attention_kv', 'prefix_tuning(length=16)')], 1e-3),
  'ia3_activations': (
    [('.*/(attention/attention_kv|ffn_intermediate)', 'ia3_activations()')],
    1e-2,
  ),
  # Compacter++: one LPHM adapter after the FFN, its A shared by all layers.
  'compacter_adapter': ([('.*/ffn_output', 'compacter_adapter()')], 1e-3),
  # The hybrids (pj.recipes): MAM at He et al.'s GLUE sizes (prefix 16 through
  # the 800-wide MLP, parallel FFN adapter r = 16, s = 2) and UniPELT's gated
  # LoRA + prefix + sequential adapter at the adapters library's defaults.
  'mam': (recipes.mam(prefix_length=16, bottleneck=800, rank=16, scale=2.0), 1e-3),
  'unipelt': (recipes.unipelt(), 1e-3),
}
CORE = ('lora', 'ia3', 'ssl', 'ssb', 'bitfit', 'full')
# Registered methods with no row: they act at a hook point MiniLM (BERT) does
# not have. LLaMA-Adapter needs a decoder attention's adaption_prompt point;
# its row is in smollm2_rotten_tomatoes.py.
DECODER_ONLY = ('adaption_prompt',)


def schedule_for(method: str, steps: int):
  """``(schedule factory name, kwargs)`` for methods that need one, else None."""
  phase = max(1, steps // 5)
  if method == 'adalora':
    kwargs = dict(total_steps=steps, init_warmup=phase, final_warmup=phase)
    return 'adalora_schedule', {**kwargs, 'mask_interval': 10, 'target_rank': 4}
  if method == 'flexlora':
    kwargs = dict(total_steps=steps, init_warmup=phase, final_warmup=phase)
    return 'flexlora_schedule', {**kwargs, 'interval': 10, 'budget': 2}
  if method == 'lora_dash':
    return 'lora_dash_schedule', {'warmup_steps': phase}
  if method == 'diff_pruning':
    return 'diff_pruning_schedule', {'burn_in_steps': phase}
  if method == 'child_pruning':
    return 'child_pruning_schedule', {'interval': phase, 'total_steps': steps}
  return None


# runlocal's defaults of the arguments (an argument given explicitly wins).
LOCAL = dict(steps=3, batch_size=8, eval_limit=32, log_every=1, checkpoint_every=2)


def get_config(arg=None):
  """The run config; ``arg`` is e.g. ``'method=lora,steps=300'``."""
  arg = common.parse_local_arg(
    arg,
    LOCAL,
    method='ssb',
    steps=500,
    batch_size=32,
    lr=0.0,
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
  encoder_rules, default_lr = common.lookup(METHODS, 'method', arg.method)

  config = ml_collections.ConfigDict()
  config.name = f'rotten_tomatoes_{arg.method}'
  config.task = 'text_classification'
  config.seed = arg.seed
  config.model = dict(checkpoint='minilm', pooling='mean', max_length=64)
  config.data = dict(
    name='rotten_tomatoes',
    n_validation=1000,
    n_test=1000,
    eval_limit=arg.eval_limit or None,
  )
  # First match wins: the head is trained in full by every method.
  config.adapters = [('classifier/(kernel|bias)', 'full()'), *encoder_rules]
  config.method = arg.method
  config.schedule = schedule_for(arg.method, arg.steps)
  config.steps = arg.steps
  config.batch_size = arg.batch_size
  config.eval_batch_size = 250
  config.lr = arg.lr or default_lr
  # Adapted matmuls in factored form: no w' and no weight gradient (SSB's
  # step takes ~0.6x the weight-space time on a 2-core CPU).
  config.factored = True
  config.warmup_steps = common.warmup_steps(arg.steps)
  config.weight_decay = 0.0  # Decay would pull SSB/(IA)³ scales towards 0.
  common.set_loop(config, arg)

  if arg.runlocal:
    config.eval_batch_size = 16
  return config


def sweep(arg=None):
  """One run per method, same task, same steps: the comparison table.

  ``make sweep`` runs the core six (``--only lora,ia3,ssl,ssb,bitfit,full``);
  ``--only`` picks any subset of METHODS by name.
  """
  del arg
  return [f'method={method}' for method in METHODS]
