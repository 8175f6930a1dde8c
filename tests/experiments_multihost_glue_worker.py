"""One process of ``experiments_see_further_test``'s two-process run:
``python experiments_multihost_glue_worker.py RANK PORT WORKDIR MESH CONFIG``.

Joins a 2-process ``jax.distributed`` run on localhost (4 CPU devices each,
gloo collectives) and trains ``experiments/configs/see_further.py:CONFIG``
(a GLUE task on a tiny DeBERTa) on the global 8-device ``MESH``.
"""

import os
import sys

RANK, PORT, WORKDIR, MESH, CONFIG = sys.argv[1:6]
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'

import jax  # noqa: E402

jax.distributed.initialize(f'localhost:{PORT}', num_processes=2, process_id=int(RANK))

from experiments import train  # noqa: E402
from experiments.configs import see_further  # noqa: E402
from peft_jax.models import partitioning  # noqa: E402


def main():
  assert jax.process_count() == 2 and jax.device_count() == 8
  config = see_further.get_config(CONFIG)
  train.train_and_evaluate(config, WORKDIR, partitioning.parse_mesh(MESH))
  print(f'rank {RANK} finished', flush=True)


if __name__ == '__main__':
  main()
