"""Parallel adapter (He et al., 2022), which is MPC_n: a nonlinear side branch."""

import jax
import jax.numpy as jnp

from peft_jax._src import checks, initializers
from peft_jax._src.base import Adapter, PeftError
from peft_jax._src.registry import register

ACTIVATIONS = {
  'relu': jax.nn.relu,
  'gelu': jax.nn.gelu,
  'silu': jax.nn.silu,
  'tanh': jnp.tanh,
}


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
  Trainable count ``r · (d_in + d_out)``. ``factors`` gives ``(a, b)``.

  Not mergeable: the branch is nonlinear in ``x``, so there is no
  ``w'``. Only the factored form exists; ``apply`` raises. Train it through
  ``peft_jax.factored`` or ``make_train_step(..., factored=True)``.

  Args:
    rank: r, with ``0 < r <= min(d_in, d_out)``.
    activation: ``'relu'`` (the code), ``'gelu'``, ``'silu'`` or ``'tanh'``.
    param_dtype: dtype of ``a`` and ``b``.

  Returns:
    The parallel-adapter ``Adapter``.
  """
  name = 'parallel_adapter'
  rank = checks.positive_int(name, 'rank', rank)
  act = ACTIVATIONS[checks.choice(name, 'activation', activation, tuple(ACTIVATIONS))]
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    d_in, d_out = checks.rank_fits(name, rank, w)
    return {
      'a': initializers.kaiming_uniform(key, (d_in, rank), dtype, rank),
      'b': jnp.zeros((rank, d_out), dtype),
    }

  def apply(w, theta):
    del w, theta
    raise PeftError(
      f'{name} has no weight-space form (its branch is nonlinear in x); use the '
      'factored path: peft_jax.factored(...) or make_train_step(..., factored=True)'
    )

  def factored(x, w, theta):
    y = x @ w + act(x @ theta['a']) @ theta['b']
    return y.astype(jnp.result_type(x, w))

  return Adapter(
    init=init,
    apply=apply,
    factored=factored,
    num_params=lambda shape: rank * (shape[0] + shape[1]),
    factors=lambda theta: (theta['a'], theta['b']),
    mergeable=False,
  )
