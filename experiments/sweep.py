"""Runs a config's sweep and writes the comparison table and plot.

  python -m experiments.sweep --config experiments/configs/rotten_tomatoes.py \
      --workdir runs/rt_sweep [--only lora,ssb] [--mesh data=2,fsdp=4]

Each entry of the config module's ``sweep(arg)`` (an argument string such as
``'method=lora'``, combined with the ``:arg`` of ``--config``) runs in
``WORKDIR/<config.name>``; finished runs are reported, not re-run, so an
interrupted sweep continues where it stopped. ``--mesh`` lays every run out
on that device mesh (``experiments.train``).
"""

import argparse
import pathlib
import sys

import peft_jax as pj
from experiments import compare, train
from experiments.configs import common
from peft_jax.models import partitioning


def run_sweep(
  config_spec: str,
  workdir: str,
  only: set[str] | None = None,
  mesh: dict[str, int] | None = None,
) -> str:
  """Trains every sweep entry (or those whose method is in ``only``), on
  ``mesh`` (axis sizes; see ``train.make_mesh``).

  Raises:
    PeftError: before anything trains, for a name in ``only`` that is not a
      method of the sweep (with the closest ones).
  """
  path, _, base_arg = config_spec.partition(':')
  module = common.load_module(path)
  if not hasattr(module, 'sweep'):
    raise pj.PeftError(f'config file {path!r} defines no sweep(arg)')
  configs = [
    module.get_config(','.join(filter(None, [base_arg, entry])))
    for entry in module.sweep(base_arg or None)
  ]
  _check_only(only, {config.method for config in configs}, path)
  for config in configs:
    if only and config.method not in only:
      continue
    print(f'=== {config.name}')
    train.train_and_evaluate(config, str(pathlib.Path(workdir) / config.name), mesh)
  return compare.write_comparison(pathlib.Path(workdir))


def _check_only(only: set[str] | None, methods: set[str], path: str) -> None:
  """Raises naming each ``--only`` name the sweep does not run."""
  unknown = sorted((only or set()) - methods)
  if not unknown:
    return
  hints = ', '.join(f'{n!r}{common.did_you_mean(n, methods)}' for n in unknown)
  raise pj.PeftError(
    f'--only names {hints}, not in the sweep of {path}; its methods: '
    f'{",".join(sorted(methods))}.'
  )


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, help='FILE.py[:key=value,...]')
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--only', default='', help='comma-separated method names')
  parser.add_argument(
    '--mesh', default='', help='device mesh sizes, e.g. data=2,fsdp=4'
  )
  args = parser.parse_args(argv)
  try:
    only = set(filter(None, args.only.split(',')))
    mesh = partitioning.parse_mesh(args.mesh)
    print(run_sweep(args.config, args.workdir, only, mesh))
  except pj.PeftError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
