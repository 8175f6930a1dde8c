"""SAM scores (Fu et al., AAAI 2023, Theorem 3): ``(Σ_t ∇L_{B_t}(θ0))²``.

The second-order expansion of ``L(θ0 + MΔθ)`` with ``H ≈ diag(h)`` is
minimised by the mask of the top ``⌊p·m⌋`` scores ``g_i² / h_i``; with
``h = |λ_max|`` everywhere (the paper's surrogate and the released code) the
ranking is that of ``g²``. θ is never updated: every batch's gradient is
taken at θ0 and summed, signs kept.
"""

from collections.abc import Callable, Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from peft_jax._src import checks, selection
from peft_jax._src.base import Array, Params, PeftError

CURVATURES = (None, 'lambda_max', 'hutchinson')


class SamSums(NamedTuple):
  """The carried accumulators, float32, one array per scored leaf.

  Attributes:
    grad: ``Σ_t clip(∇L_{B_t}(θ0))``.
    curvature: ``Σ_t ĥ_t``, the Hutchinson diagonals (``None`` unless
      ``curvature='hutchinson'``).
  """

  grad: selection.Flat
  curvature: selection.Flat | None


def sam(
  loss_fn: Callable,
  frozen: Params,
  batches: Iterable,
  *,
  where: selection.Where = None,
  num_batches: int | None = None,
  rng: Array | None = None,
  clip_norm: float | None = None,
  curvature: str | None = None,
  hutchinson_samples: int = 10,
  power_iterations: int = 20,
  eps: float = 1e-8,
  progress: bool = True,
) -> selection.ScoreTree:
  """SAM's selection scores, from gradients at θ0 summed over batches.

  ``g = Σ_t clip(∇L_{B_t}(θ0))`` over the batches (θ never updated;
  gradients only with respect to the scored leaves), then per entry:

  * ``curvature=None``: ``g²`` (the released code ranks by ``|g|``, the
    same order);
  * ``'lambda_max'``: ``g² / |λ_max|``, ``λ_max`` the largest-magnitude
    eigenvalue of the Hessian of ``L_{B_0}`` on the scored leaves, by power
    iteration (the paper's upper bound ``D = |λ_max|·I``). A single constant:
    the same ranking, hence the same mask, as ``None``;
  * ``'hutchinson'``: ``g² / (|ĥ| + eps)``, ``ĥ = (1/T) Σ_t mean_j v_j ⊙
    (H_t v_j)`` over ``hutchinson_samples`` Rademacher vectors per batch
    (Theorem 3 with a diagonal Hessian estimate).

  Each batch runs one jitted function (traced once; batches of a new shape
  retrace), carrying ``float32`` sums of the scored leaves' size (two for
  Hutchinson). Cost per batch: one forward and backward pass, plus
  ``hutchinson_samples`` Hessian-vector products (``jax.jvp`` of
  ``jax.grad``); ``'lambda_max'`` adds ``power_iterations + 1`` products on
  the first batch.

  Args:
    loss_fn: ``(weights, batch, rng) -> (loss, metrics)``, as for
      ``make_train_step``; ``weights`` is the full tree.
    frozen: the pretrained weights θ0.
    batches: an iterable of batches (only the first ``num_batches`` are used).
    where: the scored leaves: a regex (``re.fullmatch`` on the leaf name), a
      list of regexes, or a predicate ``(name, leaf) -> bool``; None for
      every floating leaf.
    num_batches: how many batches to use (``T``); None for all.
    rng: dropout key; batch ``t`` gets ``fold_in(rng, t)`` (None:
      ``jax.random.key(0)``).
    clip_norm: clip each batch gradient to this global norm, taken over the
      scored leaves (the released code clips at 1.0, over all parameters).
    curvature: ``None``, ``'lambda_max'`` or ``'hutchinson'``.
    hutchinson_samples: Rademacher probes per batch.
    power_iterations: Hessian-vector products of the power iteration.
    eps: added to ``|ĥ|`` (Hutchinson only).
    progress: show a tqdm progress bar.

  Returns:
    A score tree: ``float32`` scores of each scored leaf's shape, in a
    sparse nested dict keyed like ``frozen``. ``top_p`` makes the mask.
  """
  what = 'sam'
  if curvature not in CURVATURES:
    raise PeftError(f'{what}: curvature={curvature!r} is not one of {CURVATURES}')
  samples = checks.positive_int(what, 'hutchinson_samples', hutchinson_samples)
  iterations = checks.positive_int(what, 'power_iterations', power_iterations)
  if clip_norm is not None:
    clip_norm = checks.positive(what, 'clip_norm', clip_norm)
  eps = checks.positive(what, 'eps', eps)
  names = list(selection.choose(what, frozen, where))
  frozen = jax.device_put(frozen)  # Host arrays: copy once, not every batch.
  rng = jax.random.key(0) if rng is None else rng
  grad = jax.grad(selection.objective(what, loss_fn))

  def batch_step(sums: SamSums, frozen, batch, rng, t) -> SamSums:
    key = jax.random.fold_in(rng, t)
    chosen = selection.pick(frozen, names)
    g = selection.to_f32(grad(chosen, frozen, batch, key))
    if clip_norm is not None:
      g, _ = optax.clip_by_global_norm(clip_norm).update(g, optax.EmptyState())
    total = jax.tree.map(jnp.add, sums.grad, g)
    if sums.curvature is None:
      return SamSums(total, None)
    diag = selection.hutchinson_diagonal(
      lambda c: grad(c, frozen, batch, key),
      chosen,
      jax.random.fold_in(key, 0x5EED),
      samples,
    )
    return SamSums(total, jax.tree.map(jnp.add, sums.curvature, diag))

  def top_eigenvalue(frozen, batch, rng) -> Array:
    key = jax.random.fold_in(rng, 0)
    return selection.lambda_max(
      lambda c: grad(c, frozen, batch, key),
      selection.pick(frozen, names),
      jax.random.fold_in(key, 0x5EED),
      iterations,
    )

  jitted = jax.jit(batch_step, donate_argnums=0)
  lam = None  # |λ_max|, from the first batch.

  def step(sums, batch, t):
    nonlocal lam
    if curvature == 'lambda_max' and lam is None:
      lam = float(jax.jit(top_eigenvalue)(frozen, batch, rng))
    return jitted(sums, frozen, batch, rng, t)

  hutchinson = curvature == 'hutchinson'
  zeros = jax.jit(selection.zeros_f32)
  chosen = selection.pick(frozen, names)
  start = SamSums(zeros(chosen), zeros(chosen) if hutchinson else None)
  sums, num = selection.run_batches(
    what, step, start, batches, num_batches=num_batches, progress=progress
  )
  if lam == 0.0:
    raise PeftError(
      f'{what}: the Hessian on the scored leaves is zero (λ_max = 0); use '
      'curvature=None'
    )
  scale = 1.0 if lam is None else lam
  scores, largest = jax.jit(_finish)(sums, num, scale, eps)
  selection.check_nonzero(what, largest, names)
  return selection.nest(scores)


def _finish(sums: SamSums, num: int, lam: float, eps: float):
  """``(scores, max |g|)``: ``g² / |λ|`` (``|λ| = 1`` without curvature), or
  ``g² / (|Σ_t ĥ_t / T| + eps)`` with Hutchinson sums."""
  scores = jax.tree.map(lambda g: jnp.square(g) / lam, sums.grad)
  if sums.curvature is not None:
    scores = {
      name: s / (jnp.abs(sums.curvature[name] / num) + eps)
      for name, s in scores.items()
    }
  return scores, selection.peak(sums.grad)
