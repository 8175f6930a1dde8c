"""Intrinsic SAID: a random Fastfood subspace per leaf (Aghajanyan et al., 2021)."""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from peft_jax._src import checks
from peft_jax._src.additive import additive
from peft_jax._src.base import Adapter, Array, PeftError
from peft_jax._src.registry import register


class IntrinsicSaidParams(NamedTuple):
  """The leaf's intrinsic vector ``theta_d: (d,)`` and its scale ``lam: ()``."""

  theta_d: Array
  lam: Array


class IntrinsicSaidBuffers(NamedTuple):
  """The fixed Fastfood diagonals, each of length ``L = padded_size(D)``.

  ``sign: (L,)`` float (±1, ``B``), ``perm: (L,)`` int32 (a permutation of
  ``0..L−1``, ``Π``), ``gauss: (L,)`` float (``N(0, 1)``, ``G``).
  """

  sign: Array
  perm: Array
  gauss: Array


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


def fastfood(v: Array, buffers: IntrinsicSaidBuffers, size: int) -> Array:
  """``P(v)``: the Fastfood map ``R^d -> R^D`` of the reference SAID code.

  ``P(v) = (H G Π H B [v; 0])[:D] / √(D · Σ G²)`` with ``L = padded_size(D)``,
  ``v`` zero-padded to ``L``, ``H`` the ``L × L`` Hadamard matrix, ``B`` the
  ±1 diagonal ``buffers.sign``, ``Π`` the permutation
  ``(Π u)_j = u[buffers.perm_j]`` and ``G`` the Gaussian diagonal
  ``buffers.gauss``. The scale makes each column of ``P`` about unit-norm
  (the reference divides by ``√(L ΣG²) · √(D/L)``, the same).
  """
  length = buffers.sign.shape[0]
  u = fwht(buffers.sign * jnp.pad(v, (0, length - v.shape[0])))
  u = fwht(buffers.gauss * u[buffers.perm])
  return u[:size] / jnp.sqrt(size * jnp.sum(buffers.gauss**2))


@register('intrinsic_said')
def intrinsic_said(dim: int = 256, *, param_dtype: str = 'float32') -> Adapter:
  """Structure-aware intrinsic subspace: ``θ' = θ0 + λ · P(θ_d)``.

  Any leaf ``θ0`` (kernel, bias, LayerNorm scale) of size ``D`` (flattened
  row-major): trainable ``theta_d: (d,)`` and the scalar ``lam`` (λ, the
  per-tensor "structure-aware" scale of SAID), and the fixed Fastfood
  projection ``P: R^d -> R^D`` of ``fastfood`` (``P = H G Π H B``, restricted
  to ``d`` columns and ``D`` rows, ``O(L log L)`` time, ``O(L)`` memory,
  ``L = 2^⌈log2 D⌉``) whose random parts are the buffers
  (``IntrinsicSaidBuffers``): ``sign`` (±1), ``perm`` (a uniformly random
  permutation of ``0..L−1``, int32, as the reference's
  ``Pi = np.random.permutation(L)``) and ``gauss`` (``N(0, 1)``). Parameters
  ``IntrinsicSaidParams(theta_d, lam)``.
  Layout-free: the same formula in the PyTorch and Flax layouts.

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
    param_dtype: dtype of ``theta_d``, ``lam`` and the ``sign`` and ``gauss``
      buffers; ``w'`` keeps ``w``'s dtype.

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
    params = IntrinsicSaidParams(theta_d=jnp.zeros(dim, dtype), lam=jnp.ones((), dtype))
    buffers = IntrinsicSaidBuffers(
      sign=jax.random.rademacher(k_sign, (length,), dtype),
      perm=jax.random.permutation(k_perm, length).astype(jnp.int32),
      gauss=jax.random.normal(k_gauss, (length,), dtype),
    )
    return params, buffers

  def delta(w, params, buffers):
    ray = fastfood(params.theta_d, buffers, w.size)
    return params.lam * ray.reshape(w.shape)

  return additive(init, delta, num_params=lambda shape: dim + 1)
