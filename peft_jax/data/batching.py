"""Deterministic batches: the batch of training step t is a pure function of t.

That makes the data position of a run just its step count: a resumed run
sees exactly the batches the uninterrupted run would have seen.
"""

from collections.abc import Iterator

import numpy as np

Arrays = dict[str, np.ndarray]


def train_batch(arrays: Arrays, batch_size: int, step: int, seed: int = 0) -> Arrays:
  """The batch of training step ``step``: epochs of seeded permutations.

  Epoch ``e = step // steps_per_epoch`` uses permutation ``(seed, e)``;
  the last incomplete batch of an epoch is dropped.

  Args:
    arrays: equal-length arrays, e.g. ``input_ids (n, seq)``, ``label (n,)``.
    batch_size: examples per batch (``<= n``).
    step: the training step (the data position).
    seed: the shuffling seed.

  Returns:
    ``{name: array[batch_size, ...]}``.
  """
  n = len(next(iter(arrays.values())))
  steps_per_epoch = n // batch_size
  epoch, index = divmod(step, steps_per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(n)
  chosen = order[index * batch_size : (index + 1) * batch_size]
  return {name: array[chosen] for name, array in arrays.items()}


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
