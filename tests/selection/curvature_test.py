"""The curvature helpers behind ``sam``: Hutchinson and power iteration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax._src import selection


def quadratic_grad(hessian):
  """``grad_fn`` of ``½ θᵀ H θ`` over a one-leaf flat dict: ``θ ↦ Hθ``."""
  h = jnp.asarray(hessian, jnp.float32)
  loss = lambda chosen: 0.5 * chosen['w'] @ h @ chosen['w']
  return jax.grad(loss)


def test_hutchinson_error_shrinks_with_samples():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(6, 6))
  hessian = a @ a.T / 6 + np.eye(6)
  chosen = {'w': jnp.asarray(rng.normal(size=6), jnp.float32)}
  grad_fn = quadratic_grad(hessian)
  errors = {}
  for k in (4, 4000):
    estimate = selection.hutchinson_diagonal(grad_fn, chosen, jax.random.key(1), k)
    errors[k] = np.abs(np.asarray(estimate['w']) - np.diag(hessian))
  sigma = np.sqrt((np.sum(hessian**2, 1) - np.diag(hessian) ** 2) / 4000)
  assert np.all(errors[4000] < 5 * sigma + 1e-5)
  assert errors[4000].max() < errors[4].max() / 5


def test_lambda_max_is_the_largest_magnitude_eigenvalue():
  rng = np.random.default_rng(2)
  q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
  hessian = q @ np.diag([-4.0, 1.0, 0.5, 2.0, -1.0]) @ q.T  # not PSD
  chosen = {'w': jnp.zeros(5)}
  lam = selection.lambda_max(quadratic_grad(hessian), chosen, jax.random.key(3), 30)
  assert float(lam) == pytest.approx(4.0, rel=1e-4)
  zero = selection.lambda_max(
    quadratic_grad(np.zeros((5, 5))), chosen, jax.random.key(3), 3
  )
  assert float(zero) == 0.0


def test_random_like_shapes_and_independence():
  chosen = {'a': jnp.zeros((2, 3)), 'b': jnp.zeros(4, jnp.bfloat16)}
  draws = selection.random_like(jax.random.rademacher, jax.random.key(0), chosen)
  assert draws['a'].shape == (2, 3) and draws['b'].shape == (4,)
  assert draws['b'].dtype == jnp.float32
  values = np.concatenate([np.ravel(d) for d in draws.values()])
  assert set(values.tolist()) == {-1.0, 1.0}
