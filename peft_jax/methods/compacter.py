"""Compacter: a parallel adapter of low-rank PHM layers (Karimi Mahabadi et al.)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from peft_jax._src import checks, phm
from peft_jax._src.base import Adapter, Array, Linear, PeftError
from peft_jax._src.registry import register


class CompacterParams(NamedTuple):
  """The leaf's rule matrices and its two LPHM projections with biases.

  ``a: (n, n, n)``; ``down_s: (n, d_in/n, r)``, ``down_t: (n, r, m/n)``,
  ``b_down: (m,)``; ``up_s: (n, m/n, r)``, ``up_t: (n, r, d_out/n)``,
  ``b_up: (d_out,)``.
  """

  a: Array
  down_s: Array
  down_t: Array
  b_down: Array
  up_s: Array
  up_t: Array
  b_up: Array


@register('compacter')
def compacter(
  reduction_factor: int = 32,
  n: int = 4,
  rank: int = 1,
  *,
  phm_init_range: float = 1e-4,
  param_dtype: str = 'float32',
) -> Adapter:
  """A parallel LPHM adapter: ``y = x @ w + up(GELU(down(x)))``; not mergeable.

  Each projection is an LPHM layer (low-rank parameterised hypercomplex
  multiplication): ``W = Σ_{i=1..n} A_i ⊗ (S_i T_i)``. Shapes (Flax layout),
  with ``w: (d_in, d_out)`` and bottleneck ``m = d_in // reduction_factor``:
  ``a = (A_1..A_n): (n, n, n)``; ``down(x) = x @ W_down + b_down`` with
  ``W_down = Σ A_i ⊗ (down_s_i down_t_i): (d_in, m)``,
  ``down_s: (n, d_in/n, r)``, ``down_t: (n, r, m/n)``, ``b_down: (m,)``;
  ``up(h) = h @ W_up + b_up`` with ``W_up = Σ A_i ⊗ (up_s_i up_t_i):
  (m, d_out)``, ``up_s: (n, m/n, r)``, ``up_t: (n, r, d_out/n)``,
  ``b_up: (d_out,)``. GELU is the exact (erf) one. In the PyTorch layout
  ``h = W x + b + W_upᵀ GELU(W_downᵀ x + b_down) + b_up``. The survey's
  Compacter is a sequential adapter ``h + LPHM_up(GELU(LPHM_down(h)))``
  after a sub-layer; in our per-leaf contract it sits in parallel with the
  adapted kernel (a parallel adapter, He et al.).

  Deviation: the paper (and AdapterHub's ``shared_phm_rule``) shares the
  ``A_i`` across all layers. Per-leaf adapters cannot share parameters across
  leaves, so each adapted leaf has its own ``A_i`` (``n³`` more parameters
  per leaf), shared by that leaf's down and up projections.
  ``compacter_adapter`` is the paper's form: a sequential adapter at hook
  points with one ``A`` shared by all of them.

  Init as AdapterHub's ``CompacterConfig`` (``phm_c_init='normal'``,
  Glorot-uniform ``S_i``, ``T_i``, zero biases), except ``up_t = 0`` so that
  ``W_up = 0`` and the adapter starts exactly at the identity (AdapterHub
  relies on the tiny ``A_i`` for near-identity): ``A_i ~ N(0,
  phm_init_range²)``, ``down_s``, ``down_t``, ``up_s`` Glorot-uniform per
  ``i``.

  Trainable count ``n³ + r·(d_in + 2m + d_out) + m + d_out``
  (``CompacterParams``); no buffers. Not mergeable (the GELU has no
  weight-space form): ``apply`` is ``None`` and the method has only the
  linear-layer form, which ``peft_jax.adapted`` and ``make_train_step`` run on
  either path; it forms just the small ``(d_in, m)`` and ``(m, d_out)`` LPHM
  matrices.

  Args:
    reduction_factor: ``m = d_in // reduction_factor`` (AdapterHub's default
      32); ``m`` must be a positive multiple of ``n``.
    n: the number of Kronecker summands (AdapterHub's ``phm_dim``, 4); must
      divide ``d_in``, ``m`` and ``d_out``.
    rank: r of each ``S_i T_i`` (AdapterHub's ``phm_rank``, 1).
    phm_init_range: the standard deviation σ > 0 of the ``A_i`` init.
    param_dtype: dtype of all adapter parameters.

  Returns:
    The Compacter ``Adapter``.
  """
  name = 'compacter'
  reduction_factor = checks.positive_int(name, 'reduction_factor', reduction_factor)
  n = checks.positive_int(name, 'n', n)
  rank = checks.positive_int(name, 'rank', rank)
  init_std = checks.positive(name, 'phm_init_range', phm_init_range)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def dims(w):
    d_in, d_out = checks.matrix(name, w)
    m = d_in // reduction_factor
    for label, dim in (('d_in', d_in), ('bottleneck m', m), ('d_out', d_out)):
      if dim == 0 or dim % n:
        raise PeftError(
          f'{name}: n={n} must divide {label}={dim} (a positive size; '
          f'm = d_in // reduction_factor = {d_in} // {reduction_factor})'
        )
    if rank > min(d_in, m, d_out) // n:
      raise PeftError(
        f'{name}: rank={rank} exceeds min(d_in, m, d_out)/n='
        f'{min(d_in, m, d_out) // n} for the kernel of shape {(d_in, d_out)}'
      )
    return d_in // n, m // n, d_out // n

  def init(key, w):
    p_in, p_mid, p_out = dims(w)
    k_a, k_ds, k_dt, k_us = jax.random.split(key, 4)
    params = CompacterParams(
      a=init_std * jax.random.normal(k_a, (n, n, n), dtype),
      down_s=phm.glorot_uniform(k_ds, (n, p_in, rank), dtype),
      down_t=phm.glorot_uniform(k_dt, (n, rank, p_mid), dtype),
      b_down=jnp.zeros(n * p_mid, dtype),
      up_s=phm.glorot_uniform(k_us, (n, p_mid, rank), dtype),
      up_t=jnp.zeros((n, rank, p_out), dtype),
      b_up=jnp.zeros(n * p_out, dtype),
    )
    return params, None

  def factored(x, w, params, buffers):
    del buffers
    w_down = phm.lphm_weight(params.a, params.down_s, params.down_t)
    w_up = phm.lphm_weight(params.a, params.up_s, params.up_t)
    h = jax.nn.gelu(x @ w_down + params.b_down, approximate=False)
    y = x @ w + (h @ w_up + params.b_up)
    return y.astype(jnp.result_type(x, w))

  def num_params(shape):
    d_in, d_out = shape
    m = d_in // reduction_factor
    return n**3 + rank * (d_in + 2 * m + d_out) + m + d_out

  return Adapter(init=init, linear=Linear(factored), num_params=num_params)
