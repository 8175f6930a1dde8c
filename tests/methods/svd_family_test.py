"""SAM-PARSER, PiSSA, MiLoRA, SVDiff and the Spectral Adapter against the spec.

Every reference is written in the spec's PyTorch layout (``W = wᵀ:
(d_out, d_in)``, ``W = U diag(σ) Vᵀ``) from a float64 NumPy SVD, so it is
independent of our float32 JAX SVD.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_jax as pj
from peft_jax._src.svd_lora import SvdLoraBuffers, SvdLoraParams
from peft_jax.methods import milora, pissa, sam_parser, spectral_adapter, svdiff
from peft_jax.methods.sam_parser import SamParserParams, SvdBasis
from peft_jax.methods.spectral_adapter import (
  SpectralAdapterBuffers,
  SpectralAdapterParams,
)
from peft_jax.methods.svdiff import SvdiffBuffers, SvdiffParams

D_IN, D_OUT = 9, 6  # non-square, so a transposed factor cannot pass
SHAPES = [(D_IN, D_OUT), (D_OUT, D_IN)]


def kernel(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def spec_svd(w):
  """``U (d_out, k), σ (k,), V (d_in, k)`` of ``W = wᵀ``, float64."""
  U, sigma, Vt = np.linalg.svd(np.float64(w).T, full_matrices=False)
  return U, sigma, Vt.T


def assert_close(actual, expected, tol=2e-5):
  np.testing.assert_allclose(np.float64(actual), expected, rtol=tol, atol=tol)


def probe_gradient(adapter, w, params, buffers):
  """``d/dparams Σ sin(x @ w') ⊙ probe``: a generic non-degenerate loss."""
  x = jax.random.normal(jax.random.key(1), (4, w.shape[0]))
  probe = jax.random.normal(jax.random.key(2), (4, w.shape[1]))
  out = lambda p: x @ adapter.apply(w, p, buffers)
  return jax.grad(lambda p: jnp.sum(jnp.sin(out(p)) * probe))(params)


def raises(message):
  return pytest.raises(
    pj.PeftError, match=message.replace('(', r'\(').replace(')', r'\)')
  )


# --- SAM-PARSER --------------------------------------------------------------


@pytest.mark.parametrize('shape', SHAPES)
def test_sam_parser_is_u_diag_sigma_prime_vt(shape):
  w = kernel(shape)
  adapter = sam_parser.sam_parser()
  _, buffers = adapter.init(jax.random.key(0), w)
  k = min(shape)
  sigma_prime = np.random.default_rng(1).uniform(0.5, 3.0, size=k)
  params = SamParserParams(jnp.float32(sigma_prime))
  U, _, V = spec_svd(w)
  # Spec, PyTorch layout: W' = U diag(σ') Vᵀ.
  merged = adapter.apply(w, params, buffers)
  assert_close(merged.T, U @ np.diag(sigma_prime) @ V.T)
  assert_close(adapter.unapply(merged, params, buffers), w)
  assert adapter.linear is None  # full rank k: no cheaper form


@pytest.mark.parametrize('shape', SHAPES)
def test_sam_parser_init_is_the_spectrum_and_exact_identity(shape):
  w = kernel(shape)
  adapter = sam_parser.sam_parser()
  params, buffers = adapter.init(jax.random.key(0), w)
  U, sigma, V = spec_svd(w)
  k = min(shape)
  assert isinstance(params, SamParserParams) and isinstance(buffers, SvdBasis)
  assert_close(params.sigma, sigma)
  assert_close(buffers.sigma0, sigma)
  # The bases are the spec's singular vectors, up to one sign per pair.
  assert buffers.u.shape == (shape[1], k) and buffers.v.shape == (shape[0], k)
  assert_close(np.abs(np.sum(np.float64(buffers.u) * U, axis=0)), np.ones(k))
  assert_close(np.abs(np.sum(np.float64(buffers.v) * V, axis=0)), np.ones(k))
  np.testing.assert_array_equal(adapter.apply(w, params, buffers), w)
  assert pj.count(params) == adapter.num_params(shape) == k


def test_sam_parser_trains_sigma_from_step_0():
  """Spec §3.2.1: the original re-created σ' lazily, so it was never trained."""
  w = kernel((D_IN, D_OUT))
  adapter = sam_parser.sam_parser()
  params, buffers = adapter.init(jax.random.key(0), w)
  grad = probe_gradient(adapter, w, params, buffers).sigma
  assert np.all(np.abs(np.asarray(grad)) > 1e-6)


def test_sam_parser_bf16_kernel_uses_a_float32_svd():
  w = jnp.asarray(kernel((D_IN, D_OUT)), jnp.bfloat16)
  adapter = sam_parser.sam_parser()
  params, buffers = adapter.init(jax.random.key(0), w)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves((params, buffers)))
  assert_close(params.sigma, spec_svd(np.float32(w))[1])
  out = adapter.apply(w, params, buffers)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.float32(out), np.float32(w))


# --- SVDiff ------------------------------------------------------------------


@pytest.mark.parametrize('shape', SHAPES)
def test_svdiff_is_u_diag_relu_sigma_plus_delta_vt(shape):
  w = kernel(shape)
  adapter = svdiff.svdiff()
  _, buffers = adapter.init(jax.random.key(0), w)
  U, sigma, V = spec_svd(w)
  # Shifts that push some singular values below 0, so the ReLU clips them.
  delta = np.random.default_rng(1).normal(size=sigma.shape) - np.r_[0, 0, 9 * sigma[2:]]
  params = SvdiffParams(jnp.float32(delta))
  expected = U @ np.diag(np.maximum(sigma + delta, 0)) @ V.T
  assert np.any(sigma + delta < 0)
  merged = adapter.apply(w, params, buffers)
  assert_close(merged.T, expected)
  assert_close(adapter.unapply(merged, params, buffers), w)
  assert adapter.linear is None  # full rank k: no cheaper form


def test_svdiff_starts_at_zero_shift_exact_identity_with_gradient():
  w = kernel((D_IN, D_OUT))
  adapter = svdiff.svdiff()
  params, buffers = adapter.init(jax.random.key(0), w)
  assert isinstance(params, SvdiffParams) and isinstance(buffers, SvdiffBuffers)
  np.testing.assert_array_equal(params.delta, 0)
  assert_close(buffers.sigma, spec_svd(w)[1])
  assert buffers.u.shape == (D_OUT, D_OUT) and buffers.v.shape == (D_IN, D_OUT)
  np.testing.assert_array_equal(adapter.apply(w, params, buffers), w)
  assert pj.count(params) == adapter.num_params(w.shape) == D_OUT
  grad = probe_gradient(adapter, w, params, buffers).delta
  assert np.all(np.abs(np.asarray(grad)) > 1e-6)


# --- PiSSA and MiLoRA --------------------------------------------------------

SVD_LORAS = [(pissa.pissa, False), (milora.milora, True)]


def triplets(w, rank, smallest):
  """The spec's top-r (PiSSA) or bottom-r (MiLoRA) triplets of W = wᵀ."""
  U, sigma, V = spec_svd(w)
  keep = slice(len(sigma) - rank, None) if smallest else slice(rank)
  return U[:, keep], sigma[keep], V[:, keep]


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('factory,smallest', SVD_LORAS)
def test_svd_lora_is_w_res_plus_scaled_ba(factory, smallest, shape):
  rank, alpha = 3, 5.0
  w = kernel(shape)
  adapter = factory(rank=rank, alpha=alpha)
  _, buffers = adapter.init(jax.random.key(0), w)
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(shape[0], rank)), rng.normal(size=(rank, shape[1]))
  params = SvdLoraParams(jnp.float32(a), jnp.float32(b))
  # Spec §3.1, PyTorch layout: W_res = W − U_r diag(σ_r) V_rᵀ, W' = W_res + s·BA.
  U_r, sigma_r, V_r = triplets(w, rank, smallest)
  W, A, B, s = np.float64(w).T, a.T, b.T, alpha / rank
  expected = W - U_r @ np.diag(sigma_r) @ V_r.T + s * B @ A
  merged = adapter.apply(w, params, buffers)
  assert_close(merged.T, expected, tol=1e-4)
  x = rng.normal(size=(5, shape[0]))
  assert_close(
    adapter.linear.factored(jnp.float32(x), w, params, buffers),
    x @ expected.T,
    tol=1e-4,
  )
  assert_close(adapter.unapply(merged, params, buffers), w, tol=1e-4)


@pytest.mark.parametrize('factory,smallest', SVD_LORAS)
def test_svd_lora_factors_come_from_the_pretrained_weight(factory, smallest):
  """Spec §3.2.2: the SVD is of the ``w`` passed to init (PiSSA's original
  code took it of the random init); ``a`` spans the input-side singular
  vectors V_r, ``b`` the output-side U_r, and ``s·a@b`` is their rank-r part."""
  rank, alpha = 2, 4.0
  w = kernel((D_IN, D_OUT))
  adapter = factory(rank=rank, alpha=alpha)
  params, buffers = adapter.init(jax.random.key(0), w)
  a, b = np.float64(params.a), np.float64(params.b)
  U_r, sigma_r, V_r = triplets(w, rank, smallest)
  s = alpha / rank
  assert_close(s * (b.T @ a.T), U_r @ np.diag(sigma_r) @ V_r.T, tol=1e-5)
  assert_close(V_r @ (V_r.T @ a), a)  # columns of a lie in span(V_r)
  assert_close(U_r @ (U_r.T @ b.T), b.T)  # rows of b lie in span(U_r)
  assert_close(a.T @ a, np.diag(sigma_r / s))  # A = diag(√(σ_r/s)) V_rᵀ
  assert_close(b @ b.T, np.diag(sigma_r / s))  # B = U_r diag(√(σ_r/s))
  # The buffers are copies of the initial factors.
  np.testing.assert_array_equal(buffers.a0, params.a)
  np.testing.assert_array_equal(buffers.b0, params.b)
  # Deterministic: no random init is involved, whatever the key.
  again = adapter.init(jax.random.key(7), w)
  jax.tree.map(np.testing.assert_array_equal, (params, buffers), again)


@pytest.mark.parametrize('factory,smallest', SVD_LORAS)
def test_svd_lora_is_exact_identity_at_init_and_trains_both_factors(factory, smallest):
  """MiLoRA's original code re-created its factors lazily (spec §3.2.1)."""
  del smallest
  for dtype in (jnp.float32, jnp.bfloat16):
    w = jnp.asarray(kernel((D_IN, D_OUT)), dtype)
    adapter = factory(rank=3, alpha=6)
    params, buffers = adapter.init(jax.random.key(0), w)
    out = adapter.apply(w, params, buffers)
    assert out.dtype == dtype
    np.testing.assert_array_equal(np.float32(out), np.float32(w))
    x = jnp.ones((2, D_IN), dtype)
    np.testing.assert_array_equal(adapter.linear.factored(x, w, params, buffers), x @ w)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves((params, buffers)))
  grads = probe_gradient(adapter, w.astype(jnp.float32), params, buffers)
  assert np.all(np.abs(np.asarray(grads.a)).sum(0) > 1e-6)
  assert np.all(np.abs(np.asarray(grads.b)).sum(1) > 1e-6)
  assert isinstance(params, SvdLoraParams) and isinstance(buffers, SvdLoraBuffers)
  assert pj.count(params) == adapter.num_params(w.shape) == 3 * (D_IN + D_OUT)
  down, up = adapter.factors(params, buffers)
  assert down is params.a and up is params.b


# --- Spectral Adapter --------------------------------------------------------


def aligned_top_triplets(w, rank, buffers):
  """The spec's top-r triplets, signs aligned with ours (u_i, v_i ↦ −u_i, −v_i
  is the SVD's only freedom, and P, Q are added to the vectors)."""
  U, sigma, V = spec_svd(w)
  U_r, sigma_r, V_r = U[:, :rank], sigma[:rank], V[:, :rank]
  signs = np.sign(np.sum(U_r * np.float64(buffers.u), axis=0))
  return U_r * signs, sigma_r, V_r * signs


@pytest.mark.parametrize('shape', SHAPES)
def test_spectral_adapter_matches_spec(shape):
  rank, alpha = 3, 6.0
  w = kernel(shape)
  adapter = spectral_adapter.spectral_adapter(rank=rank, alpha=alpha)
  _, buffers = adapter.init(jax.random.key(0), w)
  assert isinstance(buffers, SpectralAdapterBuffers)
  U_r, sigma_r, V_r = aligned_top_triplets(w, rank, buffers)
  assert_close(buffers.u, U_r)
  assert_close(buffers.v, V_r)
  assert_close(buffers.sigma, sigma_r)
  rng = np.random.default_rng(1)
  P, Q = rng.normal(size=(shape[1], rank)), rng.normal(size=(shape[0], rank))
  params = SpectralAdapterParams(p=jnp.float32(P), q=jnp.float32(Q))
  # Spec, PyTorch layout: W' = W + s[(U_r+P) Σ_r (V_r+Q)ᵀ − U_r Σ_r V_rᵀ].
  S, s = np.diag(sigma_r), alpha / rank
  expected = np.float64(w).T + s * ((U_r + P) @ S @ (V_r + Q).T - U_r @ S @ V_r.T)
  merged = adapter.apply(w, params, buffers)
  assert_close(merged.T, expected, tol=1e-4)
  x = rng.normal(size=(2, 5, shape[0]))
  assert_close(
    adapter.linear.factored(jnp.float32(x), w, params, buffers),
    x @ expected.T,
    tol=1e-4,
  )
  assert_close(adapter.unapply(merged, params, buffers), w, tol=1e-4)


def test_spectral_adapter_starts_at_zero_with_gradient_on_p_and_q():
  """Spec §3.2.1: P = Q = 0, yet both get gradient through the cross terms."""
  w = kernel((D_IN, D_OUT))
  adapter = spectral_adapter.spectral_adapter(rank=2, alpha=2)
  params, buffers = adapter.init(jax.random.key(0), w)
  assert isinstance(params, SpectralAdapterParams)
  assert params.p.shape == (D_OUT, 2) and params.q.shape == (D_IN, 2)
  np.testing.assert_array_equal(params.p, 0)
  np.testing.assert_array_equal(params.q, 0)
  np.testing.assert_array_equal(adapter.apply(w, params, buffers), w)
  grads = probe_gradient(adapter, w, params, buffers)
  for name in SpectralAdapterParams._fields:
    assert np.all(np.abs(np.asarray(getattr(grads, name))).sum(0) > 1e-6), name
  assert pj.count(params) == adapter.num_params(w.shape) == 2 * (D_IN + D_OUT)


# --- SVD bases are buffers ---------------------------------------------------

N = 256  # a 256 × 256 kernel, as in the issue (v1: 263,169 Adam floats for SAM-PARSER)
R = 8
# spec -> (trainable scalars, buffer scalars), from the shapes: k = N singular
# values; u, v: (N, N) full bases, (N, R) for the top-R triplets; a0: (N, R),
# b0: (R, N) the initial LoRA factors.
BASES = {
  'sam_parser()': (N, 2 * N * N + N),  # σ' | u, v, σ₀
  'svdiff()': (N, 2 * N * N + N),  # δ | u, v, σ
  f'pissa(rank={R})': (2 * N * R, 2 * N * R),  # a, b | a0, b0
  f'milora(rank={R})': (2 * N * R, 2 * N * R),
  f'spectral_adapter(rank={R})': (2 * N * R, 2 * N * R + R),  # p, q | u_r, v_r, σ_r
}


@pytest.mark.parametrize('spec', sorted(BASES))
def test_adam_state_holds_only_the_trainable_parameters(spec):
  trainable, buffered = BASES[spec]
  frozen = {'dense': {'kernel': jnp.float32(kernel((N, N)))}}
  tree = pj.by_rules([('dense/kernel', spec)])
  params, buffers = tree.init(jax.random.key(0), frozen)
  assert sum(np.size(x) for x in jax.tree.leaves(params)) == trainable
  assert sum(np.size(x) for x in jax.tree.leaves(buffers)) == buffered
  opt_state = optax.adam(1e-3).init(params)
  # Two moments per trainable scalar, plus Adam's step count.
  assert sum(np.size(x) for x in jax.tree.leaves(opt_state)) == 2 * trainable + 1
  # The bases still reach the merged weight: identity at init, up to SVD round-off.
  merged = pj.merge(tree, frozen, params, buffers)
  assert_close(merged['dense']['kernel'], frozen['dense']['kernel'], tol=1e-4)


# --- Bad hyper-parameters ----------------------------------------------------


@pytest.mark.parametrize(
  'factory,kwargs,leaf_shape,message',
  [
    (pissa.pissa, {'rank': 0}, (4, 4), 'pissa: rank=0 must be > 0'),
    (pissa.pissa, {'rank': 2.5}, (4, 4), 'must be an int'),
    (pissa.pissa, {'rank': 5}, (8, 4), 'rank=5 exceeds min(d_in, d_out)=4'),
    (pissa.pissa, {'alpha': 0}, (4, 4), 'pissa: alpha=0.0 must be > 0'),
    (pissa.pissa, {'alpha': 'big'}, (4, 4), "alpha='big' must be a number"),
    (milora.milora, {'rank': 5}, (4, 8), 'milora: rank=5 exceeds min'),
    (milora.milora, {'alpha': -2}, (4, 4), 'milora: alpha=-2.0 must be > 0'),
    (milora.milora, {'param_dtype': 'int8'}, (4, 4), 'not a floating dtype'),
    (
      spectral_adapter.spectral_adapter,
      {'rank': 5},
      (8, 4),
      'spectral_adapter: rank=5 exceeds min(d_in, d_out)=4',
    ),
    (spectral_adapter.spectral_adapter, {'rank': True}, (4, 4), 'must be an int'),
    (spectral_adapter.spectral_adapter, {'rank': 2}, (4,), 'expects a 2-D kernel'),
    (sam_parser.sam_parser, {'param_dtype': 'int8'}, (4, 4), 'not a floating dtype'),
    (sam_parser.sam_parser, {}, (2, 4, 4), 'sam_parser expects a 2-D kernel'),
    (svdiff.svdiff, {}, (4,), 'svdiff expects a 2-D kernel'),
  ],
)
def test_bad_hyperparameters_are_clear_errors(factory, kwargs, leaf_shape, message):
  with raises(message):
    factory(**kwargs).init(jax.random.key(0), jnp.ones(leaf_shape))
