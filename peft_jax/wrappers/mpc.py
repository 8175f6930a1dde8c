"""Matrix Pattern Constraints, MPC (Si et al., 2024, §2): factor regularisers."""

from peft_jax._src import checks, registry
from peft_jax._src.base import Adapter, PeftError
from peft_jax._src.patterns import check_pattern, pattern_penalty
from peft_jax._src.registry import register_wrapper
from peft_jax.wrappers.stacked import leaf_method


@register_wrapper('mpc')
def mpc(
  method: str | Adapter,
  kind: str = 'o',
  gamma: float = 0.1,
  form: str = 'squared',
) -> Adapter:
  """A method plus a Matrix Pattern Constraint on its low-rank factors.

  Returns ``method``'s adapter unchanged (same ``init``, ``apply``,
  ``linear``, count: MPC adds no parameters) with the regulariser
  ``γ · R(down, up)`` added to any it already has, where
  ``(down, up) = factors(params, buffers)`` (Flax layout, ``down = Aᵀ: (d_in, r)``,
  ``up = Bᵀ: (r, d_out)``) and ``R`` is ``pattern_penalty``:

  * ``kind='o'`` (MPC_o, Eq. 25): ``‖downᵀdown − I_r‖² + ‖up upᵀ − I_r‖²``,
    in the spec's layout ``‖AAᵀ − I‖² + ‖BᵀB − I‖²``: both factors
    semi-orthogonal.
  * ``kind='d'`` (MPC_d, Eq. 26 as the spec reads it):
    ``‖downᵀdown − I_r‖² + ‖up upᵀ − diag(up upᵀ)‖²``: ``down`` orthonormal,
    the rows of ``up`` (columns of ``B``) mutually orthogonal, norms free.
  * MPC_n is not a regulariser: it is ``parallel_adapter``.

  One penalty term per factor pair (per layer under ``stacked``); the tree
  combines the terms of all adapted leaves (``by_rules(..., regularizer=)``).
  ``form='squared'`` with ``regularizer='sum'`` is the paper's loss,
  ``γ Σ_leaves R`` with squared Frobenius norms. ``form='mean'`` with the
  default ``regularizer='mean'`` is the reference code's (AdaLoRA's
  ``compute_orth_regu``): ``γ/(2L) Σ ‖·‖_F`` over the ``2L`` unsquared
  residual norms of ``L`` adapted matrices, so the code's
  ``reg_orth_coef=0.1`` is ``gamma=0.1``. The code has no MPC_d (its "frd"
  variant is commented out); ``kind='d', form='mean'`` applies the same
  unsquared mean to the MPC_d residuals.

  Args:
    method: a spec string (``'lora(rank=8)'``) or an ``Adapter`` with a
      ``factors`` capability.
    kind: ``'o'`` or ``'d'``.
    gamma: γ ≥ 0, the regulariser's weight (0.1 in the paper's runs).
    form: ``'squared'`` (paper) or ``'mean'`` (reference code).

  Returns:
    ``method``'s ``Adapter`` with the regulariser added.
  """
  name = 'mpc'
  base = leaf_method(name, method)
  if base.factors is None:
    raise PeftError(
      f'mpc: method {registry.brief(base.name) or "(hand-built)"} has no low-rank '
      'factors (Adapter.factors); use a method such as lora, trilora or adalora'
    )
  check_pattern(name, kind, form)
  gamma = checks.real(name, 'gamma', gamma)
  if gamma < 0:
    raise PeftError(f'mpc: gamma={gamma} must be >= 0')

  def penalty(w, params, buffers):
    del w
    return gamma * pattern_penalty(*base.factors(params, buffers), kind, form)

  if base.regularizer is None:
    regularizer = penalty
  else:
    regularizer = lambda *args: base.regularizer(*args) + penalty(*args)
  return base._replace(regularizer=regularizer)
