"""peft_jax.analysis against float64 NumPy and matrices with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax import analysis

M, N = 24, 16  # a rectangular W: (m, n), p = min(m, n) = 16


def random_matrix(seed, m=M, n=N):
  return np.random.default_rng(seed).normal(size=(m, n))


def svd64(w):
  u, sigma, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
  return u, sigma, vt.T


def close(got, want, rtol=1e-5, atol=1e-5):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol)


def inside_top(w, k, seed):
  """A random ``U_k C V_kᵀ``: inside W's top-k left and right subspaces."""
  u, _, v = svd64(w)
  core = np.random.default_rng(seed).normal(size=(k, k))
  return u[:, :k] @ core @ v[:, :k].T


def test_svd_and_spectrum_match_float64():
  w = random_matrix(0)
  u, sigma, v = analysis.svd(w)
  assert u.shape == (M, N) and sigma.shape == (N,) and v.shape == (N, N)
  close(sigma, svd64(w)[1])
  close((u * sigma) @ v.T, w, atol=1e-4)
  close(analysis.spectrum(w), svd64(w)[1])
  close(analysis.spectrum(w, normalize=True), svd64(w)[1] / svd64(w)[1][0])
  np.testing.assert_array_equal(analysis.spectrum(np.zeros((4, 3)), True), 0.0)


def test_rank_tolerance_is_eps_times_max_dim_times_sigma_max():
  w = random_matrix(1)
  want = np.finfo(np.float32).eps * max(M, N) * svd64(w)[1][0]
  close(analysis.rank_tolerance(w), want)
  close(analysis.rank_tolerance(w, rtol=0.5), 0.5 * svd64(w)[1][0])


@pytest.mark.parametrize('r', [1, 3, 8, N])
def test_numerical_rank_of_a_rank_r_product_is_r(r):
  rng = np.random.default_rng(r)
  product = rng.normal(size=(M, r)) @ rng.normal(size=(r, N))
  assert int(analysis.numerical_rank(product)) == r
  assert int(analysis.numerical_rank(product)) == np.linalg.matrix_rank(product)


def test_numerical_rank_edge_cases():
  assert int(analysis.numerical_rank(np.zeros((5, 7)))) == 0
  # σ = (1, 1e-3, 0): the default tolerance (eps · 3 · 1) keeps 1e-3, rtol=1e-2 not.
  diagonal = np.diag([1.0, 1e-3, 0.0])
  assert int(analysis.numerical_rank(diagonal)) == 2
  assert int(analysis.numerical_rank(diagonal, rtol=1e-2)) == 1


def test_numerical_rank_of_a_merged_lora_update_is_its_rank():
  w = jnp.asarray(random_matrix(2), jnp.float32)
  adapter = pj.lora(rank=4, alpha=8, b_init='gaussian')  # b ≠ 0: ΔW ≠ 0
  params, buffers = adapter.init(jax.random.key(0), w)
  delta = adapter.apply(w, params, buffers) - w
  assert int(analysis.numerical_rank(delta)) == 4
  close(delta, 2.0 * params.a @ params.b, atol=1e-5)


def test_subspace_similarity_known_cases_and_formula():
  q, _ = np.linalg.qr(random_matrix(3, M, 10))
  close(analysis.subspace_similarity(q[:, :4], q[:, :4]), 1.0)
  close(analysis.subspace_similarity(q[:, :4], q[:, :7]), 1.0)  # nested
  close(analysis.subspace_similarity(q[:, :4], q[:, 4:9]), 0.0, atol=1e-6)
  a, _ = np.linalg.qr(random_matrix(4, M, 3))
  b, _ = np.linalg.qr(random_matrix(5, M, 5))
  want = np.linalg.norm(a.T @ b) ** 2 / 3
  close(analysis.subspace_similarity(a, b), want)
  # The mean squared cosine of the principal angles.
  cosines = np.linalg.svd(a.T @ b, compute_uv=False)
  close(analysis.subspace_similarity(a, b), np.mean(cosines**2))


@pytest.mark.parametrize('side', ['left', 'right'])
def test_similarity_curve_matches_a_float64_loop(side):
  w, delta, r = random_matrix(6), random_matrix(7), 5
  u_w, _, v_w = svd64(w)
  u_d, _, v_d = svd64(delta)
  base, top = (u_w, u_d[:, :r]) if side == 'left' else (v_w, v_d[:, :r])
  want = [np.linalg.norm(base[:, :k].T @ top) ** 2 / min(k, r) for k in range(1, N + 1)]
  close(analysis.similarity_curve(w, delta, r, side), want)


def test_similarity_curve_of_an_update_inside_the_top_subspace():
  w, r = random_matrix(8), 4
  delta = inside_top(w, r, seed=9)
  for side in ('left', 'right'):
    curve = np.asarray(analysis.similarity_curve(w, delta, r, side))
    # k ≥ r: span U_ΔW,r ⊆ span U_W,k; k < r: span U_W,k ⊆ span U_ΔW,r.
    close(curve, 1.0)
  # Orthogonal to W's top-r: a ΔW on W's directions r+1..2r scores 0 below k = r.
  u, _, v = svd64(w)
  outside = u[:, r : 2 * r] @ v[:, r : 2 * r].T
  close(analysis.similarity_curve(w, outside, r)[:r], 0.0, atol=1e-6)
  close(analysis.similarity_curve(w, outside, r)[2 * r - 1], 1.0)


def test_similarity_of_random_subspaces_is_max_k_r_over_dim():
  w, r, dim = random_matrix(10, 32, 32), 4, 32
  curves = [
    analysis.similarity_curve(w, random_matrix(100 + seed, 32, 32), r)
    for seed in range(200)
  ]
  ks = np.arange(1, dim + 1)
  want = analysis.expected_random_similarity(dim, r, ks)
  close(want, np.maximum(ks, r) / dim)
  close(np.mean(curves, axis=0), want, atol=0.03)


def test_random_orthonormal_is_orthonormal_and_isotropic():
  q = analysis.random_orthonormal(jax.random.key(0), 12, 3)
  close(q.T @ q, np.eye(3), atol=1e-6)
  keys = jax.random.split(jax.random.key(1), 2000)
  mean = np.mean(
    [
      np.asarray(q @ q.T)
      for q in jax.vmap(lambda k: analysis.random_orthonormal(k, 6, 2))(keys)
    ],
    axis=0,
  )
  close(mean, np.eye(6) * 2 / 6, atol=0.03)


def test_projected_norm_and_amplification_match_float64():
  w, delta, r = random_matrix(11), random_matrix(12), 3
  u, sigma, v = svd64(w)
  close(analysis.projected_norm(w, u[:, :r], v[:, :r]), np.sqrt(np.sum(sigma[:r] ** 2)))
  u_d, _, v_d = svd64(delta)
  inside = np.linalg.norm(u_d[:, :r].T @ w @ v_d[:, :r])
  got = analysis.amplification(w, delta, r)
  close(got.delta_norm, np.linalg.norm(delta))
  close(got.projected_norm, inside)
  close(got.factor, np.linalg.norm(delta) / inside)


def test_amplification_of_a_scaled_top_part_of_w():
  # ΔW = c · U_r Σ_r V_rᵀ: its top-r directions are W's, ‖U_rᵀ W V_r‖ = ‖σ_r‖.
  w, r, c = random_matrix(13), 3, 0.1
  u, sigma, v = svd64(w)
  got = analysis.amplification(w, c * (u[:, :r] * sigma[:r]) @ v[:, :r].T, r)
  close(got.projected_norm, np.linalg.norm(sigma[:r]))
  close(got.factor, c)


@pytest.mark.parametrize('side', ['left', 'right', 'both'])
def test_split_is_an_orthogonal_decomposition(side):
  w, delta, k = random_matrix(14), random_matrix(15), 5
  inside, outside = analysis.split(w, delta, k, side)
  close(inside + outside, delta)
  close(np.sum(np.asarray(inside) * np.asarray(outside)), 0.0, atol=1e-4)
  u, _, v = svd64(w)
  p, q = u[:, :k] @ u[:, :k].T, v[:, :k] @ v[:, :k].T
  want = {'left': p @ delta, 'right': delta @ q, 'both': p @ delta @ q}[side]
  close(inside, want)
  share = np.sum(np.asarray(inside, np.float64) ** 2) / np.sum(delta**2)
  close(analysis.projection_shares(w, delta, side)[k - 1], share)


@pytest.mark.parametrize('side', ['left', 'right', 'both'])
def test_projection_shares_match_float64(side):
  w, delta = random_matrix(16), random_matrix(17)
  u, _, v = svd64(w)
  total = np.sum(delta**2)
  want = []
  for k in range(1, N + 1):
    p, q = u[:, :k] @ u[:, :k].T, v[:, :k] @ v[:, :k].T
    part = {'left': p @ delta, 'right': delta @ q, 'both': p @ delta @ q}[side]
    want.append(np.sum(part**2) / total)
  got = np.asarray(analysis.projection_shares(w, delta, side))
  assert got.shape == (N,)
  close(got, want)
  assert np.all(np.diff(got) >= -1e-6)


@pytest.mark.parametrize('side', ['left', 'right', 'both'])
def test_an_update_inside_the_top_k_subspace_has_share_one(side):
  w, k = random_matrix(18), 4
  shares = np.asarray(analysis.projection_shares(w, inside_top(w, k, 19), side))
  close(shares[k - 1 :], 1.0)
  assert shares[k - 2] < 1.0 - 1e-3


@pytest.mark.parametrize('side', ['left', 'right', 'both'])
def test_an_update_proportional_to_w_has_the_energy_share_of_w(side):
  w = random_matrix(20)
  sigma = svd64(w)[1]
  want = np.cumsum(sigma**2) / np.sum(sigma**2)
  close(analysis.projection_shares(w, -0.3 * w, side), want)


def test_a_random_update_has_share_k_over_d():
  dim = 32
  w = random_matrix(21, dim, dim)
  for side in ('left', 'right', 'both'):
    shares = np.mean(
      [
        analysis.projection_shares(w, random_matrix(200 + s, dim, dim), side)
        for s in range(100)
      ],
      axis=0,
    )
    want = analysis.expected_random_shares(dim, dim, side)
    k = np.arange(1, dim + 1)
    close(want, {'left': k / dim, 'right': k / dim, 'both': k**2 / dim**2}[side])
    close(shares, want, atol=0.02)


def test_shares_of_a_rectangular_update_outside_the_column_space():
  # W: (24, 16) has a 16-dimensional column space: a random ΔW keeps ≈ 16/24
  # of its energy there (left share at k = p), all in its 16-dim row space.
  w = random_matrix(22)
  left = np.mean(
    [
      analysis.projection_shares(w, random_matrix(300 + s), 'left')[-1]
      for s in range(50)
    ]
  )
  close(left, N / M, atol=0.02)
  close(analysis.projection_shares(w, random_matrix(23), 'right')[-1], 1.0)
  close(analysis.expected_random_shares(M, N, 'left')[-1], N / M)
  close(analysis.expected_random_shares(M, N, 'right')[-1], 1.0)


def test_zero_update_has_zero_shares():
  w = random_matrix(24)
  np.testing.assert_array_equal(analysis.projection_shares(w, np.zeros((M, N))), 0.0)


def test_an_svd_stands_in_for_its_matrix():
  w, delta, r = random_matrix(26), random_matrix(27), 4
  w_svd, delta_svd = analysis.svd(w), analysis.svd(delta)
  assert isinstance(w_svd, analysis.Svd) and w_svd.shape == (M, N)
  same = lambda got, want: close(got, want, atol=1e-4)
  for a, b in [(w_svd, delta), (w, delta_svd), (w_svd, delta_svd)]:
    for side in ('left', 'right'):
      same(
        analysis.similarity_curve(a, b, r, side),
        analysis.similarity_curve(w, delta, r, side),
      )
    for side in analysis.SIDES:
      same(
        analysis.projection_shares(a, b, side),
        analysis.projection_shares(w, delta, side),
      )
      for got, want in zip(
        analysis.split(a, b, r, side), analysis.split(w, delta, r, side), strict=True
      ):
        same(got, want)
    for got, want in zip(
      analysis.amplification(a, b, r), analysis.amplification(w, delta, r), strict=True
    ):
      same(got, want)
  same(analysis.spectrum(delta_svd, True), analysis.spectrum(delta, True))
  assert int(analysis.numerical_rank(delta_svd)) == N
  same(analysis.rank_tolerance(delta_svd), analysis.rank_tolerance(delta))
  u, _, v = analysis.top_singular(w_svd, r)
  same(analysis.projected_norm(w_svd, u, v), analysis.projected_norm(w, u, v))
  with pytest.raises(pj.PeftError, match='expected the same shape'):
    analysis.projection_shares(w_svd, analysis.svd(w.T))


def test_bad_input_is_a_one_line_error():
  w = random_matrix(25)
  with pytest.raises(pj.PeftError, match="side='up' is not one of"):
    analysis.projection_shares(w, w, 'up')
  with pytest.raises(pj.PeftError, match='expected the same shape'):
    analysis.projection_shares(w, w.T)
  with pytest.raises(pj.PeftError, match=r'r=17 must be an int in \[1, min'):
    analysis.similarity_curve(w, w, 17)
  with pytest.raises(pj.PeftError, match="side='left' or 'right'"):
    analysis.similarity_curve(w, w, 2, 'both')
  with pytest.raises(pj.PeftError, match='must be a matrix'):
    analysis.spectrum(np.ones(3))
  with pytest.raises(pj.PeftError, match='same R'):
    analysis.subspace_similarity(np.eye(3), np.eye(4))


def test_update_rank_counts_what_rounding_cannot_explain():
  rng = np.random.default_rng(0)
  w = rng.normal(0, 0.05, (3, 64, 96)).astype(np.float32)  # 3 stacked layers
  for scale in (1e-2, 1e-5):
    low = rng.normal(0, scale, (3, 64, 5)) @ rng.normal(0, 1, (3, 5, 96))
    low[1] = 0  # a layer unchanged; another of rank 2
    low[2] = low[2] @ np.diag(np.r_[np.ones(2), np.zeros(94)])
    assert analysis.update_rank((w + low).astype(np.float32), w) == 5
  full = (w + rng.normal(0, 1e-3, w.shape)).astype(np.float32)
  assert analysis.update_rank(full, w) == 64
  # float32 rounding of w + tiny noise below eps·‖w‖_F is not an update.
  tiny = (w + rng.normal(0, 1e-12, w.shape)).astype(np.float32)
  assert analysis.update_rank(tiny, w) == 0
