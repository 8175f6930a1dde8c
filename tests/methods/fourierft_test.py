"""FourierFT against its formula: the real part of an inverse 2-D DFT of a
sparse spectrum (HF PEFT's layout), at torch.randperm's frequencies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax.methods.fourierft import (
  FourierftParams,
  fourierft,
  frequencies,
  torch_randperm_prefix,
)

D_IN, D_OUT = 9, 6


def full_randperm(total: int, seed: int) -> np.ndarray:
  """torch's CPU ``randperm``: Fisher-Yates with MT19937 32-bit draws
  ``u_i``, swapping ``r[i]`` and ``r[i + u_i mod (total - i)]``."""
  draws = np.random.RandomState(seed).randint(0, 2**32, size=total, dtype=np.uint32)
  r = np.arange(total)
  for i in range(total - 1):
    j = i + int(draws[i]) % (total - i)
    r[i], r[j] = r[j], r[i]
  return r


@pytest.mark.parametrize(
  ('total', 'n', 'seed'), [(54, 54, 777), (54, 10, 0), (300, 17, 5)]
)
def test_randperm_prefix_is_the_full_shuffle_prefix(total, n, seed):
  np.testing.assert_array_equal(
    torch_randperm_prefix(total, n, seed), full_randperm(total, seed)[:n]
  )


def test_known_torch_randperm_values():
  """``torch.randperm(256, generator=torch.Generator().manual_seed(777))[:5]``
  (torch 2.13.0)."""
  np.testing.assert_array_equal(
    torch_randperm_prefix(256, 5, 777), [103, 15, 197, 254, 243]
  )


@pytest.mark.parametrize('n', [1, 10, D_IN * D_OUT])
def test_apply_is_w_plus_scaled_real_inverse_dft(n):
  rng = np.random.default_rng(n)
  w = rng.normal(size=(D_IN, D_OUT))
  spectrum = rng.normal(size=n)
  scaling = 3.5
  adapter = fourierft(n_frequency=n, scaling=scaling, seed=11, param_dtype='float64')
  with jax.enable_x64():
    params = FourierftParams(jnp.asarray(spectrum))
    merged = np.asarray(adapter.apply(jnp.asarray(w), params, None))
    restored = np.asarray(adapter.unapply(jnp.asarray(merged), params, None))
  # Spec (PyTorch layout W: (d_out, d_in)): ΔW[p, q] = s/(d_out d_in) ·
  # Σ_k c_k cos(2π (u_k p / d_out + v_k q / d_in)), (u, v) = divmod(perm, d_in).
  u, v = np.divmod(full_randperm(D_OUT * D_IN, 11)[:n], D_IN)
  p, q = np.arange(D_OUT)[:, None, None], np.arange(D_IN)[None, :, None]
  phase = 2 * np.pi * (u * p / D_OUT + v * q / D_IN)
  delta = scaling / (D_OUT * D_IN) * (spectrum * np.cos(phase)).sum(-1)
  np.testing.assert_allclose(merged, w + delta.T, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(restored, w, rtol=1e-12, atol=1e-12)


def test_frequencies_split_the_permutation_by_rows_of_d_in():
  rows, cols = frequencies(3, 8, D_IN, D_OUT)
  np.testing.assert_array_equal(rows * D_IN + cols, full_randperm(D_IN * D_OUT, 3)[:8])
  assert rows.max() < D_OUT and cols.max() < D_IN


def test_init_is_normal_or_zero_and_count_is_n():
  w = jnp.ones((D_IN, D_OUT))
  params, buffers = fourierft(n_frequency=5).init(jax.random.key(0), w)
  assert buffers is None and params.spectrum.shape == (5,)
  assert np.abs(np.asarray(params.spectrum)).max() > 0
  zero = fourierft(n_frequency=5, zero_init=True)
  params, buffers = zero.init(jax.random.key(0), w)
  np.testing.assert_array_equal(zero.apply(w, params, buffers), w)
  assert pj.count(params) == zero.num_params((D_IN, D_OUT)) == 5


@pytest.mark.parametrize(
  'kwargs,leaf_shape,message',
  [
    ({'n_frequency': 0}, (4, 4), 'n_frequency=0 must be > 0'),
    ({'n_frequency': 17}, (4, 4), 'n_frequency=17 exceeds the 4x4 kernel'),
    ({'seed': -1}, (4, 4), 'seed=-1 must be an int >= 0'),
    ({'param_dtype': 'int8'}, (4, 4), 'not a floating dtype'),
    ({}, (4,), 'expects a 2-D kernel'),
  ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, leaf_shape, message):
  with pytest.raises(pj.PeftError, match=f'fourierft.*{message}'):
    fourierft(**{'n_frequency': 3, **kwargs}).init(
      jax.random.key(0), jnp.ones(leaf_shape)
    )


def test_kernels_past_torchs_32_bit_randperm_are_refused():
  """Past ``TORCH_32BIT_LIMIT`` entries torch draws 64-bit numbers, which
  ``torch_randperm_prefix`` does not reproduce: refused, not silently off."""
  huge = jax.ShapeDtypeStruct((16384, 16384), jnp.float32)  # 2.7e8 entries
  with pytest.raises(pj.PeftError, match='randperm draws 64-bit numbers'):
    jax.eval_shape(pj.fourierft(n_frequency=10).init, jax.random.key(0), huge)
