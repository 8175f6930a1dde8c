"""VeRA: shared frozen random projections, trainable scaling vectors (Kopiczko 2024)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src import checks
from peft_jax._src.additive import additive
from peft_jax._src.base import Adapter, Array, PeftError
from peft_jax._src.registry import register


class VeraParams(NamedTuple):
  """VeRA's trained scaling vectors: ``lambda_d: (r,)``, ``lambda_b: (d_out,)``."""

  lambda_d: Array
  lambda_b: Array


class VeraProjections(NamedTuple):
  """Stored projections (``shared_shape=(n_in, n_out)``): ``a: (n_in, r)``,
  ``b: (r, n_out)``; a ``(d_in, d_out)`` kernel uses ``a[:d_in]`` and
  ``b[:, :d_out]``."""

  a: Array
  b: Array


def kaiming_uniform(key, shape):
  """``U(±√(6/fan_in))``, ``fan_in = shape[0]``: HF PEFT's VeRA ``_kaiming_init``."""
  bound = float(np.sqrt(6.0 / shape[0]))
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def projections(seed: int, rank: int, d_in: int, d_out: int):
  """The frozen ``(a: (d_in, r), b: (r, d_out))`` of a ``(d_in, d_out)`` kernel.

  A pure function of its arguments: ``a`` depends on ``(seed, rank, d_in)``
  and ``b`` on ``(seed, rank, d_out)``, so every adapted kernel with the same
  input (output) width shares the same ``a`` (``b``), as VeRA shares them.
  ``a ~ U(±√(6/d_in))`` and ``b ~ U(±√(6/r))``, float32.
  """
  key_a, key_b = jax.random.split(jax.random.key(seed))
  return (
    kaiming_uniform(jax.random.fold_in(key_a, d_in), (d_in, rank)),
    kaiming_uniform(jax.random.fold_in(key_b, d_out), (rank, d_out)),
  )


@register('vera')
def vera(
  rank: int = 256,
  d_init: float = 0.1,
  seed: int = 0,
  *,
  shared_shape: tuple[int, int] | None = None,
  param_dtype: str = 'float32',
) -> Adapter:
  """Scaled shared random projections: ``w' = w + (a ⊙ λ_d) @ (b ⊙ λ_b)``.

  Shapes (Flax layout): ``w: (d_in, d_out)``, frozen ``a: (d_in, r)`` and
  ``b: (r, d_out)`` from ``projections(seed, r, d_in, d_out)``, trainable
  ``lambda_d: (r,)`` and ``lambda_b: (d_out,)`` (``VeraParams``; no
  buffers unless ``shared_shape``: see below). In the PyTorch layout
  ``ΔW = Λ_b B Λ_d A`` with ``A = aᵀ: (r, d_in)``, ``B = bᵀ: (d_out, r)``
  (HF PEFT ``vera``: ``h = W x + λ_b ⊙ B(λ_d ⊙ A x)``, no scale). Init
  ``λ_d = d_init``, ``λ_b = 0``: identity at init. Trainable count
  ``r + d_out``. Mergeable and invertible. Factored form
  ``y = x @ w + (((x @ a) ⊙ λ_d) @ b) ⊙ λ_b``. ``r`` may exceed
  ``min(d_in, d_out)`` (HF PEFT's default r is 256).

  By default ``a`` and ``b`` are not stored, not even as buffers:
  ``apply`` and the factored form regenerate them from
  ``jax.random.key(seed)`` and the leaf's shape, so nothing but the two
  vectors is checkpointed and kernels of equal shape share the same
  matrices, deterministically across calls, processes and restarts (for a
  fixed JAX PRNG implementation). Differences from HF PEFT: HF draws one
  ``(r, max d_in)`` / ``(max d_out, r)`` pair with torch's generator and
  slices it per layer, so its bound uses the largest adapted width and its
  numbers cannot be reproduced here; ours uses each leaf's own ``d_in``
  (same distribution when all adapted kernels have one shape).

  With ``shared_shape=(n_in, n_out)`` the projections are stored instead,
  as buffers ``VeraProjections(a: (n_in, r), b: (r, n_out))``, HF's way:
  init fills them with ``projections(seed, r, n_in, n_out)`` (so all
  leaves of one spec hold the same pair) and a ``(d_in, d_out)`` kernel
  (``d_in ≤ n_in``, ``d_out ≤ n_out``) uses ``a[:d_in]`` and
  ``b[:, :d_out]``, as HF slices ``vera_A = aᵀ: (r, max d_in)`` and
  ``vera_B = bᵀ: (max d_out, r)``. Loading HF's saved ``vera_A`` and
  ``vera_B`` into these buffers reproduces HF's model
  (``peft_jax.interop``); each leaf holds its own copy of the pair.

  Args:
    rank: r > 0, the width of the shared projections.
    d_init: the initial value of every entry of ``λ_d``, nonzero (with
      ``λ_b = 0`` too, neither would get a gradient).
    seed: the int ≥ 0 that fixes the projections (HF ``projection_prng_key``).
    shared_shape: ``None`` (regenerated per leaf) or ``(n_in, n_out)``,
      the stored projections' widths (HF's largest adapted ``d_in``,
      ``d_out``).
    param_dtype: dtype of ``λ_d`` and ``λ_b``; ``w'`` keeps ``w``'s dtype.

  Returns:
    The VeRA ``Adapter``; its parameters are ``VeraParams``.
  """
  name = 'vera'
  rank = checks.positive_int(name, 'rank', rank)
  d_init = checks.nonzero(name, 'd_init', d_init)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise PeftError(f'{name}: seed={seed!r} must be an int >= 0')
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)
  if shared_shape is not None:
    shared_shape = _widths(name, shared_shape)

  def init(key, w):
    del key
    d_in, d_out = checks.matrix(name, w)
    params = VeraParams(
      lambda_d=jnp.full(rank, d_init, dtype), lambda_b=jnp.zeros(d_out, dtype)
    )
    if shared_shape is None:
      return params, None
    if d_in > shared_shape[0] or d_out > shared_shape[1]:
      raise PeftError(
        f'{name}: a ({d_in}, {d_out}) kernel does not fit in '
        f'shared_shape={shared_shape}'
      )
    return params, VeraProjections(*projections(seed, rank, *shared_shape))

  def scaled(w, params, buffers):
    if buffers is None:
      a, b = projections(seed, rank, *w.shape)
    else:
      a, b = buffers.a[: w.shape[0]], buffers.b[:, : w.shape[1]]
    return a * params.lambda_d, b * params.lambda_b

  def delta(w, params, buffers):
    a, b = scaled(w, params, buffers)
    return a @ b

  def delta_product(x, w, params, buffers):
    a, b = scaled(w, params, buffers)
    return (x @ a) @ b

  return additive(
    init,
    delta,
    delta_product=delta_product,
    num_params=lambda shape: rank + shape[1],
  )


def _widths(name: str, shared_shape) -> tuple[int, int]:
  """``shared_shape`` as ``(n_in, n_out)``, two ints > 0."""
  if not isinstance(shared_shape, (tuple, list)) or len(shared_shape) != 2:
    raise PeftError(f'{name}: shared_shape={shared_shape!r} must be (n_in, n_out)')
  n_in, n_out = (checks.positive_int(name, 'shared_shape', n) for n in shared_shape)
  return n_in, n_out
