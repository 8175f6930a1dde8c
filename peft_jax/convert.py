"""Converts adapters between Hugging Face PEFT folders and peft_jax files.

  python -m peft_jax.convert --from-hf ADAPTER_DIR OUT.safetensors --model BASE_DIR
  python -m peft_jax.convert --to-hf ADAPTER.safetensors OUT_DIR --model BASE_DIR

``BASE_DIR`` is the base model's Hugging Face folder (``config.json`` +
safetensors; Llama/Mistral/Qwen2, BERT/RoBERTa with or without a classifier),
a llama ``.gguf`` file, or ``smollm2`` / ``minilm`` (the shipped models): it
names the modules and gives their shapes. A peft_jax adapter file is what
``pj.save_adapter`` writes (the trainer's ``adapter.safetensors``): params,
buffers and the rules as metadata (``pj.save_adapter(..., rules=...)``).
Existing outputs are never replaced unless ``--overwrite`` is given.
"""

import argparse
import pathlib
import sys

import peft_jax as pj
from peft_jax import interop


def from_hf(adapter_dir: str, out: pathlib.Path, model_dir: str) -> str:
  """PEFT folder -> peft_jax adapter file; returns a one-line summary."""
  model, frozen = interop.load_base(model_dir)
  modules = interop.hf_modules(model)
  hooks = interop.example_hook_points(model)
  loaded = interop.load_hf_adapter(adapter_dir, modules, frozen, hooks)
  metadata = {'base_model': str(model_dir), 'hf_peft_config': loaded.config}
  out.parent.mkdir(parents=True, exist_ok=True)
  pj.save_adapter(str(out), loaded.params, loaded.buffers, metadata, rules=loaded.rules)
  return (
    f'wrote {out}: {len(loaded.rules)} rule(s), {pj.count(loaded.params):,} parameters'
  )


def to_hf(adapter_file: str, out: pathlib.Path, model_dir: str, task_type: str) -> str:
  """peft_jax adapter file -> PEFT folder; returns a one-line summary."""
  if not pathlib.Path(adapter_file).is_file():
    raise pj.PeftError(f'{adapter_file} does not exist; expected an adapter file.')
  model, frozen = interop.load_base(model_dir)
  hooks = interop.example_hook_points(model)
  loaded = pj.load_adapter_file(adapter_file, frozen, hooks)
  fields = {'base_model_name_or_path': str(model_dir)}
  if task_type:
    fields['task_type'] = task_type
  modules = interop.hf_modules(model)
  interop.save_hf_adapter(
    out, loaded.adapter, frozen, loaded.params, loaded.buffers, modules, **fields
  )
  return f'wrote {out}: {pj.count(loaded.params):,} parameters'


def _refuse_overwrite(out: pathlib.Path, to_hf_folder: bool) -> None:
  taken = (
    [out / interop.hf_peft.CONFIG_FILE, out / interop.hf_peft.WEIGHTS_FILE]
    if to_hf_folder
    else [out]
  )
  existing = [str(p) for p in taken if p.exists()]
  if existing:
    raise pj.PeftError(f'{existing[0]} exists; pass --overwrite to replace it.')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  direction = parser.add_mutually_exclusive_group(required=True)
  direction.add_argument('--from-hf', action='store_true', help='PEFT folder -> file')
  direction.add_argument('--to-hf', action='store_true', help='file -> PEFT folder')
  parser.add_argument('src', help='the adapter to read')
  parser.add_argument('dst', help='where to write')
  parser.add_argument(
    '--model',
    required=True,
    help="the base model: HF folder, .gguf file, 'smollm2' or 'minilm'",
  )
  parser.add_argument(
    '--task-type', default='', help="PEFT's task_type for --to-hf, e.g. CAUSAL_LM"
  )
  parser.add_argument('--overwrite', action='store_true', help='replace dst')
  args = parser.parse_args(argv)
  out = pathlib.Path(args.dst)
  try:
    if not args.overwrite:
      _refuse_overwrite(out, args.to_hf)
    if args.from_hf:
      print(from_hf(args.src, out, args.model))
    else:
      print(to_hf(args.src, out, args.model, args.task_type))
  except pj.PeftError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
