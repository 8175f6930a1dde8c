"""Intrinsic SAID: a random Fastfood subspace per leaf (Aghajanyan et al., 2021)."""

import math

import jax
import jax.numpy as jnp

from peft_jax._src import checks
from peft_jax._src.base import BUFFERS, Adapter, PeftError
from peft_jax._src.registry import register


def fwht(x):
  """Unnormalised fast Walsh–Hadamard transform along the last axis.

  ``x: (..., L)`` with ``L = 2^k``; returns ``x @ H_L`` with the Sylvester
  Hadamard matrix ``H_L = H_2 ⊗ ... ⊗ H_2`` (entries ±1, symmetric,
  ``H_L H_L = L·I``): one ``(a, b) ↦ (a + b, a − b)`` butterfly per Kronecker
  axis, ``O(L log L)``, reshapes only.
  """
  *batch, size = x.shape
  h = 1
  while h < size:
    pairs = x.reshape(*batch, size // (2 * h), 2, h)
    a, b = pairs[..., 0, :], pairs[..., 1, :]
    x = jnp.stack([a + b, a - b], axis=-2).reshape(*batch, size)
    h *= 2
  return x


def padded_size(size: int) -> int:
  """``L``: the smallest power of two ``>= size``."""
  return 1 << (size - 1).bit_length()


def fastfood(v, buffers, size: int):
  """``P(v)``: the Fastfood map ``R^d -> R^D`` of the reference SAID code.

  ``P(v) = (H G Π H B [v; 0])[:D] / √(D · Σ G²)`` with ``L = padded_size(D)``,
  ``v`` zero-padded to ``L``, ``H`` the ``L × L`` Hadamard matrix, ``B`` the
  ±1 diagonal ``buffers['sign']``, ``Π`` the permutation
  ``(Π u)_j = u[argsort(buffers['perm_keys'])_j]`` and ``G`` the Gaussian
  diagonal ``buffers['gauss']``. The scale makes each column of ``P`` about
  unit-norm (the reference divides by ``√(L ΣG²) · √(D/L)``, the same).
  """
  length = buffers['sign'].shape[0]
  u = fwht(buffers['sign'] * jnp.pad(v, (0, length - v.shape[0])))
  u = fwht(buffers['gauss'] * u[jnp.argsort(buffers['perm_keys'])])
  return u[:size] / jnp.sqrt(size * jnp.sum(buffers['gauss'] ** 2))


@register('intrinsic_said')
def intrinsic_said(dim: int = 256, *, param_dtype: str = 'float32') -> Adapter:
  """Structure-aware intrinsic subspace: ``θ' = θ0 + λ · P(θ_d)``.

  Any leaf ``θ0`` (kernel, bias, LayerNorm scale) of size ``D`` (flattened
  row-major): trainable ``theta_d: (d,)`` and the scalar ``lam`` (λ, the
  per-tensor "structure-aware" scale of SAID), and the fixed Fastfood
  projection ``P: R^d -> R^D`` of ``fastfood`` (``P = H G Π H B``, restricted
  to ``d`` columns and ``D`` rows, ``O(L log L)`` time, ``O(L)`` memory,
  ``L = 2^⌈log2 D⌉``) whose random diagonals live under ``buffers``:
  ``sign`` (±1), ``gauss`` (``N(0, 1)``) and ``perm_keys`` (``U(0, 1)``;
  ``Π`` is their argsort, so every buffer is a float array that
  ``jax.grad`` and checkpoints accept). Layout-free: the same formula in the
  PyTorch and Flax layouts.

  As the reference code (``intrinsic_dimension_said``, the authors' code as
  vendored in rabeehk/compacter): one Fastfood per tensor, ``θ_d = 0`` and
  ``λ = 1`` at init (so identity at init, and only ``θ_d`` gets a gradient at
  the first step).
  Deviation: the paper trains ONE global ``θ_d`` projected into every tensor
  (``d`` counts it once, plus one λ per tensor); per-leaf adapters cannot
  share parameters, so each adapted leaf has its own ``θ_d`` (its own
  intrinsic subspace of dimension ``d``). Our gradients are JAX's exact ones;
  the reference's custom Walsh–Hadamard backward scales by ``1/√L`` while its
  forward is unnormalised — we do not copy that.

  Trainable count ``d + 1``. Every entry of the leaf changes. Mergeable
  (``apply`` is the weight-space form); ``unapply`` subtracts
  ``λ · P(θ_d)``. No factored form: the update is dense and costs ``O(D)``
  anyway, so the factored path applies it in weight space.

  Args:
    dim: d, the intrinsic dimension of each leaf's subspace; ``d <= D``.
    param_dtype: dtype of ``theta_d``, ``lam`` and the buffers.

  Returns:
    The Intrinsic SAID ``Adapter``.
  """
  name = 'intrinsic_said'
  dim = checks.positive_int(name, 'dim', dim)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    size = math.prod(jnp.shape(w))
    if dim > size:
      raise PeftError(
        f'{name}: dim={dim} exceeds the leaf size D={size} (shape '
        f'{jnp.shape(w)}); use a smaller dim for this leaf'
      )
    length = padded_size(size)
    k_sign, k_perm, k_gauss = jax.random.split(key, 3)
    return {
      'theta_d': jnp.zeros(dim, dtype),
      'lam': jnp.ones((), dtype),
      BUFFERS: {
        'sign': jax.random.rademacher(k_sign, (length,), dtype),
        'perm_keys': jax.random.uniform(k_perm, (length,), dtype),
        'gauss': jax.random.normal(k_gauss, (length,), dtype),
      },
    }

  def delta(w, theta):
    ray = fastfood(theta['theta_d'], theta[BUFFERS], w.size)
    return theta['lam'] * ray.reshape(w.shape)

  return Adapter(
    init=init,
    apply=lambda w, theta: (w + delta(w, theta)).astype(w.dtype),
    unapply=lambda w, theta: (w - delta(w, theta)).astype(w.dtype),
    num_params=lambda shape: dim + 1,
  )
