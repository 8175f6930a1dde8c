"""AdaLoRA's rank budget (Zhang et al., 2023): importance scores mask ``e``.

Also home of the helpers the schedules share: ``governed`` (the leaves of a
tree-level adapter that one method governs), ``replace_subtrees`` and
``non_negative_int``.
"""

import jax.numpy as jnp
import numpy as np

from peft_jax._src import checks, paths
from peft_jax._src.base import Adapter, AdapterParams, Array, PeftError, Schedule

FACTORS = ('a', 'b', 'e')


def non_negative_int(schedule: str, name: str, value) -> int:
  """``value`` if it is an int >= 0 (bools rejected)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise PeftError(
      f'{schedule}: {name}={value!r} must be an int, got {type(value).__name__}'
    )
  if value < 0:
    raise PeftError(f'{schedule}: {name}={value} must be >= 0')
  return int(value)


def phases(
  schedule: str, total_steps, init_warmup, final_warmup
) -> tuple[int, int, int]:
  """Validated ``(T, t_i, t_f)``: warm-up, then the active phase, then the final."""
  total = checks.positive_int(schedule, 'total_steps', total_steps)
  t_i = non_negative_int(schedule, 'init_warmup', init_warmup)
  t_f = non_negative_int(schedule, 'final_warmup', final_warmup)
  if total - t_f - t_i <= 0:
    raise PeftError(
      f'{schedule}: total_steps={total} must exceed init_warmup + final_warmup '
      f'= {t_i + t_f}'
    )
  return total, t_i, t_f


def governed(
  schedule: str, adapter: Adapter, frozen, theta: AdapterParams, method: str
) -> dict[str, tuple[Adapter, AdapterParams]]:
  """``{leaf name: (leaf adapter, leaf theta)}`` of the leaves using ``method``.

  A leaf is governed when its adapter's canonical name starts with
  ``'<method>('`` (``adalora(rank=3)``), so ``by_rules`` may mix methods;
  leaves under ``stacked(...)`` are not governed.

  Raises:
    PeftError: if ``adapter`` has no ``plan`` (it is not tree-level) or no
      leaf uses ``method``.
  """
  if adapter.plan is None:
    raise PeftError(
      f'{schedule}: needs a tree-level adapter such as by_rules(...); '
      f'{adapter.name or "this adapter"} has no plan'
    )
  chosen = {
    name: (leaf, leaf_theta)
    for name, (leaf, leaf_theta) in adapter.plan(frozen, theta).items()
    if leaf.name.startswith(f'{method}(')
  }
  if not chosen:
    raise PeftError(f'{schedule}: no leaf of {adapter.name} uses {method}(...)')
  return chosen


def replace_subtrees(tree: dict, replacements: dict[str, object]) -> dict:
  """``tree`` (nested dicts, not modified) with the node at each name replaced."""

  def put(node, keys, value):
    if not keys:
      return value
    return {**node, keys[0]: put(node[keys[0]], keys[1:], value)}

  for name, value in replacements.items():
    tree = put(tree, name.split(paths.SEPARATOR), value)
  return tree


def budget(
  step,
  *,
  initial: int,
  target: int,
  total_steps: int,
  init_warmup: int,
  final_warmup: int,
) -> Array:
  """AdaLoRA's cubic rank budget ``b(t)`` after ``t = step`` updates (int32).

  ``b(t) = b0`` for ``t <= t_i``; ``b_T`` for ``t > T − t_f``; otherwise
  ``⌊b_T + (b0 − b_T)(1 − (t − t_i)/(T − t_f − t_i))³⌋``. Computed in
  float32 (it runs inside the jitted step); the reference computes it in
  double precision, so the two can differ by one only where the cubic lies
  within float32 round-off of an integer.

  Args:
    step: ``t``, a scalar (traced or concrete).
    initial: ``b0``, the sum of the initial ranks.
    target: ``b_T``, the final total rank.
    total_steps: ``T``.
    init_warmup: ``t_i``.
    final_warmup: ``t_f``.
  """
  span = total_steps - final_warmup - init_warmup
  progress = (jnp.asarray(step, jnp.float32) - init_warmup) / span
  cubic = jnp.floor(target + (initial - target) * (1.0 - progress) ** 3)
  return jnp.where(
    step <= init_warmup,
    initial,
    jnp.where(step > total_steps - final_warmup, target, cubic),
  ).astype(jnp.int32)


def sensitivity_update(avg, unc, theta, grads, beta1: float, beta2: float):
  """One EMA update of the smoothed sensitivity ``Ī`` and uncertainty ``Ū``.

  ``I = |w · ∂L/∂w|`` for every entry of ``a``, ``b`` and ``e``;
  ``Ī ← β1 Ī + (1−β1) I``; ``Ū ← β2 Ū + (1−β2) |I − Ī|`` with the new
  ``Ī``. Returns ``(avg, unc)``, dicts of float32 arrays keyed like theta.
  """
  new_avg, new_unc = {}, {}
  for k in FACTORS:
    sens = jnp.abs(theta[k].astype(jnp.float32) * grads[k].astype(jnp.float32))
    new_avg[k] = beta1 * avg[k] + (1 - beta1) * sens
    new_unc[k] = beta2 * unc[k] + (1 - beta2) * jnp.abs(sens - new_avg[k])
  return new_avg, new_unc


def triplet_scores(avg, unc) -> Array:
  """``S_i = S(e_i) + mean_j S(a_ji) + mean_k S(b_ik)`` with ``S = Ī·Ū``.

  In the Flax layout ``a: (d_in, r)`` is averaged over ``d_in`` (column
  ``i``) and ``b: (r, d_out)`` over ``d_out`` (row ``i``): the spec's mean
  over row ``i`` of ``A`` and column ``i`` of ``B``. Returns ``(r,)``.
  """
  score = {k: avg[k] * unc[k] for k in FACTORS}
  return score['e'] + score['a'].mean(axis=0) + score['b'].mean(axis=1)


def adalora_schedule(
  adapter: Adapter,
  *,
  total_steps: int,
  init_warmup: int,
  final_warmup: int,
  mask_interval: int,
  target_rank: int | None = None,
  target_total_rank: int | None = None,
  beta1: float = 0.85,
  beta2: float = 0.85,
) -> Schedule:
  """AdaLoRA's importance-driven budget over the ``adalora`` leaves of ``adapter``.

  After update ``t`` (``t`` = optimizer updates done, 1 after the first):

  * scores: for ``t <= T − t_f`` the sensitivity EMAs of every entry of
    ``a``, ``b``, ``e`` are updated (``sensitivity_update``, on the updated
    parameters and this update's gradients, regulariser included); in the
    final phase ``t > T − t_f`` they are frozen.
  * budget ``b(t)`` (``budget``): ``b0`` = the sum of the initial ranks,
    ``b_T = target_rank × #adalora leaves`` or ``target_total_rank``.
  * masking: none for ``t <= t_i``; when ``t mod Δ = 0`` for
    ``t_i < t <= T − t_f``; at every step for ``t > T − t_f``. It sets
    ``e_i ← 0`` wherever ``S_i <= τ``, ``τ`` the ``(b0 − b(t))``-th smallest
    triplet score (``triplet_scores``) over all triplets of all governed
    leaves (ties at ``τ`` are all masked, as in the code). Masked entries
    stay trainable and are re-masked at the next mask step; the optimizer
    state is not touched, and the layer's scale keeps the initial rank.

  ``t`` counts updates done: a loop that calls the reference allocator with
  a 0-based step counter (ours minus one) fires each event one update later
  for the same ``t_i``, ``t_f``, ``Δ``. Pair with the ``adalora`` layer's orthogonality
  penalty (its ``reg_orth_coef``). State: ``{'avg': Ī, 'unc': Ū}``, nested
  like ``theta`` (``a``, ``b``, ``e`` of each governed leaf, float32).

  Args:
    adapter: a tree-level adapter (``by_rules``) with ``adalora`` leaves.
    total_steps: ``T``, the number of optimizer updates of the run.
    init_warmup: ``t_i >= 0``, updates before the first mask.
    final_warmup: ``t_f >= 0``, final updates at the target budget with
      frozen scores; ``T − t_f − t_i`` must be > 0.
    mask_interval: ``Δ > 0``, updates between masks in the middle phase.
    target_rank: the final average rank per leaf (exactly one of this and
      ``target_total_rank``).
    target_total_rank: the final total rank over all governed leaves.
    beta1: β1 in ``[0, 1)`` of the sensitivity EMA.
    beta2: β2 in ``[0, 1)`` of the uncertainty EMA.

  Returns:
    The ``Schedule``; pass it to ``TrainState.create`` and
    ``make_train_step``.
  """
  name = 'adalora_schedule'
  total, t_i, t_f = phases(name, total_steps, init_warmup, final_warmup)
  interval = checks.positive_int(name, 'mask_interval', mask_interval)
  if (target_rank is None) == (target_total_rank is None):
    raise PeftError(f'{name}: give exactly one of target_rank and target_total_rank')
  if target_rank is not None:
    target_rank = checks.positive_int(name, 'target_rank', target_rank)
  else:
    target_total_rank = checks.positive_int(
      name, 'target_total_rank', target_total_rank
    )
  for beta_name, beta in (('beta1', beta1), ('beta2', beta2)):
    if not 0 <= checks.real(name, beta_name, beta) < 1:
      raise PeftError(f'{name}: {beta_name}={beta} must be in [0, 1)')

  def leaves(frozen, theta):
    """The governed leaves and the budget ends ``(b0, b_T)``."""
    chosen = governed(name, adapter, frozen, theta, 'adalora')
    initial = sum(leaf_theta['e'].shape[0] for _, leaf_theta in chosen.values())
    target = target_total_rank or target_rank * len(chosen)
    if target > initial:
      raise PeftError(
        f'{name}: the target total rank {target} exceeds the initial total '
        f'rank {initial} of the {len(chosen)} adalora leaves'
      )
    return chosen, initial, target

  def init(frozen, theta):
    chosen, _, _ = leaves(frozen, theta)

    def zeros():  # Fresh arrays per tree: donation must not see one buffer twice.
      return paths.nest(
        {
          leaf: {k: jnp.zeros(leaf_theta[k].shape, jnp.float32) for k in FACTORS}
          for leaf, (_, leaf_theta) in chosen.items()
        }
      )

    return {'avg': zeros(), 'unc': zeros()}

  def update(state, frozen, theta, grads, opt_state, step):
    chosen, initial, target = leaves(frozen, theta)
    refresh = step <= total - t_f
    avg, unc, scores = {}, {}, {}
    for leaf, (_, leaf_theta) in chosen.items():
      old = paths.subtree(state['avg'], leaf), paths.subtree(state['unc'], leaf)
      new = sensitivity_update(
        *old, leaf_theta, paths.subtree(grads, leaf), beta1, beta2
      )
      avg[leaf], unc[leaf] = (
        {k: jnp.where(refresh, n[k], o[k]) for k in FACTORS}
        for n, o in zip(new, old, strict=True)
      )
      scores[leaf] = triplet_scores(avg[leaf], unc[leaf])
    n_masked = initial - budget(
      step,
      initial=initial,
      target=target,
      total_steps=total,
      init_warmup=t_i,
      final_warmup=t_f,
    )
    mask_step = (step > t_i) & ((step > total - t_f) | (step % interval == 0))
    ranked = jnp.sort(jnp.concatenate(list(scores.values())))
    threshold = ranked[jnp.maximum(n_masked - 1, 0)]
    masking = mask_step & (n_masked > 0)
    masked_e = {}
    for leaf, (_, leaf_theta) in chosen.items():
      e = leaf_theta['e']
      cut = masking & (scores[leaf] <= threshold)
      masked_e[f'{leaf}/e'] = jnp.where(cut, jnp.zeros_like(e), e)
    theta = replace_subtrees(theta, masked_e)
    state = {
      'avg': replace_subtrees(state['avg'], avg),
      'unc': replace_subtrees(state['unc'], unc),
    }
    return theta, opt_state, state

  return Schedule(init=init, update=update)
