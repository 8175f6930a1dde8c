"""FishMask scores (Sung et al., 2021): the diagonal empirical Fisher.

``F_i = (1/N) Σ_n (∂ℓ_n/∂θ_i)²`` over all ``N`` examples, ``ℓ_n`` the loss
of example ``n`` alone (``-log p(y_n|x_n)`` for a likelihood loss). Per
example, not per batch: the square of a batch-mean gradient is not the
Fisher.
"""

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src import selection
from peft_jax._src.base import Array, Params, PeftError


def _num_examples(what: str, batch: Any) -> int:
  """The size of the leading (example) axis shared by every batch leaf."""
  sizes = {int(np.shape(x)[0]) if np.ndim(x) else None for x in jax.tree.leaves(batch)}
  if len(sizes) != 1 or None in sizes:
    raise PeftError(
      f'{what}: batch leaves have leading sizes {sorted(sizes, key=str)}; '
      'expected one shared example axis'
    )
  return sizes.pop()


def fisher(
  loss_fn: Callable,
  frozen: Params,
  batches: Iterable,
  *,
  where: selection.Where = None,
  num_batches: int | None = None,
  rng: Array | None = None,
  progress: bool = True,
) -> selection.ScoreTree:
  """FishMask's scores: the mean squared per-example gradient at θ0.

  ``F = (1/N) Σ_t Σ_{n ∈ B_t} ∇ℓ_n(θ0)²``: each example runs as a batch of
  size 1 (``jax.vmap`` of ``jax.grad`` over the leading axis of every batch
  leaf), with dropout key ``fold_in(fold_in(rng, t), n)`` for example ``n``
  of batch ``t``. One jitted function per batch shape; it holds the
  per-example gradients of a whole batch at once (``batch size × scored
  size`` floats), so keep batches small for big models.

  Args:
    loss_fn: ``(weights, batch, rng) -> (loss, metrics)``, as for
      ``make_train_step``; it must accept batches of one example.
    frozen: the pretrained weights θ0.
    batches: an iterable of batches, every leaf with a leading example axis.
    where: the scored leaves (see ``peft_jax.selection.sam``).
    num_batches: how many batches to use; None for all.
    rng: dropout key (None: ``jax.random.key(0)``).
    progress: show a tqdm progress bar.

  Returns:
    A score tree of ``float32`` Fisher diagonals.
  """
  what = 'fisher'
  names = list(selection.choose(what, frozen, where))
  frozen = jax.device_put(frozen)  # Host arrays: copy once, not every batch.
  rng = jax.random.key(0) if rng is None else rng
  grad = jax.grad(selection.objective(what, loss_fn))

  def batch_step(sums, frozen, batch, rng, t):
    key = jax.random.fold_in(rng, t)
    chosen = selection.pick(frozen, names)

    def one(example, n):
      single = jax.tree.map(lambda x: x[None], example)
      return selection.to_f32(grad(chosen, frozen, single, jax.random.fold_in(key, n)))

    size = jax.tree.leaves(batch)[0].shape[0]
    per_example = jax.vmap(one)(batch, jnp.arange(size))
    return {
      name: sums[name] + jnp.sum(jnp.square(g), 0) for name, g in per_example.items()
    }

  jitted = jax.jit(batch_step, donate_argnums=0)
  examples = 0  # N

  def step(sums, batch, t):
    nonlocal examples
    examples += _num_examples(what, batch)
    return jitted(sums, frozen, batch, rng, t)

  start = jax.jit(selection.zeros_f32)(selection.pick(frozen, names))
  sums, _ = selection.run_batches(
    what, step, start, batches, num_batches=num_batches, progress=progress
  )
  means, largest = jax.jit(_finish)(sums, examples)
  selection.check_nonzero(what, largest, names)
  return selection.nest(means)


def _finish(sums: selection.Flat, num: int):
  """``(Σ g² / N, max Σ g²)``."""
  return {name: s / num for name, s in sums.items()}, selection.peak(sums)
