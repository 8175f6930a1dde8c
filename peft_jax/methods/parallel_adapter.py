"""Parallel adapter (He et al., 2022), which is MPC_n: a nonlinear side branch."""

from typing import NamedTuple

import jax.numpy as jnp

from peft_jax._src import checks, initializers, nonlinearities
from peft_jax._src.base import Adapter, Array, Linear
from peft_jax._src.low_rank import factors
from peft_jax._src.registry import register


class ParallelAdapterParams(NamedTuple):
  """The branch's factors: ``a: (d_in, r)``, ``b: (r, d_out)``."""

  a: Array
  b: Array


@register('parallel_adapter')
def parallel_adapter(
  rank: int = 8,
  activation: str = 'relu',
  *,
  param_dtype: str = 'float32',
) -> Adapter:
  """A bottleneck branch beside a kernel: ``y = x @ w + σ(x @ a) @ b``.

  Shapes (Flax layout): ``x: (..., d_in)``, ``w: (d_in, d_out)``,
  ``a: (d_in, r)``, ``b: (r, d_out)``, ``σ = activation`` (ReLU). Spec
  (PyTorch layout, ``layers_PA.py``): ``h = W x + b + B·ReLU(A x)`` with
  ``A = aᵀ``, ``B = bᵀ``, no α/r scale; the paper's "LoRA + MPC_n" has
  the same numbers as PA in every cell, so this *is* MPC_n. Init
  ``a ~ KU(d_in)`` (``U(±1/√d_in)``), ``b = 0``: identity at init.
  Trainable count ``r · (d_in + d_out)`` (``ParallelAdapterParams``). ``factors``
  gives ``(a, b)``.

  Not mergeable: the branch is nonlinear in ``x``, so there is no ``w'``.
  The method has only the linear-layer form (``apply`` is ``None``);
  ``peft_jax.adapted`` and ``make_train_step`` run it that way on either
  path.

  Args:
    rank: r, with ``0 < r <= min(d_in, d_out)``.
    activation: ``'relu'`` (the code), ``'gelu'``, ``'silu'``/``'swish'`` or
      ``'tanh'``.
    param_dtype: dtype of ``a`` and ``b``.

  Returns:
    The parallel-adapter ``Adapter``.
  """
  name = 'parallel_adapter'
  rank = checks.positive_int(name, 'rank', rank)
  act = nonlinearities.get(name, 'activation', activation)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    d_in, d_out = checks.rank_fits(name, rank, w)
    params = ParallelAdapterParams(
      a=initializers.kaiming_uniform(key, (d_in, rank), dtype, rank),
      b=jnp.zeros((rank, d_out), dtype),
    )
    return params, None

  def factored(x, w, params, buffers):
    del buffers
    y = x @ w + act(x @ params.a) @ params.b
    return y.astype(jnp.result_type(x, w))

  return Adapter(
    init=init,
    linear=Linear(factored),
    num_params=lambda shape: rank * (shape[0] + shape[1]),
    factors=factors,
  )
