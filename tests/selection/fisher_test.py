"""``selection.fisher`` against NumPy per-example gradients of softmax regression."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax import PeftError, selection

D, C = 5, 3


def model(seed):
  rng = np.random.default_rng(seed)
  frozen = {
    'head': {
      'kernel': rng.normal(size=(D, C)).astype(np.float32),
      'bias': rng.normal(size=C).astype(np.float32),
    },
    'vocab': np.arange(4, dtype=np.int32),
  }
  batches = [
    {
      'x': rng.normal(size=(n, D)).astype(np.float32),
      'y': rng.integers(0, C, n).astype(np.int32),
    }
    for n in (4, 4, 6)
  ]
  return jax.tree.map(jnp.asarray, frozen), batches


def loss_fn(weights, batch, rng):
  del rng
  logits = batch['x'] @ weights['head']['kernel'] + weights['head']['bias']
  log_p = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_p, batch['y'][:, None], 1)), {}


def reference(frozen, batches):
  """``mean_n (∂ℓ_n/∂θ)²``, with ``∂ℓ/∂z = softmax(z) − onehot(y)`` and
  ``∂ℓ/∂W = x ⊗ ∂ℓ/∂z``."""
  w = np.asarray(frozen['head']['kernel'], np.float64)
  b = np.asarray(frozen['head']['bias'], np.float64)
  sq_w, sq_b, n = np.zeros((D, C)), np.zeros(C), 0
  for batch in batches:
    for x, y in zip(batch['x'].astype(np.float64), batch['y'], strict=True):
      z = x @ w + b
      dz = np.exp(z - z.max()) / np.exp(z - z.max()).sum() - np.eye(C)[y]
      sq_w += np.outer(x, dz) ** 2
      sq_b += dz**2
      n += 1
  return sq_w / n, sq_b / n


def test_fisher_is_the_mean_squared_per_example_gradient():
  frozen, batches = model(0)
  scores = selection.fisher(loss_fn, frozen, batches, progress=False)
  assert set(scores) == {'head'}  # the int leaf is not scored
  want_w, want_b = reference(frozen, batches)
  np.testing.assert_allclose(scores['head']['kernel'], want_w, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(scores['head']['bias'], want_b, rtol=1e-5, atol=1e-7)
  # Not the square of the summed (or mean) batch gradient: that is SAM's.
  sam = selection.sam(loss_fn, frozen, batches, progress=False)
  assert not np.allclose(sam['head']['bias'], scores['head']['bias'], rtol=0.1)
  mask = selection.top_p(scores, 0.5, scope='per_leaf')
  assert selection.count(mask) == (D * C) // 2 + C // 2


def test_fisher_where_and_num_batches():
  frozen, batches = model(1)
  scores = selection.fisher(
    loss_fn, frozen, iter(batches), where='.*/kernel', num_batches=2, progress=False
  )
  want_w, _ = reference(frozen, batches[:2])
  assert set(scores['head']) == {'kernel'}
  np.testing.assert_allclose(scores['head']['kernel'], want_w, rtol=1e-5, atol=1e-7)


def test_fisher_traces_once_per_batch_shape():
  frozen, batches = model(2)
  calls = []

  def counting(weights, batch, rng):
    calls.append(1)
    return loss_fn(weights, batch, rng)

  counts = []
  for n in (1, 2):  # two batches of size 4 share one trace
    calls.clear()
    selection.fisher(counting, frozen, batches[:n], progress=False)
    counts.append(len(calls))
  assert counts[0] == counts[1] >= 1


def test_fisher_errors():
  frozen, batches = model(3)
  ragged = [{'x': batches[0]['x'], 'y': batches[0]['y'][:2]}]
  with pytest.raises(PeftError, match=r'leading sizes \[2, 4\]'):
    selection.fisher(loss_fn, frozen, ragged, progress=False)
  ignoring = lambda w, b, r: (jnp.sum(b['x']), {})
  with pytest.raises(PeftError, match='gradient is zero on every scored leaf'):
    selection.fisher(ignoring, frozen, batches, progress=False)
