"""One process of ``multihost_test``: ``python multihost_worker.py RANK PORT OUT``.

Joins a 2-process ``jax.distributed`` run on localhost (4 CPU devices each,
gloo collectives), places a LoRA θ on the global 8-device mesh with ``a``
sharded over ``d_in`` (each process holds half of it), and calls
``save_adapter`` to ``OUT/adapter_<rank>.safetensors`` from every process.
"""

import os
import sys

RANK, PORT, OUT = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'

import jax  # noqa: E402

jax.distributed.initialize(f'localhost:{PORT}', num_processes=2, process_id=RANK)

import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import peft_jax as pj  # noqa: E402
from tests._src.multihost_test import adapter_frozen_and_theta  # noqa: E402


def main():
  assert jax.process_count() == 2 and jax.device_count() == 8
  _, _, (params, buffers) = adapter_frozen_and_theta()
  mesh = jax.make_mesh((8,), ('data',))

  def place(x, spec):
    host = np.asarray(x)
    return jax.make_array_from_callback(
      host.shape, NamedSharding(mesh, spec), lambda index: host[index]
    )

  lora = params['body']['kernel']
  params = {
    'body': {'kernel': lora._replace(a=place(lora.a, P('data')), b=place(lora.b, P()))}
  }
  assert not params['body']['kernel'].a.is_fully_addressable
  pj.save_adapter(f'{OUT}/adapter_{RANK}.safetensors', params, buffers, {'rank': RANK})
  print(f'rank {RANK} done', flush=True)


if __name__ == '__main__':
  main()
