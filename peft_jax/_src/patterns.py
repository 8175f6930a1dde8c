"""Matrix pattern penalties on low-rank factors (MPC, AdaLoRA's orthogonality)."""

import jax
import jax.numpy as jnp

from peft_jax._src import checks, linalg
from peft_jax._src.base import Array

KINDS = ('o', 'd')
FORMS = ('squared', 'mean')


def check_pattern(method: str, kind: str, form: str) -> None:
  """Raises unless ``kind`` is ``'o'``/``'d'`` and ``form`` ``'squared'``/``'mean'``."""
  checks.choice(method, 'kind', kind, KINDS)
  checks.choice(method, 'form', form, FORMS)


def pattern_penalty(
  down: Array, up: Array, kind: str = 'o', form: str = 'squared'
) -> Array:
  """The MPC penalty of each factor pair, float32, one term per matrix.

  With ``G_d = downᵀ down`` and ``G_u = up upᵀ`` (both ``r × r``; in the
  spec's layout ``A Aᵀ`` and ``Bᵀ B``), the residuals are ``G_d − I_r`` and
  ``G_u − I_r`` (``kind='o'``) or ``G_u − diag(G_u)`` (``kind='d'``, the
  off-diagonal part). ``form='squared'`` sums their squared Frobenius norms
  (the paper's Eqs. 25/26); ``form='mean'`` averages their Frobenius norms
  (the reference code's unsquared form).

  Args:
    down: ``(..., d_in, r)``, e.g. LoRA's ``a`` (leading axes: stacked layers).
    up: ``(..., r, d_out)``, e.g. LoRA's ``b``.
    kind: ``'o'`` (MPC_o) or ``'d'`` (MPC_d).
    form: ``'squared'`` or ``'mean'``.

  Returns:
    ``(...)``: one penalty per factor pair.
  """
  down, up = down.astype(jnp.float32), up.astype(jnp.float32)
  gram = lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)
  eye = jnp.eye(down.shape[-1], dtype=jnp.float32)
  gram_up = gram(up, jnp.swapaxes(up, -1, -2))
  up_target = eye if kind == 'o' else gram_up * eye
  residuals = (gram(jnp.swapaxes(down, -1, -2), down) - eye, gram_up - up_target)
  if form == 'squared':
    return sum(jnp.sum(jnp.square(r), axis=(-2, -1)) for r in residuals)
  return sum(linalg.frobenius(r) for r in residuals) / len(residuals)
