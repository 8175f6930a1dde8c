"""Sparse fine-tuning, ``θ = θ0 + M ⊙ Δ`` (Fu et al., AAAI 2023, Definition 1).

Every selective method of the SAM paper (SAM, Random, MagPruning, FishMask,
LT-SFT) trains the same thing: the entries of a fixed mask ``M``. Here the
mask is stored as its ``k`` flat indices and only their ``k`` values are
parameters, so the optimizer state is ``k``-sized (not leaf-sized), weight
decay and clipping act on the selected values only, and ``‖θ − θ0‖₀ ≤ k``
holds exactly by construction, whatever the optimizer does. The indices and
values are also the p-sparse adapter file (``save_adapter``): about 6 bytes
per changed entry.

``sparse(k=...)`` alone picks ``k`` entries uniformly at random (the paper's
Random baseline); ``sparse_rules(mask)`` turns a mask from
``peft_jax.selection`` into rules whose leaves train exactly the masked
entries.
"""

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src import checks, paths
from peft_jax._src.additive import additive
from peft_jax._src.base import Adapter, Array, PeftError
from peft_jax._src.registry import register
from peft_jax._src.rules import Rule


class SparseParams(NamedTuple):
  """The changes at the selected entries: ``values: (k,)``."""

  values: Array


class SparseBuffers(NamedTuple):
  """The selected entries as gaps between sorted flat indices.

  ``indices = cumsum(gaps)`` (row-major flat positions in the leaf, strictly
  increasing); ``gaps: (k,)`` is ``uint16`` when every gap fits, else
  ``uint32``, so the file holds 2 (or 4) bytes per index.
  """

  gaps: Array


def encode(indices: np.ndarray) -> SparseBuffers:
  """``SparseBuffers`` of sorted, distinct, concrete flat ``indices: (k,)``."""
  indices = np.asarray(indices, np.int64)
  gaps = np.diff(indices, prepend=0)
  small = gaps.size == 0 or gaps.max() < 2**16
  return SparseBuffers(jnp.asarray(gaps, np.uint16 if small else np.uint32))


def flat_indices(buffers: SparseBuffers) -> Array:
  """The selected flat indices, ``int32 (k,)``."""
  return jnp.cumsum(buffers.gaps.astype(jnp.int32))


def _random_buffers(key: Array, size: int, k: int) -> SparseBuffers:
  """``k`` distinct entries of ``range(size)``, uniformly (traceable)."""
  chosen = jnp.sort(jax.random.choice(key, size, (k,), replace=False))
  return SparseBuffers(jnp.diff(chosen, prepend=0).astype(jnp.uint32))


def _scatter(w: Array, params: SparseParams, buffers: SparseBuffers) -> Array:
  """``Δ``: zeros shaped like ``w`` with ``values`` at the selected entries."""
  delta = jnp.zeros(w.size, params.values.dtype)
  return delta.at[flat_indices(buffers)].set(params.values).reshape(w.shape)


@register('sparse')
def sparse(k: int, *, param_dtype: str = 'float32') -> Adapter:
  """Trains ``k`` entries of a leaf: ``w' = w + scatter(indices, values)``.

  Any shape ``w`` with ``size(w) >= k``. ``values: (k,)`` start at 0
  (identity at init); the indices (``SparseBuffers``) are ``k`` distinct
  entries drawn uniformly at random by ``init`` — the Random baseline — or
  those of a given mask (``sparse_rules``). Trainable and changed count
  ``k``. Mergeable and invertible. No factored form: the factored path
  applies it in weight space, which measured as fast as full fine-tuning on
  a 2-core CPU, while a gather/scatter form (``x @ w + Σ_j x[..., r_j] v_j
  e_{c_j}``) took 2× the step time and 10% more peak memory
  (``benchmarks/sparse_memory.py``).

  Args:
    k: the number of trained entries, ``k >= 1``.
    param_dtype: dtype of ``values``.
  """
  name = 'sparse'
  k = checks.positive_int(name, 'k', k)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    if k > w.size:
      raise PeftError(f'{name}: k={k} exceeds the leaf size {w.size} (shape {w.shape})')
    return SparseParams(jnp.zeros(k, dtype)), _random_buffers(key, w.size, k)

  return additive(init, _scatter, num_params=lambda shape: k)


def sparse_rules(mask, *, param_dtype: str = 'float32') -> list[Rule]:
  """Rules training exactly the ``True`` entries of a mask tree.

  Args:
    mask: a sparse nested dict keyed like the frozen tree, with a boolean
      array per scored leaf (``peft_jax.selection.top_p``); leaves with no
      ``True`` entry get no rule.
    param_dtype: dtype of the trained values.

  Returns:
    One rule per masked leaf, ``(re.escape(name), adapter)``, the adapter
    named ``sparse(k=...)`` with ``init`` returning the mask's indices. Put
    them before any broader rule (first match wins), e.g.
    ``by_rules(sparse_rules(mask) + [('classifier/.*', 'full()')])``.
  """
  dtype = checks.float_dtype('sparse', 'param_dtype', param_dtype)
  rules = []
  for name, leaf_mask in paths.named_leaves(mask):
    leaf_mask = np.asarray(leaf_mask)
    if leaf_mask.dtype != bool:
      raise PeftError(f'sparse_rules: mask at {name!r} is {leaf_mask.dtype}, not bool')
    indices = np.flatnonzero(leaf_mask)
    if indices.size:
      method = sparse(k=int(indices.size), param_dtype=param_dtype)
      chosen = _with_indices(method, leaf_mask.shape, indices, dtype)
      rules.append((re.escape(name), chosen))
  return rules


def _with_indices(method: Adapter, shape: tuple, indices: np.ndarray, dtype) -> Adapter:
  """``method`` (a ``sparse`` adapter) whose ``init`` selects ``indices``."""
  buffers = encode(indices)

  def init(key, w):
    del key
    if tuple(w.shape) != tuple(shape):
      raise PeftError(f'sparse: the mask has shape {tuple(shape)}, the leaf {w.shape}')
    return SparseParams(jnp.zeros(indices.size, dtype)), buffers

  return method._replace(init=init)
