"""Runs a config's sweep and writes the comparison table and plot.

  python -m experiments.sweep --config experiments/configs/rotten_tomatoes.py \
      --workdir runs/rt_sweep [--only lora,ssb]

Each entry of the config module's ``sweep(arg)`` (an argument string such as
``'method=lora'``, combined with the ``:arg`` of ``--config``) runs in
``WORKDIR/<config.name>``; finished runs are reported, not re-run, so an
interrupted sweep continues where it stopped.
"""

import argparse
import pathlib
import sys

import peft_jax as pj
from experiments import compare, train
from experiments.configs import common


def run_sweep(config_spec: str, workdir: str, only: set[str] | None = None) -> str:
  """Trains every sweep entry (or those whose method is in ``only``)."""
  path, _, base_arg = config_spec.partition(':')
  module = common.load_module(path)
  if not hasattr(module, 'sweep'):
    raise pj.PeftError(f'config file {path!r} defines no sweep(arg)')
  for entry in module.sweep(base_arg or None):
    config = module.get_config(','.join(filter(None, [base_arg, entry])))
    if only and config.method not in only:
      continue
    print(f'=== {config.name}')
    train.train_and_evaluate(config, str(pathlib.Path(workdir) / config.name))
  return compare.write_comparison(pathlib.Path(workdir))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, help='FILE.py[:key=value,...]')
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--only', default='', help='comma-separated method names')
  args = parser.parse_args(argv)
  try:
    print(run_sweep(args.config, args.workdir, set(filter(None, args.only.split(',')))))
  except pj.PeftError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
