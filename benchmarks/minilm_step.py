r"""The main job's training step (MiniLM-L6, LoRA r8), peft_jax against HF PEFT.

  python -m benchmarks.minilm_step --repeats 3 \
      --torch-python /path/to/venv-with-torch/bin/python

The workload of ``experiments/configs/rotten_tomatoes.py:method=lora``:
all-MiniLM-L6-v2 (real weights, float32), the attention-mask mean of its last
hidden states, dropout and a new 2-way linear head trained in full, LoRA
rank 8, alpha 16 on every layer's query and value kernels, AdamW, one batch
of 32 × 64 random tokens (all unmasked; the same tokens and labels on both
sides). Settings, each timed in its own process:

  jax_lora_factored   the main job's step: the trainer's own step
                      (experiments.train.single_program) on the task
                      experiments.tasks.text_classification builds, with the
                      config's rules, optimizer and factored path
  jax_lora_weight     the same with factored=False (weight-space LoRA)
  hf_peft_eager       transformers.BertModel from the same directory
                      (safetensors, no pooler) + the same mean pooling,
                      dropout and head, peft.LoraConfig(r=8, lora_alpha=16,
                      target_modules=['query', 'value']), torch.optim.AdamW,
                      PyTorch eager, torch's default thread count
  hf_peft_compile     the same under torch.compile
  jax_lora_factored_no_dropout, hf_peft_eager_no_dropout
                      jax_lora_factored and hf_peft_eager with every dropout
                      rate 0 (encoder and head): what dropout costs each side

Everything else (interleaved ``--repeats``, medians, per-child peak RSS,
compile time, load average, the JSON and Markdown report, ``--torch-python``)
is ``benchmarks.lora_step``'s. Model TFLOP/s counts 4N FLOPs per token (N =
the encoder's matmul weights), attention excluded.
"""

import argparse
import dataclasses
import json
import pathlib
import sys

from benchmarks import lora_step

JAX_SETTINGS = ('jax_lora_factored', 'jax_lora_weight', 'jax_lora_factored_no_dropout')
TORCH_SETTINGS = ('hf_peft_eager', 'hf_peft_compile', 'hf_peft_eager_no_dropout')
NO_DROPOUT = '_no_dropout'
BATCH, SEQ, LABELS = 32, 64, 2


def read_config(model_dir: str) -> dict:
  """The checkpoint's HF ``config.json``."""
  return json.loads((pathlib.Path(model_dir) / 'config.json').read_text())


def random_batch(model_dir: str) -> dict:
  """``BATCH × SEQ`` random token ids (past the special tokens), an all-ones
  attention mask and random labels, as int32 numpy arrays (seeded, so both
  frameworks see the same batch)."""
  import numpy as np

  rng = np.random.default_rng(0)
  vocab = read_config(model_dir)['vocab_size']
  ids = rng.integers(1000, vocab, (BATCH, SEQ), dtype=np.int32)
  labels = rng.integers(0, LABELS, BATCH, dtype=np.int32)
  return {'input_ids': ids, 'attention_mask': np.ones_like(ids), 'label': labels}


def run_jax(setting: str, model_dir: str, warmup: int, steps: int) -> dict:
  """The trainer's step of ``rotten_tomatoes.py:method=lora``, on one device."""
  import jax

  import peft_jax as pj
  from experiments import selection, train
  from experiments.configs import rotten_tomatoes
  from experiments.tasks import text_classification
  from peft_jax.models import bert, partitioning

  config = rotten_tomatoes.get_config('method=lora')
  config.factored = setting != 'jax_lora_weight'
  encoder_config, encoder = bert.load_hf(model_dir)
  if setting.endswith(NO_DROPOUT):  # The head's dropout reads hidden_dropout.
    encoder_config = dataclasses.replace(
      encoder_config, hidden_dropout=0.0, attention_dropout=0.0
    )
  batch = random_batch(model_dir)
  arrays = {split: batch for split in ('train', 'validation', 'test')}
  task = text_classification.make_task(
    config, encoder_config, encoder, arrays, f'MiniLM-L6 ({model_dir})'
  )
  mesh = train.make_mesh(config, {'data': 1})
  with jax.set_mesh(mesh):
    shardings = partitioning.param_shardings(task.frozen, task.param_axes, mesh)
    frozen = partitioning.place(task.frozen, shardings)
    rules = selection.rules_for(config, task)
    tree = pj.by_rules(rules)
    run = train.Run(
      config, mesh, task, frozen, rules, tree, train.make_optimizer(config),
      train.make_schedule(config, tree),
    )  # fmt: skip
    program = train.single_program(run)
    row = lora_step.time_jax(
      jax.jit(program.step, donate_argnums=0),
      train.initial_state(run),
      frozen,
      program.batch(0),
      warmup,
      steps,
    )
  trainable = pj.count(row.pop('state').params)
  return {**row, 'trainable': trainable, 'dtype': 'float32'}


def run_torch(setting: str, model_dir: str, warmup: int, steps: int) -> dict:
  """HF PEFT's LoRA on ``transformers.BertModel`` with the same head."""
  import peft
  import torch
  import transformers

  torch.manual_seed(0)
  rates = {}
  if setting.endswith(NO_DROPOUT):  # The head's dropout reads hidden_dropout_prob.
    rates = {'hidden_dropout_prob': 0.0, 'attention_probs_dropout_prob': 0.0}
  bert = transformers.BertModel.from_pretrained(
    model_dir, dtype=torch.float32, add_pooling_layer=False, **rates
  )
  lora = peft.LoraConfig(
    r=8, lora_alpha=16, target_modules=['query', 'value'], lora_dropout=0.0
  )
  encoder = peft.get_peft_model(bert, lora)
  dropout = torch.nn.Dropout(bert.config.hidden_dropout_prob)
  head = torch.nn.Linear(bert.config.hidden_size, LABELS)
  encoder.train()
  trainable = [p for p in encoder.parameters() if p.requires_grad]
  trainable += list(head.parameters())
  optimizer = torch.optim.AdamW(trainable, lr=2e-3, weight_decay=0.0)
  batch = {k: torch.from_numpy(v).long() for k, v in random_batch(model_dir).items()}

  def loss_of(ids, mask, labels):
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    weights = mask[..., None].to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    logits = head(dropout(pooled))
    return torch.nn.functional.cross_entropy(logits, labels)

  forward = torch.compile(loss_of) if setting == 'hf_peft_compile' else loss_of

  def step():
    forward(batch['input_ids'], batch['attention_mask'], batch['label']).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  versions = (
    f'torch {torch.__version__}, transformers {transformers.__version__}, '
    f'peft {peft.__version__}'
  )
  return {
    **lora_step.time_torch(step, setting, warmup, steps),
    'trainable': sum(p.numel() for p in trainable),
    'framework': versions,
    'dtype': 'float32',
  }


def measure(setting: str, model_dir: str, warmup: int, steps: int) -> dict:
  """Runs one setting in this process; returns its JSON row."""
  run = run_jax if setting in JAX_SETTINGS else run_torch
  raw = run(setting, model_dir, warmup, steps)
  config = read_config(model_dir)
  d, layers = config['hidden_size'], config['num_hidden_layers']
  matmul_params = layers * (4 * d * d + 2 * d * config['intermediate_size'])
  row = lora_step.child_row(setting, raw, BATCH * SEQ, 4 * matmul_params)
  return {
    **row,
    'workload': 'minilm',
    'model_dir': model_dir,
    'batch': BATCH,
    'seq': SEQ,
    'warmup': warmup,
    'timed_steps': steps,
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
    '--model-dir', help='default: peft_jax.models.bert.minilm_dir() (all-MiniLM-L6-v2)'
  )
  parser.add_argument('--out', default='benchmarks/results/minilm_step.json')
  lora_step.add_common_arguments(parser, warmup=3, steps=10)
  args = parser.parse_args(argv)
  if args.one:
    print(json.dumps(measure(args.one, args.model_dir, args.warmup, args.steps)))
    return 0

  if args.model_dir is None:
    from peft_jax.models import bert

    args.model_dir = bert.minilm_dir()
  settings = (
    list(JAX_SETTINGS) + list(TORCH_SETTINGS)
    if args.settings == 'all'
    else args.settings.split(',')
  )
  options = ['--model-dir', args.model_dir, '--warmup', str(args.warmup),
             '--steps', str(args.steps)]  # fmt: skip
  out = pathlib.Path(args.out)
  rows = lora_step.run_interleaved(
    'benchmarks.minilm_step',
    lora_step.runnable(settings, args.torch_python),
    options,
    args.repeats,
    args.torch_python,
    args.child_timeout,
    save=lambda rows: lora_step.write_report(rows, out, echo=False),
  )
  lora_step.write_report(rows, out)
  return 0 if rows else 1


if __name__ == '__main__':
  sys.exit(main())
