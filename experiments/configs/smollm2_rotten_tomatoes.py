r"""Fine-tune SmolLM2-135M-Instruct to answer "fresh" or "rotten" to a review.

The decoder counterpart of ``rotten_tomatoes.py``: the same Rotten Tomatoes
snippets and the same fixed split (``rotten_tomatoes.splits()``), asked as a
chat instruction of the offline SmolLM2-135M-Instruct GGUF (dequantized to
float32, frozen; task ``lm_choice``)::

  <|im_start|>system
  Answer with one word.<|im_end|>
  <|im_start|>user
  Review: {snippet}
  Is this movie review fresh (positive) or rotten (negative)?<|im_end|>
  <|im_start|>assistant
  fresh<|im_end|>

LoRA (rank 8, α 16) on the q/k/v/o/gate/up/down kernels of all 30 layers
(2,442,240 trainable of 134.5M, 1.8%), factored path, trained with the
causal-LM loss on the answer tokens only. Accuracy compares the summed
log-probability of the two answers (``rotten<|im_end|>`` vs
``fresh<|im_end|>``) given the prompt, before (zero-shot) and after
training; the log also shows greedy answers to the first three test prompts
before and after.

  python -m experiments.train \
      --config experiments/configs/smollm2_rotten_tomatoes.py \
      --workdir runs/smollm2_rt_lora

Arguments (after ``:``): method (any of METHODS: the weight-space ones on
the same seven kernels, ``houlsby`` at every layer's attention and MLP
outputs with the RMSNorms trained, ``adaption_prompt`` in every layer's
attention, ``prefix_tuning`` at every ``attention_kv`` and ``prompt_tuning``
before the embeddings; the learning rates of all but lora are untuned
guesses), steps,
batch_size, lr (0 = the method's default), seed, eval_limit (evaluate on the
first N examples of each split, default 200; 0 = all 1,000), frozen (how
the frozen weights are stored: float32 (default), bfloat16, int8, int4, nf4
(``pj.quantize``, kernels in groups of 64: QLoRA with ``method=lora``) or
gguf (the file's own Q4_1 kernels and Q8_0 embeddings, kept quantized; the
same values as float32); the run's name gets ``_<frozen>``), log_every
(steps between logged metrics, default 10), checkpoint_every (steps between
checkpoints, default 50), checkpoint_minutes (also checkpoint once this
many minutes passed since the last checkpoint, default 1.0), nonfinite
(``stop``, the default, or ``skip``: what a step with a non-finite loss or
gradient does), seeds and lrs (train seeds
seed..seed+seeds-1 at each learning rate of the list, e.g.
``lrs=[1e-3,3e-3]``, as one program: experiments/train_many.py; adapters_per_pass=K runs
them K at a time inside it; 0 = 1 on a CPU, all at once elsewhere),
runlocal (3 steps on 8 evaluation examples, for tests; it
changes the defaults of steps, batch_size, eval_limit, log_every and
checkpoint_every to 3, 2, 8, 1 and 2; a value given explicitly wins).

Measured 2026-11-22 on this repository's 2-core Intel Xeon VM (AVX2, no
AVX-512; shared with other jobs), CPU, jax 0.10.2, with the defaults (60
steps of batch 8 = 480 training answers, lr 1e-3, max_length 72, 200
validation + 200 test examples): 4 min 41 s wall for the whole run at load
average ~2 (7 min 25 s at load ~5): load + tokenize ~10 s, each evaluation
~1 min, training 176 s = 2.9 s/step including the ~18 s compile. The loss
per answer token falls from 5.5 (step 1) to 0.93 (step 10) and ~0.23 from
step 20 on; two runs gave bit-identical losses and accuracies.

  =================  ==========  ====
  accuracy           validation  test
  =================  ==========  ====
  zero-shot          0.640       0.590
  LoRA, 60 steps     0.760       0.725
  =================  ==========  ====

(lr=2e-3 gave 0.735 / 0.655.) Greedy answers to the first three test
prompts, zero-shot -> after training (labels rotten, fresh, rotten)::

  'Well-meaning but inert.'
      "This review is positive, but it's" -> 'rotten'
  "The story's not anything you haven't seen beforebut The Kingston High ..."
      "This review is positive, but it's" -> 'fresh'
  'Lush and beautifully photographed (somebody suggested the stills might ...'
      'This review is both positive and negative.' -> 'fresh'
"""

import ml_collections

from experiments import tasks
from experiments.configs import common

SEVEN = r'layers_\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel'
# Hook points (llama.py): every layer's attention and MLP outputs, before the
# residual; and the RMSNorm scales (two a layer and the final one).
SUB_LAYER_OUTPUTS = r'layers_\d+/(self_attn/attention_output|mlp/ffn_output)'
RMS_NORMS = r'(layers_\d+/(input|post_attention)_layernorm|norm)/scale'
ADAPTION_PROMPTS = r'layers_\d+/self_attn/adaption_prompt'
KV_POINTS = r'layers_\d+/self_attn/attention_kv'

# method -> (rules, default learning rate).
METHODS = {
  'lora': ([(SEVEN, 'lora(rank=8, alpha=16)')], 1e-3),
  'dora': ([(SEVEN, 'dora(rank=8, alpha=16)')], 1e-3),
  'pissa': ([(SEVEN, 'pissa(rank=8, alpha=16)')], 2e-4),
  'ia3': ([(SEVEN, 'ia3()')], 3e-3),
  'ssb': ([(SEVEN, 'ssb()')], 3e-3),
  # Bottleneck adapters after every attention and MLP block, norms trained
  # (Houlsby et al.).
  'houlsby': (
    [
      (SUB_LAYER_OUTPUTS, 'houlsby(reduction_factor=16)'),
      (RMS_NORMS, 'ln_tuning()'),
    ],
    1e-3,
  ),
  # LLaMA-Adapter (Zhang et al.): 10 adaption prompts with zero-init gates in
  # every layer's attention (HF PEFT's adapter_layers = all 30); the learning
  # rate is an untuned guess. The paper adapts the top L layers only, a rule
  # such as 'layers_(2[2-9])/self_attn/adaption_prompt' for the top 8; here
  # the greedy generations run the scanned model (lm_choice's
  # make_show_generations stacks the adapted layers), which needs the same
  # adapters in every layer.
  'adaption_prompt': ([(ADAPTION_PROMPTS, 'adaption_prompt(length=10)')], 9e-3),
  # Prefix tuning (Li & Liang) in every layer through its shared MLP; the
  # learning rate is an untuned guess.
  'prefix_tuning': ([(KV_POINTS, 'prefix_tuning(length=10, bottleneck=512)')], 1e-3),
  # Prompt tuning (Lester et al.): 10 vectors before the token embeddings,
  # drawn N(0, 0.14²) like SmolLM2's embedding table (std 0.136); they stand
  # before the KV cache the task scores and generates with. The learning
  # rate is an untuned guess.
  'prompt_tuning': (
    [('input_embeddings', "prompt_tuning(length=10, init='normal', init_scale=0.14)")],
    3e-2,
  ),
}


# runlocal's defaults of the arguments (an argument given explicitly wins).
LOCAL = dict(steps=3, batch_size=2, eval_limit=8, log_every=1, checkpoint_every=2)


def get_config(arg=None):
  """The run config; ``arg`` is e.g. ``'steps=100,batch_size=8'``."""
  arg = common.parse_local_arg(
    arg,
    LOCAL,
    method='lora',
    steps=60,
    batch_size=8,
    lr=0.0,
    seed=0,
    eval_limit=200,
    frozen='float32',
    log_every=10,
    eval_every=0,
    checkpoint_every=50,
    checkpoint_minutes=1.0,
    nonfinite='stop',
    runlocal=False,
    **common.GROUP_ARGS,
  )
  rules, default_lr = common.lookup(METHODS, 'method', arg.method)
  frozen_formats = dict.fromkeys(tasks.FROZEN_FORMATS)
  common.lookup(frozen_formats, 'frozen', arg.frozen)

  config = ml_collections.ConfigDict()
  suffix = '' if arg.frozen == 'float32' else f'_{arg.frozen}'
  config.name = f'smollm2_rotten_tomatoes_{arg.method}{suffix}'
  config.task = 'lm_choice'
  config.seed = arg.seed
  config.model = dict(
    checkpoint='smollm2',
    frozen=arg.frozen,
    max_length=72,
    system='Answer with one word.',
    user='Review: {text}\nIs this movie review fresh (positive) or rotten (negative)?',
  )
  config.data = dict(
    name='rotten_tomatoes',
    n_validation=1000,
    n_test=1000,
    eval_limit=arg.eval_limit or None,
  )
  config.generate = dict(num_examples=3, max_new_tokens=8)
  config.adapters = list(rules)
  config.method = arg.method
  config.schedule = None
  config.steps = arg.steps
  config.batch_size = arg.batch_size
  config.eval_batch_size = 50
  config.lr = arg.lr or default_lr
  # LoRA matmuls as x @ w + s·(x @ a) @ b: no w' and no weight gradients.
  config.factored = True
  config.warmup_steps = common.warmup_steps(arg.steps)
  config.weight_decay = 0.0
  common.set_loop(config, arg)

  if arg.runlocal:
    config.eval_batch_size = 4
    config.generate.num_examples = 1
    config.generate.max_new_tokens = 2
  return config


def sweep(arg=None):
  """One run per method (``--only`` picks a subset by name)."""
  del arg
  return [f'method={method}' for method in METHODS]
