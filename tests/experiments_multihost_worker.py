"""One process of ``experiments_multihost_test``:
``python experiments_multihost_worker.py RANK PORT WORKDIR MESH [STOP]``.

Joins a 2-process ``jax.distributed`` run on localhost (4 CPU devices each,
gloo collectives) and runs the trainer's tiny LoRA task on the global
8-device ``MESH`` (``data=4,fsdp=2``); with ``STOP`` the task's data stops
at that step (an interrupted run, after its checkpoint), without it the
run resumes from ``WORKDIR``'s checkpoint and finishes.
"""

import os
import sys

RANK, PORT, WORKDIR, MESH = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
STOP = int(sys.argv[5]) if len(sys.argv) > 5 else None
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'

import jax  # noqa: E402

jax.distributed.initialize(f'localhost:{PORT}', num_processes=2, process_id=RANK)

from experiments import tasks, train  # noqa: E402
from peft_jax.models import partitioning  # noqa: E402
from tests import experiments_test  # noqa: E402


class Stop(Exception):
  """The interruption: raised by the data at step ``STOP``."""


def main():
  assert jax.process_count() == 2 and jax.device_count() == 8
  tasks.build = experiments_test.build_tiny_stopping_at(STOP, Stop)
  config = experiments_test.local_config('lora')
  try:
    train.train_and_evaluate(config, WORKDIR, partitioning.parse_mesh(MESH))
  except Stop:
    print(f'rank {RANK} stopped at step {STOP}', flush=True)
  else:
    print(f'rank {RANK} finished', flush=True)


if __name__ == '__main__':
  main()
