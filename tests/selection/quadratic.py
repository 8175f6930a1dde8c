"""A quadratic loss with known gradient and Hessian, for the selection tests.

``L(θ; c) = Σ_leaves ½ (θ_l − c_l)ᵀ H_l (θ_l − c_l)`` over the flattened
leaves, ``c`` the batch: ``∇L = H_l (θ_l − c_l)`` and ``∇²L = blockdiag(H_l)``.
References are NumPy float64.
"""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from peft_jax._src import paths

SHAPES = {'dense/kernel': (3, 4), 'dense/bias': (4,), 'conv/w': (2, 2, 2)}


def leaf(tree, name):
  for key in name.split('/'):
    tree = tree[key]
  return tree


class Problem(NamedTuple):
  theta: dict[str, np.ndarray]  # float64 θ0 per leaf name
  hessians: dict[str, np.ndarray]  # float64 (n, n) per leaf name
  batches: list[dict[str, np.ndarray]]  # float32 c per leaf name

  @property
  def frozen(self):
    """θ0 as a nested float32 tree, plus an int leaf that is never scored."""
    flat = {n: jnp.asarray(t, jnp.float32) for n, t in self.theta.items()}
    return paths.nest({**flat, 'step': jnp.array(7, jnp.int32)})

  def loss_fn(self, weights, batch, rng):
    del rng
    total = 0.0
    for name, h in self.hessians.items():
      d = jnp.ravel(leaf(weights, name) - batch[name])
      total = total + 0.5 * d @ jnp.asarray(h, jnp.float32) @ d
    return total, {}

  def gradient(self, batch):
    """``{name: H (θ − c)}`` in float64, shaped like each leaf."""
    return {
      name: (h @ np.ravel(self.theta[name] - batch[name])).reshape(SHAPES[name])
      for name, h in self.hessians.items()
    }


def spd(rng, n, diagonal):
  if diagonal:
    return np.diag(rng.uniform(0.5, 3.0, n))
  a = rng.normal(size=(n, n))
  return a @ a.T / n + 0.5 * np.eye(n)


def problem(seed, num_batches=3, diagonal=True, hessians=None):
  rng = np.random.default_rng(seed)
  theta = {n: rng.normal(size=s) for n, s in SHAPES.items()}
  if hessians is None:
    hessians = {n: spd(rng, int(np.prod(s)), diagonal) for n, s in SHAPES.items()}
  batches = [
    {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
    for _ in range(num_batches)
  ]
  # θ0 is float32 in the model: keep the reference on the same grid.
  theta = {n: t.astype(np.float32).astype(np.float64) for n, t in theta.items()}
  return Problem(theta, hessians, batches)


def top_k_reference(scores, k):
  """``{name: mask}`` of the ``k`` largest entries over all leaves (no ties)."""
  joined = np.concatenate([np.ravel(s) for s in scores.values()])
  threshold = np.sort(joined)[::-1][k - 1]
  return {name: s >= threshold for name, s in scores.items()}


def flat_mask(mask):
  return {name: np.asarray(leaf(mask, name)) for name in SHAPES}
