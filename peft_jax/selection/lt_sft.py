"""LT-SFT scores (Ansell et al., 2022): ``|θ1 − θ0|`` after a short dense run.

Fine-tune every weight to θ1, keep the top ``K`` entries of ``|θ1 − θ0|``
(``top_p``), then restart from θ0 and train only those.
"""

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src import paths, selection
from peft_jax._src.base import Params, PeftError


def lt_sft(
  frozen: Params, tuned: Params, *, where: selection.Where = None
) -> selection.ScoreTree:
  """``|θ1 − θ0|`` per scored entry, in float32.

  Args:
    frozen: the pretrained weights θ0.
    tuned: θ1, a tree like ``frozen`` (at least at the scored leaves), e.g.
      the merged weights after a few epochs of full fine-tuning.
    where: the scored leaves (see ``peft_jax.selection.sam``).

  Returns:
    A score tree of ``float32`` absolute changes.
  """
  chosen = selection.choose('lt_sft', frozen, where)
  flat = paths.flatten(tuned)
  pairs = {}
  for name, w0 in chosen.items():
    w1 = flat.get(name)
    if w1 is None or np.shape(w1) != np.shape(w0):
      have = 'nothing' if w1 is None else f'shape {np.shape(w1)}'
      raise PeftError(
        f'lt_sft: tuned has {have} at {name!r}; expected shape {np.shape(w0)} as '
        'in frozen'
      )
    pairs[name] = (w0, w1)
  return selection.nest(jax.jit(_changes)(pairs))


def _changes(pairs: dict) -> selection.Flat:
  f32 = lambda w: jnp.asarray(w, jnp.float32)
  return {name: jnp.abs(f32(w1) - f32(w0)) for name, (w0, w1) in pairs.items()}
