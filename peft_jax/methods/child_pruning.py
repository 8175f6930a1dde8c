"""ChildPruning (the SAM paper's projection baseline): a dense diff, projected."""

import math
from typing import NamedTuple

import jax.numpy as jnp

from peft_jax._src import checks
from peft_jax._src.additive import additive
from peft_jax._src.base import Adapter, Array
from peft_jax._src.checks import budget, probability
from peft_jax._src.registry import register


class ChildPruningParams(NamedTuple):
  """The dense change of the leaf, ``delta``, shaped like it.

  ``child_pruning_schedule`` governs every leaf whose parameters have this type.
  """

  delta: Array


class ChildPruningBuffers(NamedTuple):
  """``k``: int32 scalar, ``⌊p · size⌋``, the entries a projection keeps."""

  k: Array


@register('child_pruning')
def child_pruning(p: float = 0.005, *, param_dtype: str = 'float32') -> Adapter:
  """ChildPruning: ``w' = w + Δ``, with ``Δ`` projected to its top-k entries.

  Shapes: any leaf ``w`` (Flax layout ``(d_in, d_out)`` for kernels);
  params ``ChildPruningParams(delta: Δ)`` shaped like ``w``; buffers
  ``ChildPruningBuffers(k)``, ``k = ⌊p · size⌋``. The SAM paper's
  projection-based baseline (Fu et al., AAAI 2023, unified view: it trains
  the full model and projects it onto the p-sparse set, iteratively; named
  after ChildTuning, Xu et al., EMNLP 2021): the whole leaf trains densely
  as ``θ = θ0 + Δ`` and ``child_pruning_schedule`` projects it every few
  updates,
  ``Δ ← Δ ⊙ top-k(|Δ|)``, i.e. ``θ`` is reset to ``θ0`` outside its ``k``
  largest changes. After the last projection ``‖θ − θ0‖₀ ≤ k``.

  Init ``Δ = 0``: identity at init. Trainable count ``size(w)``. Mergeable
  and invertible. Factored form ``y = x @ w + x @ Δ`` (no saving: ``Δ`` is
  dense).

  Args:
    p: the kept fraction, ``0 < p <= 1`` (0.005 in the SAM paper).
    param_dtype: dtype of ``Δ``; ``w'`` keeps ``w``'s dtype.

  Returns:
    The ChildPruning ``Adapter``; train it with ``child_pruning_schedule``.
  """
  name = 'child_pruning'
  p = probability(name, p)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    del key
    params = ChildPruningParams(delta=jnp.zeros(jnp.shape(w), dtype))
    return params, ChildPruningBuffers(
      k=jnp.asarray(budget(p, jnp.shape(w)), jnp.int32)
    )

  return additive(
    init,
    lambda w, params, buffers: params.delta,
    delta_product=lambda x, w, params, buffers: x @ params.delta,
    num_params=math.prod,
  )
