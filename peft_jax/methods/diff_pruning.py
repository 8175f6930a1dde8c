"""DiffPruning (Guo et al., ACL 2021): a hard-concrete-gated diff, then a fixed mask."""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from peft_jax._src import checks, noise
from peft_jax._src.additive import additive
from peft_jax._src.base import Adapter, Array, PeftError
from peft_jax._src.checks import budget, probability
from peft_jax._src.noise import Noise
from peft_jax._src.registry import register

# u is drawn from [EPS, 1 − EPS] so that log u and log(1 − u) stay finite (the
# SAM code draws 1e-6 + (1 − 2e-6)·U(0, 1)).
EPS = 1e-6


class DiffPruningParams(NamedTuple):
  """The diff ``w`` and the gate logits ``alpha``, both shaped like the leaf.

  ``diff_pruning_schedule`` governs every leaf whose parameters have this type.
  """

  w: Array
  alpha: Array


class DiffPruningBuffers(NamedTuple):
  """The fixed mask and the gate's randomness.

  Attributes:
    mask: bool, shaped like the leaf: the entries kept at the fix (all
      ``False`` until ``diff_pruning_schedule`` fixes it).
    fixed: bool scalar: the mask is fixed, ``θ = θ0 + mask ⊙ w``.
    k: int32 scalar, ``⌊p · size⌋``: how many entries the fix keeps.
    noise: the gate's ``Noise`` (inactive when stored: the deterministic gate).
  """

  mask: Array
  fixed: Array
  k: Array
  noise: Noise


def uniform(key: Array, shape) -> Array:
  """``u ~ U(ε, 1 − ε)`` (float32), ``ε = 1e-6``: the gate's noise."""
  return jax.random.uniform(key, shape, jnp.float32, EPS, 1 - EPS)


def hard_concrete(
  alpha: Array, u: Array, beta: float, lower: float, upper: float
) -> Array:
  """The sampled gate ``z = clamp(σ((log u − log(1 − u) + α)/β)·(r − l) + l, 0, 1)``.

  Louizos et al. (ICLR 2018), Eq. 10 with ``log α`` written ``α``, ``l =
  lower``, ``r = upper``; elementwise, ``alpha`` and ``u`` of one shape
  (float32 result).
  """
  logit = jnp.log(u) - jnp.log1p(-u) + alpha.astype(jnp.float32)
  return jnp.clip(jax.nn.sigmoid(logit / beta) * (upper - lower) + lower, 0.0, 1.0)


def deterministic_gate(alpha: Array, beta: float, lower: float, upper: float) -> Array:
  """The evaluation gate ``z = clamp(σ(α/β)·(r − l) + l, 0, 1)`` (float32).

  The sampled gate at ``u = 1/2``, i.e. its median; Louizos et al.'s test-time
  estimator (Eq. 13, there with ``β`` omitted).
  """
  logit = alpha.astype(jnp.float32) / beta
  return jnp.clip(jax.nn.sigmoid(logit) * (upper - lower) + lower, 0.0, 1.0)


def expected_l0(alpha: Array, beta: float, lower: float, upper: float) -> Array:
  """``Σ σ(α − β log(−l/r))``: the expected number of non-zero gates (float32).

  Louizos et al., Eq. 12: ``P(z ≠ 0) = σ(α − β log(−l/r))`` per entry.
  """
  shift = beta * math.log(-lower / upper)
  return jnp.sum(jax.nn.sigmoid(alpha.astype(jnp.float32) - shift))


@register('diff_pruning')
def diff_pruning(
  p: float = 0.005,
  l: float = -1.5,  # noqa: E741 (the paper's name)
  r: float = 1.5,
  beta: float = 1.0,
  alpha_init: float = 5.0,
  l0_coef: float = 1.25e-7,
  *,
  param_dtype: str = 'float32',
) -> Adapter:
  """DiffPruning: ``w' = w + z ⊙ d``, then ``w' = w + mask ⊙ d`` once fixed.

  Shapes: any leaf ``w`` (Flax layout ``(d_in, d_out)`` for kernels);
  params ``DiffPruningParams(w: d, alpha: α)``, both shaped like the leaf
  (``w`` here is the diff ``d``, not the frozen weight); buffers
  ``DiffPruningBuffers(mask, fixed, k, noise)``. Guo, Rush & Kim,
  "Parameter-Efficient Transfer Learning with Diff Pruning" (ACL 2021), as
  the SAM paper (Fu et al., AAAI 2023) runs it as a baseline:

  * Before the fix (``fixed = False``): ``θ = θ0 + z ⊙ d`` with the
    hard-concrete gate ``z = clamp(σ((log u − log(1−u) + α)/β)·(r − l) + l,
    0, 1)`` (``hard_concrete``), ``u ~ U(0, 1)`` per entry and per training
    forward, drawn from the buffers' ``Noise`` when it is active (inside
    ``make_train_step`` only). With the ``Noise`` inactive (stored buffers:
    evaluation, ``merge``) the gate is deterministic, ``z = clamp(σ(α/β)·(r −
    l) + l, 0, 1)`` (``deterministic_gate``). The regulariser is the
    expected-L0 penalty ``λ Σ σ(α − β log(−l/r))`` (``expected_l0``) of the
    leaf; ``by_rules(..., regularizer='sum')`` gives Guo et al.'s
    ``λ Σ_leaves``; the SAM code's mean over all entries with λ = 1 is
    ``l0_coef = 1/m`` with ``'sum'`` (``m`` adapted entries in all).
  * ``diff_pruning_schedule`` fixes the mask after ``burn_in_steps``: the
    top ``k = ⌊p · size⌋`` entries (by ``|α|``, the SAM code), and from then
    on ``θ = θ0 + mask ⊙ d`` exactly: no gate, no penalty, so
    ``‖θ − θ0‖₀ ≤ k`` whatever the optimizer does to ``d`` and ``α``.

  Init: ``d = 0``, ``α = alpha_init``: identity at init. Defaults are Guo
  et al.'s released script (github.com/dguo98/DiffPruning, README):
  ``CONCRETE_LOWER=-1.5``, ``CONCRETE_UPPER=1.5``, ``ALPHA_INIT=5``,
  ``SPARSITY_PEN=1.25e-7``, no temperature (``β = 1``); ``p = 0.005`` is the
  SAM paper's sparsity (and Guo et al.'s 0.5% target). The SAM code clamps
  with ``l = −3, r = 3`` instead (``diffprun``, default ``clamp=3``). Guo
  et al.'s code trains ``α`` with its own AdamW at learning rate 0.1 (``d``
  at 1e-5) and draws ``u`` from ``[1e-4, 1 − 1e-4]`` (here ``[1e-6, 1 −
  1e-6]``, the SAM code's); for separate rates label the ``alpha`` fields
  in ``optax.multi_transform``.
  Trainable count ``2 · size(w)``. Mergeable (the evaluation form) and
  invertible. Factored form ``y = x @ (w + Δ)`` (no saving: ``Δ`` is dense).

  Args:
    p: the kept fraction, ``0 < p <= 1``.
    l: the stretch's lower end, ``l < 0``.
    r: the stretch's upper end, ``r > 1``.
    beta: the temperature β > 0.
    alpha_init: the initial gate logit (``z = 1`` deterministically for
      ``α ≥ β · logit((1 − l)/(r − l))``, about 1.61 with the defaults).
    l0_coef: λ ≥ 0 of the expected-L0 penalty (0 disables it).
    param_dtype: dtype of ``d`` and ``α``; ``w'`` keeps ``w``'s dtype.

  Returns:
    The DiffPruning ``Adapter``; train it with ``diff_pruning_schedule``.
  """
  name = 'diff_pruning'
  p = probability(name, p)
  lo, hi = checks.real(name, 'l', l), checks.real(name, 'r', r)
  if lo >= 0:
    raise PeftError(f'{name}: l={lo} must be < 0')
  if hi <= 1:
    raise PeftError(f'{name}: r={hi} must be > 1')
  beta = checks.positive(name, 'beta', beta)
  alpha_init = checks.real(name, 'alpha_init', alpha_init)
  coef = checks.real(name, 'l0_coef', l0_coef)
  if coef < 0:
    raise PeftError(f'{name}: l0_coef={coef} must be >= 0')
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    params = DiffPruningParams(
      w=jnp.zeros(jnp.shape(w), dtype), alpha=jnp.full(jnp.shape(w), alpha_init, dtype)
    )
    buffers = DiffPruningBuffers(
      mask=jnp.zeros(jnp.shape(w), bool),
      fixed=jnp.zeros((), bool),
      k=jnp.asarray(budget(p, jnp.shape(w)), jnp.int32),
      noise=noise.inactive(key),
    )
    return params, buffers

  def gate(alpha, stream):
    return jax.lax.cond(
      stream.active,
      lambda: hard_concrete(
        alpha, uniform(noise.key_of(stream), alpha.shape), beta, lo, hi
      ),
      lambda: deterministic_gate(alpha, beta, lo, hi),
    )

  # Jitted so that eager calls (merge, evaluation outside a step) compile the
  # lax.conds once per adapter instead of once per call; inlined under jit.
  @jax.jit
  def delta(w, params, buffers):
    del w
    return jax.lax.cond(
      buffers.fixed,
      lambda: jnp.where(buffers.mask, params.w, jnp.zeros_like(params.w)),
      lambda: (gate(params.alpha, buffers.noise) * params.w).astype(params.w.dtype),
    )

  def regularizer(w, params, buffers):
    del w
    penalty = coef * expected_l0(params.alpha, beta, lo, hi)
    return jnp.where(buffers.fixed, jnp.zeros_like(penalty), penalty)

  layer = additive(
    init,
    delta,
    delta_product=lambda x, w, params, buffers: x @ delta(w, params, buffers),
    num_params=lambda shape: 2 * math.prod(shape),
  )
  return layer._replace(regularizer=regularizer if coef > 0 else None)
