"""AdaLoRA's rank budget (Zhang et al., 2023): importance scores mask ``e``."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from peft_jax._src import checks, paths
from peft_jax._src.base import Array, Entry, PeftError, Schedule, TreeAdapter
from peft_jax._src.schedules import governed, phases
from peft_jax.methods.adalora import AdaLoraParams


class AdaLoraScheduleState(NamedTuple):
  """The smoothed sensitivity ``avg`` (Ī) and uncertainty ``unc`` (Ū).

  Sparse trees keyed like the adapter parameters: an ``AdaLoraParams`` of
  float32 arrays at every governed leaf.
  """

  avg: dict
  unc: dict


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


def sensitivity_update(
  avg: AdaLoraParams,
  unc: AdaLoraParams,
  params: AdaLoraParams,
  grads: AdaLoraParams,
  beta1: float,
  beta2: float,
) -> tuple[AdaLoraParams, AdaLoraParams]:
  """One EMA update of the smoothed sensitivity ``Ī`` and uncertainty ``Ū``.

  ``I = |w · ∂L/∂w|`` for every entry of ``a``, ``b`` and ``e``;
  ``Ī ← β1 Ī + (1−β1) I``; ``Ū ← β2 Ū + (1−β2) |I − Ī|`` with the new
  ``Ī``. Returns ``(avg, unc)``, float32 ``AdaLoraParams``.
  """
  f32 = lambda x: x.astype(jnp.float32)
  sens = jax.tree.map(lambda p, g: jnp.abs(f32(p) * f32(g)), params, grads)
  new_avg = jax.tree.map(lambda a, s: beta1 * a + (1 - beta1) * s, avg, sens)
  new_unc = jax.tree.map(
    lambda u, s, a: beta2 * u + (1 - beta2) * jnp.abs(s - a), unc, sens, new_avg
  )
  return new_avg, new_unc


def triplet_scores(avg: AdaLoraParams, unc: AdaLoraParams) -> Array:
  """``S_i = S(e_i) + mean_j S(a_ji) + mean_k S(b_ik)`` with ``S = Ī·Ū``.

  In the Flax layout ``a: (..., d_in, r)`` is averaged over ``d_in`` (column
  ``i``) and ``b: (..., r, d_out)`` over ``d_out`` (row ``i``): the spec's
  mean over row ``i`` of ``A`` and column ``i`` of ``B``. Leading axes are
  stacked layers. Returns ``(..., r)``.
  """
  score = jax.tree.map(jnp.multiply, avg, unc)
  return score.e + score.a.mean(axis=-2) + score.b.mean(axis=-1)


def _one_target(target_rank, target_total_rank) -> tuple[int | None, int | None]:
  """The two target arguments, exactly one of them a positive int."""
  name = 'adalora_schedule'
  if (target_rank is None) == (target_total_rank is None):
    raise PeftError(f'{name}: give exactly one of target_rank and target_total_rank')
  if target_rank is not None:
    return checks.positive_int(name, 'target_rank', target_rank), None
  return None, checks.positive_int(name, 'target_total_rank', target_total_rank)


def budget_ends(
  chosen: dict[str, Entry], target_rank: int | None, target_total_rank: int | None
) -> tuple[int, int]:
  """``(b0, b_T)`` of the governed leaves ``chosen``.

  ``b0 = Σ size(e)`` over the leaves (each ``e: (..., r)`` holds one rank-``r``
  matrix per leading index); ``b_T = target_total_rank``, or
  ``target_rank × #matrices``.

  Raises:
    PeftError: if ``b_T > b0``.
  """
  initial = sum(entry.params.e.size for entry in chosen.values())
  matrices = sum(
    entry.params.e.size // entry.params.e.shape[-1] for entry in chosen.values()
  )
  target = target_total_rank or target_rank * matrices
  if target > initial:
    raise PeftError(
      f'adalora_schedule: the target total rank {target} exceeds the initial '
      f'total rank {initial} of the {matrices} adalora matrices'
    )
  return initial, target


def zero_scores(chosen: dict[str, Entry]) -> dict:
  """A nested tree with float32 zeros shaped like each governed leaf's params.

  Fresh arrays per call: donation must not see one buffer twice.
  """
  return paths.nest(
    {
      leaf: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), entry.params)
      for leaf, entry in chosen.items()
    }
  )


def smoothed_scores(
  state: AdaLoraScheduleState,
  chosen: dict[str, Entry],
  grads: dict,
  refresh: Array,
  beta1: float,
  beta2: float,
) -> tuple[dict, dict, dict]:
  """``(avg, unc, scores)`` per governed leaf, each ``{leaf name: ...}``.

  ``avg``/``unc`` are ``sensitivity_update`` of the state's EMAs with the
  leaf's parameters and ``grads`` where ``refresh`` (a bool scalar), else the
  state's EMAs unchanged; ``scores: (..., r)`` are their ``triplet_scores``.
  """
  avg, unc, scores = {}, {}, {}
  for leaf, entry in chosen.items():
    old = paths.subtree(state.avg, leaf), paths.subtree(state.unc, leaf)
    new = sensitivity_update(
      *old, entry.params, paths.subtree(grads, leaf), beta1, beta2
    )
    avg[leaf], unc[leaf] = (
      jax.tree.map(lambda n, o: jnp.where(refresh, n, o), n_tree, o_tree)
      for n_tree, o_tree in zip(new, old, strict=True)
    )
    scores[leaf] = triplet_scores(avg[leaf], unc[leaf])
  return avg, unc, scores


def mask_lowest(
  chosen: dict[str, Entry], scores: dict, n_masked: Array, masking: Array
) -> dict[str, AdaLoraParams]:
  """Each governed leaf's params with ``e_i ← 0`` wherever ``S_i <= τ``.

  ``τ`` is the ``n_masked``-th smallest of all leaves' ``scores`` (each
  ``(..., r)``, like the leaf's ``e``); nothing is masked unless ``masking``
  (a bool scalar) and ``n_masked > 0``. Ties at ``τ`` are all masked.
  """
  ranked = jnp.sort(jnp.concatenate([jnp.ravel(s) for s in scores.values()]))
  threshold = ranked[jnp.maximum(n_masked - 1, 0)]
  masking = masking & (n_masked > 0)
  masked = {}
  for leaf, entry in chosen.items():
    e = entry.params.e
    cut = masking & (scores[leaf] <= threshold)
    masked[leaf] = entry.params._replace(e=jnp.where(cut, jnp.zeros_like(e), e))
  return masked


def adalora_schedule(
  adapter: TreeAdapter,
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

  Governed leaves are those whose parameters are ``AdaLoraParams``, however
  the method is wrapped (``mpc``, ``matrix_view``, ``stacked``: each layer's
  ``e`` counts as one matrix's rank).

  After update ``t`` (``t`` = optimizer updates done, 1 after the first):

  * scores: for ``t <= T − t_f`` the sensitivity EMAs of every entry of
    ``a``, ``b``, ``e`` are updated (``sensitivity_update``, on the updated
    parameters and this update's gradients, regulariser included); in the
    final phase ``t > T − t_f`` they are frozen.
  * budget ``b(t)`` (``budget``): ``b0`` = the sum of the initial ranks,
    ``b_T = target_rank × #adalora matrices`` or ``target_total_rank``.
  * masking: none for ``t <= t_i``; when ``t mod Δ = 0`` for
    ``t_i < t <= T − t_f``; at every step for ``t > T − t_f``. It sets
    ``e_i ← 0`` wherever ``S_i <= τ``, ``τ`` the ``(b0 − b(t))``-th smallest
    triplet score (``triplet_scores``) over all triplets of all governed
    leaves (ties at ``τ`` are all masked, as in the code). Masked entries
    stay trainable and are re-masked at the next mask step; the optimizer
    state is not touched, and the layer's scale keeps the initial rank.

  ``t`` counts updates done: a loop that calls the reference allocator with
  a 0-based step counter (ours minus one) fires each event one update later
  for the same ``t_i``, ``t_f``, ``Δ``. Pair with the ``adalora`` layer's
  orthogonality penalty (its ``reg_orth_coef``). State:
  ``AdaLoraScheduleState(avg=Ī, unc=Ū)``.

  Args:
    adapter: a tree-level adapter (``by_rules``) with ``adalora`` leaves.
    total_steps: ``T``, the number of optimizer updates of the run.
    init_warmup: ``t_i >= 0``, updates before the first mask.
    final_warmup: ``t_f >= 0``, final updates at the target budget with
      frozen scores; ``T − t_f − t_i`` must be > 0.
    mask_interval: ``Δ > 0``, updates between masks in the middle phase.
    target_rank: the final average rank per matrix (exactly one of this and
      ``target_total_rank``).
    target_total_rank: the final total rank over all governed matrices.
    beta1: β1 in ``[0, 1)`` of the sensitivity EMA.
    beta2: β2 in ``[0, 1)`` of the uncertainty EMA.

  Returns:
    The ``Schedule``; pass it to ``TrainState.create`` and
    ``make_train_step``.
  """
  name = 'adalora_schedule'
  total, t_i, t_f = phases(name, total_steps, init_warmup, final_warmup)
  interval = checks.positive_int(name, 'mask_interval', mask_interval)
  target_rank, target_total_rank = _one_target(target_rank, target_total_rank)
  for beta_name, beta in (('beta1', beta1), ('beta2', beta2)):
    if not 0 <= checks.real(name, beta_name, beta) < 1:
      raise PeftError(f'{name}: {beta_name}={beta} must be in [0, 1)')

  def leaves(frozen, params, buffers):
    """The governed leaves and the budget ends ``(b0, b_T)``."""
    chosen = governed(name, adapter, frozen, params, buffers, AdaLoraParams)
    return chosen, *budget_ends(chosen, target_rank, target_total_rank)

  def init(frozen, params, buffers):
    chosen, _, _ = leaves(frozen, params, buffers)
    return AdaLoraScheduleState(avg=zero_scores(chosen), unc=zero_scores(chosen))

  def update(state, frozen, params, buffers, grads, opt_state, step):
    chosen, initial, target = leaves(frozen, params, buffers)
    refresh = step <= total - t_f
    avg, unc, scores = smoothed_scores(state, chosen, grads, refresh, beta1, beta2)
    n_masked = initial - budget(
      step,
      initial=initial,
      target=target,
      total_steps=total,
      init_warmup=t_i,
      final_warmup=t_f,
    )
    mask_step = (step > t_i) & ((step > total - t_f) | (step % interval == 0))
    masked = mask_lowest(chosen, scores, n_masked, mask_step)
    state = AdaLoraScheduleState(
      avg=paths.replace(state.avg, avg), unc=paths.replace(state.unc, unc)
    )
    return paths.replace(params, masked), buffers, opt_state, state

  return Schedule(init=init, update=update)
