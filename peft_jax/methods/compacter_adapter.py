"""Compacter and Compacter++ (Karimi Mahabadi et al., 2021): sequential
bottleneck adapters of LPHM layers whose rule matrices all layers share."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from peft_jax._src import bottleneck, checks, phm
from peft_jax._src.base import ActivationAdapter, Array, PeftError, Shared
from peft_jax._src.registry import register


class CompacterRule(NamedTuple):
  """The shared rule matrices ``a = (A_1..A_n): (n, n, n)``."""

  a: Array


class CompacterFactors(NamedTuple):
  """One point's own parameters: ``down_s: (n, d/n, r)``, ``down_t: (n, r,
  m/n)``, ``down_bias: (m,)``, ``up_s: (n, m/n, r)``, ``up_t: (n, r, d/n)``,
  ``up_bias: (d,)`` (each with the layer axes ``nn.scan`` adds)."""

  down_s: Array
  down_t: Array
  down_bias: Array
  up_s: Array
  up_t: Array
  up_bias: Array


class CompacterAdapterParams(NamedTuple):
  """What ``apply`` receives: the shared ``a`` (broadcast over the point's
  layer axes) with the point's ``CompacterFactors``."""

  a: Array
  down_s: Array
  down_t: Array
  down_bias: Array
  up_s: Array
  up_t: Array
  up_bias: Array


def attach(shared: CompacterRule, own: CompacterFactors) -> CompacterAdapterParams:
  """``own`` with ``a`` broadcast to its leading layer axes; the broadcast's
  gradient sums every layer's into the one shared copy."""
  layers = own.down_bias.shape[:-1]
  return CompacterAdapterParams(
    jnp.broadcast_to(shared.a, (*layers, *shared.a.shape)), *own
  )


def compacter_block(h: Array, p: CompacterAdapterParams) -> Array:
  """``h + GELU(h @ W_down + b_d) @ W_up + b_u`` with the LPHM weights
  ``W_down = Σ_i A_i ⊗ (S_i T_i): (d, m)`` and ``W_up: (m, d)`` likewise;
  ``h: (..., d)``, parameters of one point (no layer axes)."""
  w_down = phm.lphm_weight(p.a, p.down_s, p.down_t)
  w_up = phm.lphm_weight(p.a, p.up_s, p.up_t)
  hidden = jax.nn.gelu(h @ w_down + p.down_bias, approximate=False)
  return h + hidden @ w_up + p.up_bias


@register('compacter_adapter')
def compacter_adapter(
  reduction_factor: int = 32,
  n: int = 4,
  rank: int = 1,
  *,
  phm_init_range: float = 1e-4,
  param_dtype: str = 'float32',
) -> ActivationAdapter:
  """Compacter: ``h' = h + GELU(h @ W_down + b_d) @ W_up + b_u`` of LPHM layers.

  At a hook point with value ``h: (b, s, d)`` (a sub-layer output before its
  residual and LayerNorm), bottleneck ``m = d // reduction_factor``:
  ``W_down = Σ_{i=1..n} A_i ⊗ (S_i T_i): (d, m)`` with ``S_i = down_s[i]:
  (d/n, r)``, ``T_i = down_t[i]: (r, m/n)``; ``W_up = Σ_i A_i ⊗ (S'_i
  T'_i): (m, d)`` with ``up_s: (n, m/n, r)``, ``up_t: (n, r, d/n)``;
  ``b_d: (m,)``, ``b_u: (d,)``; GELU is the exact (erf) one. Compacter puts
  one after the attention output and one after the FFN of every layer,
  ``('.*/(attention_output|ffn_output)', 'compacter_adapter()')``;
  Compacter++ only the FFN one, ``('.*/ffn_output', 'compacter_adapter()')``.

  Sharing, as the paper and adapter-transformers (``shared_phm_rule=True``):
  the rule matrices ``A = (A_1..A_n): (n, n, n)`` are kept once per rule at
  ``params['@shared']['compacter_adapter']`` (``CompacterRule``) and used by
  the down and the up projection of every point of the rule;
  ``S_i, T_i`` and the biases are each point's own (``CompacterFactors``,
  with the layer axis under ``nn.scan``). Put both of Compacter's sites in
  one rule, as above: two rules would hold two copies of ``A``.

  Init as adapter-transformers' ``CompacterConfig``/``CompacterPlusPlusConfig``
  (``phm_c_init='normal'``, ``hypercomplex_nonlinearity='glorot-uniform'``,
  ``factorized_phm_W=True``, ``phm_bias=True``): ``A ~ N(0,
  phm_init_range²)`` with ``phm_init_range = 1e-4``; each ``S_i``, ``T_i``
  Glorot-uniform, ``U(±√(6 / (rows + cols)))``; biases 0. The tiny ``A``
  puts the adapter near (not exactly at) the identity.

  Trainable count per point ``2r(d + m) + d + m``, shared ``n³``; so
  Compacter on ``L`` layers has ``2L·(2r(d + m) + d + m) + n³`` (without
  biases and with ``r = 1``, ``4L(d + m) + n³``). Not mergeable (the
  branch is nonlinear).

  Differences from adapter-transformers: (1) the adapter reads ``h`` and
  adds to it, as Compacter's config (``original_ln_before=False``), also for
  Compacter++, whose config (``original_ln_before=True``) feeds it
  ``LayerNorm(x + h)`` with residual ``h``; (2) its current ``init_W``
  tests the truthiness of ``hypercomplex_nonlinearity`` before comparing
  names, so its documented ``'glorot-uniform'`` draws Glorot-normal; we
  draw the documented uniform (as its earlier ``PHMLayer.init_W`` did);
  (3) ``m`` has no ``max(1, ·)`` floor: ``n`` must divide ``d`` and ``m``,
  and ``m > 0``.

  Args:
    reduction_factor: ``m = d // reduction_factor`` (32, the configs').
    n: the number of Kronecker summands (``phm_dim``, 4); must divide ``d``
      and ``m``.
    rank: r of each ``S_i T_i`` (``phm_rank``, 1).
    phm_init_range: σ > 0 of the ``A`` init.
    param_dtype: dtype of the parameters; computed in the activation's dtype.

  Returns:
    The Compacter ``ActivationAdapter``.
  """
  name = 'compacter_adapter'
  reduction_factor = checks.positive_int(name, 'reduction_factor', reduction_factor)
  n = checks.positive_int(name, 'n', n)
  rank = checks.positive_int(name, 'rank', rank)
  init_std = checks.positive(name, 'phm_init_range', phm_init_range)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def sizes(value) -> tuple[int, int]:
    d = bottleneck.hidden_size(name, value)
    m = d // reduction_factor
    if d % n or m == 0 or m % n:
      raise PeftError(
        f'{name}: n={n} must divide d={d} and m = d // reduction_factor = '
        f'{d} // {reduction_factor} = {m} > 0'
      )
    return d, m

  def init(key, value):
    d, m = sizes(value)
    k_ds, k_dt, k_us, k_ut = jax.random.split(key, 4)
    factors = CompacterFactors(
      down_s=phm.glorot_uniform(k_ds, (n, d // n, rank), dtype),
      down_t=phm.glorot_uniform(k_dt, (n, rank, m // n), dtype),
      down_bias=jnp.zeros(m, dtype),
      up_s=phm.glorot_uniform(k_us, (n, m // n, rank), dtype),
      up_t=phm.glorot_uniform(k_ut, (n, rank, d // n), dtype),
      up_bias=jnp.zeros(d, dtype),
    )
    return factors, None

  def init_shared(key, value):
    del value
    return CompacterRule(init_std * jax.random.normal(key, (n, n, n), dtype))

  def apply(value, params, buffers):
    del buffers
    bottleneck.hidden_size(name, value)
    p = jax.tree.map(lambda t: t.astype(value.dtype), params)
    return compacter_block(value, p)

  def num_params(value):
    d, m = sizes(value)
    return 2 * rank * (d + m) + d + m

  return ActivationAdapter(
    init=init,
    apply=apply,
    num_params=num_params,
    shared=Shared(init=init_shared, derive=attach, num_params=lambda value: n**3),
  )
