"""Deterministic batches (grain): the batch of training step t is a pure function of t.

That makes the data position of a run just its step count: a resumed run
sees exactly the batches the uninterrupted run would have seen.
"""

from collections.abc import Iterator

import grain
import numpy as np

from peft_jax._src.base import PeftError

Arrays = dict[str, np.ndarray]


def train_batches(arrays: Arrays, batch_size: int, seed: int = 0) -> grain.MapDataset:
  """Training batches as a random-access grain dataset: item ``t`` is the
  batch of step ``t``, ``{name: array[batch_size, ...]}``.

  Epochs of seeded shuffles (grain reseeds each epoch), cut into batches of
  ``batch_size``; a batch may span two epochs, so every example is seen
  once per epoch and none is dropped.

  Raises:
    PeftError: unless ``0 < batch_size <= n``, the examples in ``arrays``.
  """
  n = len(next(iter(arrays.values())))
  if not 0 < batch_size <= n:
    raise PeftError(f'batch_size={batch_size} must be in [1, {n}] (the train split)')
  return (
    grain.MapDataset.range(n)
    .shuffle(seed=seed)
    .repeat()
    .batch(batch_size, drop_remainder=True)
    .map(lambda index: {k: v[index] for k, v in arrays.items()})
  )


def eval_batches(arrays: Arrays, batch_size: int) -> Iterator[Arrays]:
  """Fixed-size batches covering every example once, in order.

  The last batch is padded by repeating example 0; ``weight`` (1 for real,
  0 for padding) lets metrics ignore the padding while shapes stay fixed, so
  a jitted evaluation compiles once.
  """
  n = len(next(iter(arrays.values())))
  for start in range(0, n, batch_size):
    index = np.arange(start, start + batch_size)
    real = index < n
    index = np.where(real, index, 0)
    yield {
      **{k: v[index] for k, v in arrays.items()},
      'weight': real.astype(np.float32),
    }
