"""FourierFT: trained spectral coefficients, ΔW their inverse 2-D DFT (Gao 2024)."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src import checks
from peft_jax._src.additive import additive
from peft_jax._src.base import Adapter, Array, PeftError
from peft_jax._src.registry import register


class FourierftParams(NamedTuple):
  """FourierFT's trained spectral coefficients: ``spectrum: (n,)``."""

  spectrum: Array


# torch's randperm draws 32-bit numbers below this many entries, 64-bit above.
TORCH_32BIT_LIMIT = (2**32 - 1) // 20


@functools.lru_cache(maxsize=256)
def torch_randperm_prefix(total: int, n: int, seed: int) -> np.ndarray:
  """``torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]``.

  torch's CPU generator is MT19937 seeded as NumPy's ``RandomState(seed)``;
  its ``randperm`` swaps ``r[i] <-> r[i + u_i mod (total - i)]`` for
  ``i = 0, 1, ...`` with 32-bit draws ``u_i``, so the first ``n`` entries
  are final after ``n`` swaps (kept sparse here). Exact for
  ``total < TORCH_32BIT_LIMIT`` (torch draws 64 bits past it); an int64
  array ``(n,)``.
  """
  draws = np.random.RandomState(seed).randint(0, 2**32, size=n, dtype=np.uint32)
  moved: dict[int, int] = {}
  prefix = np.empty(n, np.int64)
  for i in range(n):
    j = i + int(draws[i]) % (total - i)
    prefix[i] = moved.get(j, j)
    moved[j] = moved.get(i, i)
  return prefix


def frequencies(
  seed: int, n: int, d_in: int, d_out: int
) -> tuple[np.ndarray, np.ndarray]:
  """The ``(rows, cols)`` of the ``n`` trained entries of a ``(d_out, d_in)``
  spectrum: HF PEFT's ``randperm(d_out·d_in)[:n]`` split as ``(k // d_in,
  k mod d_in)``, each an int64 array ``(n,)``."""
  flat = torch_randperm_prefix(d_out * d_in, n, seed)
  return flat // d_in, flat % d_in


@register('fourierft')
def fourierft(
  n_frequency: int = 1000,
  scaling: float = 150.0,
  seed: int = 777,
  *,
  zero_init: bool = False,
  param_dtype: str = 'float32',
) -> Adapter:
  """Sparse spectrum, dense update: ``w' = w + s · Re(IDFT₂(F))ᵀ``.

  Shapes (Flax layout): ``w: (d_in, d_out)``, trainable ``spectrum: (n,)``
  (``FourierftParams``, ``n = n_frequency ≤ d_in·d_out``), no buffers. In
  HF PEFT's layout (``W: (d_out, d_in)``): the dense spectrum
  ``F: (d_out, d_in)`` is zero except ``F[rows, cols] = spectrum`` at the
  frequencies ``frequencies(seed, n, d_in, d_out)`` (HF's
  ``randperm(d_out·d_in)`` from ``random_loc_seed``, reproduced exactly,
  see ``torch_randperm_prefix``), and

    ``ΔW = s · Re(ifft2(F))``,  ``ifft2(F)[p, q] = 1/(d_out·d_in) ·
    Σ_{u,v} F[u, v] · exp(2πi (u p / d_out + v q / d_in))``,

  (``torch.fft.ifft2``'s default ``norm='backward'``); ours adds
  ``Δw = ΔWᵀ: (d_in, d_out)``, computed in float32 (at least) and cast to
  ``w``'s dtype. The frequencies are a function of the seed and the
  leaf's shape, recomputed on the host, never stored. Init: ``spectrum ~
  N(0, 1)`` (HF's default, ``init_weights=False``; not the identity) or
  zeros with ``zero_init`` (HF ``init_weights=True``). Trainable count
  ``n``. Mergeable and invertible; no factored form (``x @ Δw``).

  Args:
    n_frequency: n > 0, the number of trained coefficients per kernel.
    scaling: s > 0, the update's scale (HF's default 150).
    seed: the int ≥ 0 that picks the frequencies (HF ``random_loc_seed``).
    zero_init: start from a zero spectrum (the identity).
    param_dtype: dtype of the spectrum.

  Returns:
    The FourierFT ``Adapter``; its parameters are ``FourierftParams``.
  """
  name = 'fourierft'
  n_frequency = checks.positive_int(name, 'n_frequency', n_frequency)
  scaling = checks.positive(name, 'scaling', scaling)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise PeftError(f'{name}: seed={seed!r} must be an int >= 0')
  zero_init = checks.flag(name, 'zero_init', zero_init)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def frequencies_of(w):
    d_in, d_out = checks.matrix(name, w)
    if d_in * d_out >= TORCH_32BIT_LIMIT:
      raise PeftError(
        f'{name}: a {d_in}x{d_out} kernel has >= {TORCH_32BIT_LIMIT} entries, '
        "where torch's randperm draws 64-bit numbers, which are not reproduced; "
        'expected a smaller kernel'
      )
    if n_frequency > d_in * d_out:
      raise PeftError(
        f'{name}: n_frequency={n_frequency} exceeds the {d_in}x{d_out} kernel '
        f'({d_in * d_out} entries)'
      )
    return frequencies(int(seed), n_frequency, d_in, d_out)

  def init(key, w):
    frequencies_of(w)
    if zero_init:
      return FourierftParams(jnp.zeros(n_frequency, dtype)), None
    return FourierftParams(jax.random.normal(key, (n_frequency,), dtype)), None

  def delta(w, params, buffers):
    del buffers
    rows, cols = frequencies_of(w)
    compute = jnp.promote_types(params.spectrum.dtype, jnp.float32)
    dense = jnp.zeros(w.shape[::-1], compute).at[rows, cols].set(params.spectrum)
    return scaling * jnp.fft.ifft2(dense).real.T

  return additive(init, delta, num_params=lambda shape: n_frequency)
