"""Choosing which frozen entries to train, from data (Fu et al., AAAI 2023).

A scorer returns a *score tree*: a sparse nested dict keyed like the frozen
tree with a ``float32`` score per entry of each scored leaf (``where`` picks
the leaves: a regex on ``/``-joined names, a list of them, or a predicate;
default every floating leaf). ``top_p(scores, p)`` keeps the top ``⌊p·m⌋``
entries as a *mask tree* of bools, for ``peft_jax.methods.sparse``'s
``sparse_rules``. No scorer changes a weight.

* ``sam``: ``(Σ_t ∇L_{B_t}(θ0))²``, optionally over a curvature estimate.
* ``fisher``: FishMask's mean squared per-example gradient.
* ``magnitude``: ``|θ0|`` (MagPruning). ``random``: uniform (Random).
* ``lt_sft``: ``|θ1 − θ0|`` after a short dense fine-tune.

Usage (``loss_fn(weights, batch, rng) -> (loss, metrics)`` as for
``make_train_step``)::

  scores = pj.selection.sam(loss_fn, frozen, batches, num_batches=600,
                            where='encoder/.*', clip_norm=1.0)
  mask = pj.selection.top_p(scores, 0.005)  # ⌊0.005·m⌋ entries, globally
"""

from peft_jax._src.selection import MaskTree, ScoreTree, Where, count, top_p
from peft_jax.selection.fisher import fisher
from peft_jax.selection.lt_sft import lt_sft
from peft_jax.selection.magnitude import magnitude
from peft_jax.selection.random_choice import random
from peft_jax.selection.sam import sam

__all__ = [
  'MaskTree',
  'ScoreTree',
  'Where',
  'count',
  'fisher',
  'lt_sft',
  'magnitude',
  'random',
  'sam',
  'top_p',
]
