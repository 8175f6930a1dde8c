"""A trainer process for ``experiments_reliability_test``: the LoRA run of
``reliability_config`` on the tiny task, which SIGKILLs itself where
``argv[2]`` says.

  python -m tests.experiments_kill_worker WORKDIR [WHERE]

``WHERE`` (none: run to the end): ``batch:N`` (fetching the batch of step
N + 1), ``save_start:N`` (entering the save of step N), ``save_async:N``
(orbax writing step N, before it is finished), ``save_done:N`` (step N
saved), ``results`` (the adapter written, results.json not yet).
"""

import os
import signal
import sys

import peft_jax as pj
from experiments import tasks, train
from peft_jax._src import files
from tests import experiments_test


def die() -> None:
  os.kill(os.getpid(), signal.SIGKILL)


def kill_at(where: str) -> None:
  """Patches the trainer to die at ``where``."""
  point, _, at = where.partition(':')
  at = int(at or -1)
  build = experiments_test.build_tiny

  def build_dying(config):
    task = build(config)

    def train_batch(position):
      if point == 'batch' and position == at:
        die()
      return task.train_batch(position)

    return task._replace(train_batch=train_batch)

  save = pj.save_checkpoint

  def save_dying(manager, state, metadata):
    step = int(state.step)
    if point == 'save_start' and step == at:
      die()
    if point == 'save_async' and step == at:
      manager.wait_until_finished = die  # orbax saves in the background
    save(manager, state, metadata)
    if point == 'save_done' and step == at:
      die()

  write = files.write_text_atomically

  def write_dying(path, text):
    if point == 'results' and str(path).endswith('results.json'):
      die()
    write(path, text)

  tasks.build = build_dying
  pj.save_checkpoint = save_dying
  files.write_text_atomically = write_dying


def main(workdir: str, where: str = '') -> None:
  from tests import experiments_reliability_test

  tasks.build = experiments_test.build_tiny
  if where:
    kill_at(where)
  config = experiments_reliability_test.reliability_config()
  train.train_and_evaluate(config, workdir)


if __name__ == '__main__':
  main(*sys.argv[1:])
