"""Matrix Pattern Constraints, MPC (Si et al., 2024, §2): factor regularisers."""

import jax
import jax.numpy as jnp

from peft_jax._src import checks, registry
from peft_jax._src.base import Adapter, Array, PeftError
from peft_jax._src.registry import register

KINDS = ('o', 'd')
FORMS = ('squared', 'mean')


def check_pattern(method: str, kind: str, form: str) -> None:
  """Raises unless ``kind`` is ``'o'``/``'d'`` and ``form`` ``'squared'``/``'mean'``."""
  checks.choice(method, 'kind', kind, KINDS)
  checks.choice(method, 'form', form, FORMS)


def frobenius(x: Array) -> Array:
  """``‖x‖_F`` with gradient 0 (not NaN) at ``x = 0``, like ``torch.norm``."""
  squared = jnp.sum(jnp.square(x))
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def pattern_penalty(down: Array, up: Array, kind: str = 'o', form: str = 'squared'):
  """The MPC penalty of one leaf's factors, a float32 scalar.

  With ``G_d = downᵀ down`` and ``G_u = up upᵀ`` (both ``r × r``; in the
  spec's layout ``A Aᵀ`` and ``Bᵀ B``), the residuals are ``G_d − I_r`` and
  ``G_u − I_r`` (``kind='o'``) or ``G_u − diag(G_u)`` (``kind='d'``, the
  off-diagonal part). ``form='squared'`` sums their squared Frobenius norms
  (the paper's Eqs. 25/26); ``form='mean'`` averages their Frobenius norms
  (the reference code's unsquared form, per leaf).

  Args:
    down: ``(d_in, r)``, e.g. LoRA's ``a``.
    up: ``(r, d_out)``, e.g. LoRA's ``b``.
    kind: ``'o'`` (MPC_o) or ``'d'`` (MPC_d).
    form: ``'squared'`` or ``'mean'``.
  """
  down, up = down.astype(jnp.float32), up.astype(jnp.float32)
  gram = lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)
  eye = jnp.eye(down.shape[1], dtype=jnp.float32)
  gram_up = gram(up, up.T)
  up_target = eye if kind == 'o' else jnp.diag(jnp.diag(gram_up))
  residuals = (gram(down.T, down) - eye, gram_up - up_target)
  if form == 'squared':
    return sum(jnp.sum(jnp.square(r)) for r in residuals)
  return sum(frobenius(r) for r in residuals) / len(residuals)


@register('mpc')
def mpc(
  method: str | Adapter,
  kind: str = 'o',
  gamma: float = 0.1,
  form: str = 'squared',
) -> Adapter:
  """A method plus a Matrix Pattern Constraint on its low-rank factors.

  Returns ``method``'s adapter unchanged (same ``init``, ``apply``,
  ``factored``, count: MPC adds no parameters) with the regulariser
  ``γ · R(down, up)`` added to any it already has, where
  ``(down, up) = factors(θ)`` (Flax layout, ``down = Aᵀ: (d_in, r)``,
  ``up = Bᵀ: (r, d_out)``) and ``R`` is ``pattern_penalty``:

  * ``kind='o'`` (MPC_o, Eq. 25): ``‖downᵀdown − I_r‖² + ‖up upᵀ − I_r‖²``,
    in the spec's layout ``‖AAᵀ − I‖² + ‖BᵀB − I‖²``: both factors
    semi-orthogonal.
  * ``kind='d'`` (MPC_d, Eq. 26 as the spec reads it):
    ``‖downᵀdown − I_r‖² + ‖up upᵀ − diag(up upᵀ)‖²``: ``down`` orthonormal,
    the rows of ``up`` (columns of ``B``) mutually orthogonal, norms free.
  * MPC_n is not a regulariser: it is ``parallel_adapter``.

  ``form='squared'`` is the paper's squared Frobenius norm; the train step
  sums it over the adapted leaves, i.e. ``γ Σ_leaves R``, the paper's loss.
  ``form='mean'`` is the reference code's (AdaLoRA's ``compute_orth_regu``):
  unsquared norms, ``(‖res_down‖_F + ‖res_up‖_F) / 2`` per leaf. The code
  instead divides the sum of the ``N = 2L`` norms of all ``L`` adapted
  leaves by ``N``: ``γ_code/(2L) Σ ‖·‖_F``, while ours totals
  ``γ/2 Σ ‖·‖_F``. So the code's ``γ_code`` equals our ``γ`` times the
  number of adapted leaves, ``γ_code = L·γ``: reproduce the code's
  ``reg_orth_coef=0.1`` on ``L`` leaves with ``gamma=0.1/L``. The code has no
  MPC_d (its "frd" variant is commented out); ``kind='d', form='mean'``
  applies the same unsquared mean to the MPC_d residuals.

  Args:
    method: a spec string (``'lora(rank=8)'``) or an ``Adapter`` with a
      ``factors`` capability. Pass a spec string to get a canonical,
      round-tripping ``name``.
    kind: ``'o'`` or ``'d'``.
    gamma: γ ≥ 0, the regulariser's weight (0.1 in the paper's runs).
    form: ``'squared'`` (paper) or ``'mean'`` (reference code).

  Returns:
    ``method``'s ``Adapter`` with the regulariser added.
  """
  name = 'mpc'
  base = registry.get(method)
  if base.factors is None:
    raise PeftError(
      f'mpc: method {base.name or method!r} has no low-rank factors '
      '(Adapter.factors); use a method such as lora, trilora or adalora'
    )
  check_pattern(name, kind, form)
  gamma = checks.real(name, 'gamma', gamma)
  if gamma < 0:
    raise PeftError(f'mpc: gamma={gamma} must be >= 0')

  def penalty(w, theta):
    del w
    return gamma * pattern_penalty(*base.factors(theta), kind, form)

  if base.regularizer is None:
    regularizer = penalty
  else:
    regularizer = lambda w, theta: base.regularizer(w, theta) + penalty(w, theta)
  return base._replace(regularizer=regularizer)
