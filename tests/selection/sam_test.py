"""``selection.sam`` on a quadratic loss whose gradient and Hessian are known."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peft_jax import PeftError, selection
from peft_jax._src import paths
from tests.selection import quadratic
from tests.selection.quadratic import SHAPES, flat_mask, leaf, top_k_reference

M = sum(int(np.prod(s)) for s in SHAPES.values())  # 24 scored entries


def summed_gradient(problem):
  grads = [problem.gradient(b) for b in problem.batches]
  return {name: sum(g[name] for g in grads) for name in SHAPES}


def flat_scores(scores):
  return {name: np.asarray(leaf(scores, name)) for name in SHAPES}


def test_scores_are_the_squared_summed_signed_gradient():
  problem = quadratic.problem(seed=0, num_batches=3)
  scores = selection.sam(
    problem.loss_fn, problem.frozen, problem.batches, progress=False
  )
  want = {n: g**2 for n, g in summed_gradient(problem).items()}
  got = flat_scores(scores)
  assert set(paths.nest(dict.fromkeys(SHAPES))) == set(scores)  # no 'step'
  for name in SHAPES:
    assert got[name].dtype == np.float32
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
  mask = selection.top_p(scores, 0.25)
  k = int(np.floor(0.25 * M))
  assert selection.count(mask) == k == 6
  want_mask = top_k_reference(want, k)
  for name, m in flat_mask(mask).items():
    np.testing.assert_array_equal(m, want_mask[name])


def test_gradients_of_opposite_sign_cancel():
  problem = quadratic.problem(seed=1, num_batches=2)
  theta = dict(problem.theta, **{'dense/bias': np.zeros(4)})
  d = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
  batches = [dict(problem.batches[0]), dict(problem.batches[1])]
  batches[0]['dense/bias'], batches[1]['dense/bias'] = d, -d
  problem = problem._replace(theta=theta, batches=batches)
  scores = flat_scores(
    selection.sam(problem.loss_fn, problem.frozen, batches, progress=False)
  )
  # Each batch's bias gradient is nonzero; their sum is exactly zero.
  assert np.abs(problem.gradient(batches[0])['dense/bias']).min() > 0
  np.testing.assert_array_equal(scores['dense/bias'], 0.0)
  want = summed_gradient(problem)
  np.testing.assert_allclose(scores['dense/kernel'], want['dense/kernel'] ** 2, 1e-5)


def test_clip_norm_clips_each_batch_over_the_scored_leaves():
  problem = quadratic.problem(seed=2, num_batches=3)
  # A batch with c = θ0 - tiny: its gradient norm is below the clip norm.
  problem.batches[1].update(
    {n: (problem.theta[n] - 1e-3).astype(np.float32) for n in SHAPES}
  )
  where = 'dense/.*'
  scores = selection.sam(
    problem.loss_fn,
    problem.frozen,
    problem.batches,
    where=where,
    clip_norm=1.0,
    progress=False,
  )
  assert set(scores) == {'dense'}
  total = {'dense/kernel': 0.0, 'dense/bias': 0.0}
  norms = []
  for batch in problem.batches:
    g = {n: v for n, v in problem.gradient(batch).items() if n in total}
    norm = np.sqrt(sum(np.sum(v**2) for v in g.values()))
    norms.append(norm)
    for n in total:
      total[n] = total[n] + g[n] * min(1.0, 1.0 / norm)
  assert norms[1] < 1.0 < min(norms[0], norms[2])
  for n, t in total.items():
    np.testing.assert_allclose(np.asarray(leaf(scores, n)), t**2, rtol=1e-4)


def test_batch_t_gets_fold_in_rng_t():
  frozen = {'w': jnp.array([0.5, -1.0, 2.0])}
  batches = [jnp.array([1.0, 2.0, 3.0]), jnp.array([-1.0, 0.0, 4.0])]

  def loss_fn(weights, c, rng):
    noise = jax.random.normal(rng, (3,))
    return 0.5 * jnp.sum((weights['w'] - c) ** 2) + weights['w'] @ noise, {}

  rng = jax.random.key(3)
  scores = selection.sam(loss_fn, frozen, batches, rng=rng, progress=False)
  theta = np.asarray(frozen['w'], np.float64)
  g = sum(
    theta
    - np.asarray(c)
    + np.asarray(jax.random.normal(jax.random.fold_in(rng, t), (3,)))
    for t, c in enumerate(batches)
  )
  np.testing.assert_allclose(np.asarray(scores['w']), g**2, rtol=1e-5)


def test_num_batches_takes_the_first_batches_of_an_endless_stream():
  problem = quadratic.problem(seed=4, num_batches=2)
  stream = itertools.cycle(problem.batches)
  scores = selection.sam(
    problem.loss_fn, problem.frozen, stream, num_batches=2, progress=False
  )
  want = summed_gradient(problem)
  for name, s in flat_scores(scores).items():
    np.testing.assert_allclose(s, want[name] ** 2, rtol=1e-5, atol=1e-6)


def test_hutchinson_is_exact_for_a_diagonal_hessian():
  # v ⊙ (H v) = h ⊙ v² = h for every Rademacher v: the estimate is diag(H).
  problem = quadratic.problem(seed=5, num_batches=3, diagonal=True)
  scores = selection.sam(
    problem.loss_fn,
    problem.frozen,
    problem.batches,
    curvature='hutchinson',
    hutchinson_samples=3,
    eps=1e-8,
    progress=False,
  )
  g = summed_gradient(problem)
  want = {
    n: g[n] ** 2 / (np.diag(h).reshape(SHAPES[n]) + 1e-8)
    for n, h in problem.hessians.items()
  }
  for name, s in flat_scores(scores).items():
    np.testing.assert_allclose(s, want[name], rtol=1e-5, atol=1e-6)
  k = int(np.floor(0.3 * M))
  want_mask = top_k_reference(want, k)
  for name, m in flat_mask(selection.top_p(scores, 0.3)).items():
    np.testing.assert_array_equal(m, want_mask[name])


def test_hutchinson_estimates_a_full_hessian_diagonal():
  problem = quadratic.problem(seed=6, num_batches=2, diagonal=False)
  k = 2000
  scores = selection.sam(
    problem.loss_fn,
    problem.frozen,
    problem.batches,
    curvature='hutchinson',
    hutchinson_samples=k,
    eps=1e-8,
    progress=False,
  )
  g = summed_gradient(problem)
  for name, h in problem.hessians.items():
    estimate = np.ravel(g[name] ** 2) / np.ravel(flat_scores(scores)[name]) - 1e-8
    # Var[v_i (Hv)_i] = Σ_{j≠i} H_ij², over k probes in each of 2 batches.
    sigma = np.sqrt((np.sum(h**2, 1) - np.diag(h) ** 2) / (2 * k))
    assert np.all(np.abs(estimate - np.diag(h)) < 5 * sigma + 1e-4), name


def test_lambda_max_rescales_none_and_keeps_its_mask():
  rng = np.random.default_rng(7)
  hessians = {}
  for name, shape in SHAPES.items():
    n = int(np.prod(shape))
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    eigenvalues = rng.uniform(0.5, 2.0, n)
    if name == 'conv/w':
      eigenvalues[3] = 6.0  # The top eigenvalue of the whole block-diagonal H.
    hessians[name] = q @ np.diag(eigenvalues) @ q.T
  problem = quadratic.problem(seed=8, num_batches=3, hessians=hessians)
  run = lambda curvature: selection.sam(
    problem.loss_fn,
    problem.frozen,
    problem.batches,
    curvature=curvature,
    progress=False,
  )
  plain, scaled = flat_scores(run(None)), run('lambda_max')
  lam = max(np.linalg.eigvalsh(h).max() for h in hessians.values())
  assert lam == pytest.approx(6.0)
  g = summed_gradient(problem)
  for name, s in flat_scores(scaled).items():
    np.testing.assert_allclose(s, g[name] ** 2 / lam, rtol=1e-4, atol=1e-6)
  same = flat_mask(selection.top_p(plain, 0.2))
  for name, m in flat_mask(selection.top_p(scaled, 0.2)).items():
    np.testing.assert_array_equal(m, same[name])


def test_one_trace_for_many_batches():
  frozen = {'w': jnp.array([1.0, -2.0])}
  batches = [jnp.array([t, 2.0 * t]) for t in range(4)]
  calls = []

  def counting_loss(weights, c, rng):
    calls.append(1)  # Runs when traced, not when the compiled code runs.
    return jnp.sum((weights['w'] - c) ** 4), {}

  for curvature in (None, 'hutchinson'):
    traced = []
    for n in (1, 4):
      calls.clear()
      selection.sam(
        counting_loss,
        frozen,
        batches[:n],
        curvature=curvature,
        hutchinson_samples=2,
        progress=False,
      )
      traced.append(len(calls))
    assert traced[0] == traced[1] >= 1, (curvature, traced)


def test_progress_bar_goes_to_stderr(capsys):
  problem = quadratic.problem(seed=10, num_batches=2)
  selection.sam(problem.loss_fn, problem.frozen, problem.batches)
  assert '2/2' in capsys.readouterr().err


@pytest.mark.parametrize(
  ('kwargs', 'match'),
  [
    (dict(curvature='foo'), "curvature='foo'"),
    (dict(where='dense/kernal'), "where='dense/kernal' matches no floating leaf"),
    (dict(where=['dense/.*', 'nope']), "where='nope' matches no floating leaf"),
    (dict(where='step'), "where='step' matches no floating leaf"),
    (dict(where='/dense/.*'), 'leading slash'),
    (dict(where='dense/(('), 'is not a regex'),
    (dict(where=lambda n, w: False), 'where=<lambda> matches no'),
    (dict(where=3), 'where=3 must be'),
    (dict(num_batches=5), 'ran out after 2 of num_batches=5'),
    (dict(num_batches=0), 'num_batches=0 must be > 0'),
    (dict(clip_norm=-1.0), 'clip_norm=-1.0 must be > 0'),
    (dict(eps='x'), "eps='x' must be a number"),
    (dict(hutchinson_samples=0), 'hutchinson_samples=0'),
  ],
)
def test_bad_arguments_are_one_line_errors(kwargs, match):
  problem = quadratic.problem(seed=11, num_batches=2)
  with pytest.raises(PeftError, match=match) as error:
    selection.sam(
      problem.loss_fn, problem.frozen, problem.batches, progress=False, **kwargs
    )
  assert '\n' not in str(error.value)


@pytest.mark.parametrize(
  ('loss_fn', 'batches', 'match'),
  [
    (lambda w, b, r: (jnp.sum(b), {}), [jnp.ones(2)], 'gradient is zero'),
    (lambda w, b, r: jnp.sum(w['w'] * b), [jnp.ones(2)], 'expected a pair'),
    (lambda w, b, r: (w['w'] * b, {}), [jnp.ones(2)], 'expected a scalar'),
    (lambda w, b, r: (jnp.sum(w['w'] * b), {}), [], 'batches is empty'),
  ],
)
def test_bad_loss_functions_are_one_line_errors(loss_fn, batches, match):
  frozen = {'w': jnp.ones(2)}
  with pytest.raises(PeftError, match=match) as error:
    selection.sam(loss_fn, frozen, batches, progress=False)
  assert '\n' not in str(error.value)


def test_sam_on_an_nnx_state():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  x = np.random.default_rng(12).normal(size=(4, 3)).astype(np.float32)

  def loss_fn(state, x, rng):
    return jnp.mean(nnx.merge(graphdef, state)(x) ** 2), {}

  scores = selection.sam(loss_fn, state, [jnp.asarray(x)], progress=False)
  w = np.asarray(state['kernel'].get_value(), np.float64)
  b = np.asarray(state['bias'].get_value(), np.float64)
  dy = 2 * (x @ w + b) / 8  # ∂ mean(y²) / ∂y over 4 × 2 outputs
  np.testing.assert_allclose(scores['kernel'], (x.T @ dy) ** 2, rtol=1e-5)
  np.testing.assert_allclose(scores['bias'], dy.sum(0) ** 2, rtol=1e-5)
