"""The offline Rotten Tomatoes data and the deterministic batching."""

import numpy as np
import pytest

import peft_jax as pj
from peft_jax.data import batching, rotten_tomatoes


def test_corpus_and_fixed_splits():
  corpus = rotten_tomatoes.load()
  assert len(corpus.texts) == 12752 == len(set(corpus.texts))  # 12,808 minus duplicates
  assert set(np.unique(corpus.labels)) == {0, 1}
  splits = rotten_tomatoes.splits()
  assert {k: len(v.texts) for k, v in splits.items()} == {
    'test': 1000,
    'validation': 1000,
    'train': 10752,
  }
  sets = {k: set(v.texts) for k, v in splits.items()}
  assert not (sets['train'] & sets['test']) and not (sets['validation'] & sets['test'])
  again = rotten_tomatoes.splits()
  assert again['test'].texts == splits['test'].texts
  assert 0.55 < splits['test'].labels.mean() < 0.60  # fresh share, as in the corpus


def test_split_sizes_that_leave_no_training_data_are_an_error():
  with pytest.raises(ValueError, match='leaves no training data'):
    rotten_tomatoes.splits(n_validation=6000, n_test=7000)


def test_train_batches_are_a_function_of_the_step_and_cover_each_epoch():
  arrays = {'x': np.arange(10), 'y': np.arange(10) * 2}
  batches = batching.train_batches(arrays, 3, seed=1)
  first = [batches[step]['x'] for step in range(10)]
  again = [batching.train_batches(arrays, 3, seed=1)[step]['x'] for step in range(10)]
  np.testing.assert_array_equal(first, again)
  # 30 examples in 10 batches of 3: exactly 3 epochs, each a permutation.
  seen = np.concatenate(first).reshape(3, 10)
  for epoch in seen:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(10))
  assert not np.array_equal(seen[0], seen[1])  # reshuffled next epoch
  other_seed = np.concatenate(
    [batching.train_batches(arrays, 3, seed=2)[t]['x'] for t in range(4)]
  )
  assert not np.array_equal(other_seed, np.concatenate(first[:4]))
  batch = batches[4]
  np.testing.assert_array_equal(batch['y'], batch['x'] * 2)


@pytest.mark.parametrize('batch_size', [0, 11])
def test_train_batches_refuse_a_batch_size_outside_the_split(batch_size):
  with pytest.raises(pj.PeftError, match=f'batch_size={batch_size} must be in'):
    batching.train_batches({'x': np.arange(10)}, batch_size)


def test_eval_batches_cover_every_example_once_with_fixed_shapes():
  arrays = {'x': np.arange(7)}
  batches = list(batching.eval_batches(arrays, 3))
  assert [b['x'].shape for b in batches] == [(3,)] * 3
  real = np.concatenate([b['x'][b['weight'] > 0] for b in batches])
  np.testing.assert_array_equal(real, np.arange(7))
