"""DiffPruning's projection: after the burn-in, fix a top-k mask per leaf."""

import jax
import jax.numpy as jnp

from peft_jax._src import checks, paths
from peft_jax._src.base import Array, Entry, Schedule, TreeAdapter
from peft_jax._src.schedules import stateless_lookup, top_k_mask
from peft_jax.methods.diff_pruning import DiffPruningBuffers, DiffPruningParams

SCORES = ('alpha', 'diff')


def gated_diff(shape, entry: Entry) -> Array:
  """``z ⊙ d`` of one leaf with the deterministic gate, shaped like ``d``.

  The leaf adapter's own ``apply`` on a zero weight of the frozen ``shape``
  (so any wrapper's reshaping applies), with the mask not yet fixed and the
  ``Noise`` inactive.
  """
  params, buffers = entry.params, entry.buffers
  probe = buffers._replace(
    fixed=jnp.zeros_like(buffers.fixed),
    noise=buffers.noise._replace(active=jnp.zeros_like(buffers.noise.active)),
  )
  diff = entry.adapter.apply(jnp.zeros(shape, jnp.float32), params, probe)
  return jnp.reshape(diff, params.w.shape)


def fix_leaf(
  shape, entry: Entry, score: str
) -> tuple[DiffPruningParams, DiffPruningBuffers]:
  """One leaf's fix: the mask of its top ``k`` scores, and ``d ← mask ⊙ z ⊙ d``.

  ``score='alpha'`` ranks entries by ``|α|`` (the SAM code), ``'diff'`` by
  ``|z ⊙ d|`` (Guo et al.'s magnitude pruning of the diff vector).
  """
  params, buffers = entry.params, entry.buffers
  diff = gated_diff(shape, entry)
  value = jnp.abs(params.alpha if score == 'alpha' else diff)
  mask = top_k_mask(value, buffers.k)
  params = params._replace(
    w=jnp.where(mask, diff, jnp.zeros_like(diff)).astype(params.w.dtype)
  )
  buffers = buffers._replace(mask=mask, fixed=jnp.ones_like(buffers.fixed))
  return params, buffers


def diff_pruning_schedule(
  adapter: TreeAdapter, burn_in_steps: int = 500, *, score: str = 'alpha'
) -> Schedule:
  """DiffPruning's switch from the gated diff to a fixed mask.

  Governed leaves are those whose parameters are ``DiffPruningParams``,
  however the method is wrapped (``matrix_view``, a hand-built copy,
  ``stacked``: there each layer's slice is fixed on its own).

  After update ``t = burn_in_steps``, for every governed leaf (``fix_leaf``):

  * ``mask`` = the top ``k = ⌊p · size⌋`` entries by ``|α|`` (``score=
    'alpha'``, the SAM code; ``'diff'`` ranks by ``|z ⊙ d|``, Guo et al.'s
    magnitude pruning), exactly ``k`` of them (``top_k_mask``);
  * ``d ← mask ⊙ z ⊙ d`` with the deterministic gate ``z``: Guo et al. keep
    the diff vector ``z ⊙ d``, so the evaluation-form weight of every kept
    entry is unchanged by the fix (the SAM code keeps ``d`` itself, a jump
    of ``(1 − z) d`` where ``z < 1``);
  * ``fixed = True``: from then on ``θ = θ0 + mask ⊙ d`` and the penalty is
    0, so ``‖θ − θ0‖₀ ≤ k`` holds exactly whatever the optimizer does:
    weight decay and momentum still move ``d`` outside the mask and ``α``,
    but neither reaches ``θ`` any more.

  The optimizer state is left alone: the kept entries keep their moments (a
  fresh start would lose their history for no gain), the others no longer
  reach ``θ``. The SAM code fixes the mask before its ``burnin``-th forward
  (``burnin − 1`` gated updates); here ``burn_in_steps`` gated updates run.
  The ranking runs inside a ``lax.cond``, only at that step.

  Args:
    adapter: a tree-level adapter (``by_rules``) with ``diff_pruning`` leaves.
    burn_in_steps: ``t > 0``, the gated updates before the fix (the SAM
      code's default ``burnin=500``; its runs use 600).
    score: ``'alpha'`` (default, the SAM code) or ``'diff'``.

  Returns:
    The ``Schedule`` (its state is ``()``).
  """
  name = 'diff_pruning_schedule'
  burn_in = checks.positive_int(name, 'burn_in_steps', burn_in_steps)
  checks.choice(name, 'score', score, SCORES)

  leaves, init = stateless_lookup(name, adapter, DiffPruningParams)

  def fix(frozen, params, buffers):
    flat = paths.flatten(frozen)
    fixed = {
      leaf: fix_leaf(jnp.shape(flat[leaf]), entry, score)
      for leaf, entry in leaves(frozen, params, buffers).items()
    }
    params = paths.replace(params, {leaf: p for leaf, (p, _) in fixed.items()})
    buffers = paths.replace(buffers, {leaf: b for leaf, (_, b) in fixed.items()})
    return params, buffers

  def update(state, frozen, params, buffers, grads, opt_state, step):
    del grads
    params, buffers = jax.lax.cond(
      step == burn_in,
      lambda p, b: fix(frozen, p, b),
      lambda p, b: (p, b),
      params,
      buffers,
    )
    return params, buffers, opt_state, state

  return Schedule(init=init, update=update)
