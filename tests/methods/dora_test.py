"""DoRA against the spec's exact forward (§3.1), in the spec's PyTorch layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax.methods import dora

D_IN, D_OUT, RANK, ALPHA = 9, 6, 3, 5.0


def random_theta(seed, d_in=D_IN, d_out=D_OUT, rank=RANK):
  rng = np.random.default_rng(seed)
  return {
    'a': rng.normal(size=(d_in, rank)),
    'b': rng.normal(size=(rank, d_out)),
    'm': rng.uniform(0.5, 2.0, size=d_out),
  }


def spec_forward(w, theta, alpha=ALPHA, rank=RANK):
  """``W' = diag(m ⊘ ‖W + sBA‖_row) · (W + sBA)``, float64, PyTorch layout."""
  W, A, B = (np.float64(t).T for t in (w, theta['a'], theta['b']))
  V = W + alpha / rank * B @ A
  return np.diag(theta['m'] / np.linalg.norm(V, axis=1)) @ V


def as_f32(theta):
  return {k: jnp.float32(v) for k, v in theta.items()}


@pytest.mark.parametrize('shape', [(D_IN, D_OUT), (D_OUT, D_IN)])
def test_apply_and_factored_match_the_spec(shape):
  w = np.random.default_rng(0).normal(size=shape)
  theta = random_theta(1, *shape)
  expected = spec_forward(w, theta)
  adapter = dora.dora(rank=RANK, alpha=ALPHA)
  np.testing.assert_allclose(
    adapter.apply(jnp.float32(w), as_f32(theta)).T, expected, rtol=1e-5, atol=1e-5
  )
  x = np.random.default_rng(2).normal(size=(4, shape[0]))
  np.testing.assert_allclose(
    adapter.factored(jnp.float32(x), jnp.float32(w), as_f32(theta)),
    x @ expected.T,
    rtol=1e-4,
    atol=1e-4,
  )
  # Every output unit (row of W') has norm m.
  np.testing.assert_allclose(np.linalg.norm(expected, axis=1), theta['m'], rtol=1e-12)


def test_gradients_treat_the_norm_as_a_constant():
  """The ``dora_simple`` stop-gradient: for ``L = Σ G ⊙ W'`` with
  ``c = m ⊘ n`` held fixed, ``dL/dm = Σ_i G ⊙ V / n``,
  ``dL/dB = s·diag(c) G Aᵀ`` and ``dL/dA = s·Bᵀ diag(c) G``."""
  w = np.random.default_rng(0).normal(size=(D_IN, D_OUT))
  theta = random_theta(1)
  G = np.random.default_rng(3).normal(size=(D_OUT, D_IN))
  W, A, B, s = np.float64(w).T, theta['a'].T, theta['b'].T, ALPHA / RANK
  V = W + s * B @ A
  n = np.linalg.norm(V, axis=1)
  c = theta['m'] / n
  expected = {
    'm': np.sum(G * V, axis=1) / n,
    'b': (s * np.diag(c) @ G @ A.T).T,
    'a': (s * B.T @ np.diag(c) @ G).T,
  }
  adapter = dora.dora(rank=RANK, alpha=ALPHA)
  loss = lambda t: jnp.sum(adapter.apply(jnp.float32(w), t) * jnp.float32(G.T))
  grads = jax.grad(loss)(as_f32(theta))
  for name, value in expected.items():
    np.testing.assert_allclose(grads[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


def test_init_is_lora_init_with_magnitude_of_w_and_exact_identity():
  w = np.random.default_rng(0).normal(size=(512, 64)).astype(np.float32)
  adapter = dora.dora(rank=16)
  theta = adapter.init(jax.random.key(0), w)
  bound = 1 / np.sqrt(512)
  assert theta['a'].shape == (512, 16) and theta['b'].shape == (16, 64)
  assert np.all(np.abs(theta['a']) <= bound) and np.abs(theta['a']).max() > 0.95 * bound
  np.testing.assert_array_equal(theta['b'], 0)
  # m = the row norms of W (one per output unit) = the column norms of w.
  np.testing.assert_allclose(theta['m'], np.linalg.norm(np.float64(w).T, axis=1), 1e-6)
  np.testing.assert_array_equal(adapter.apply(w, theta), w)
  x = np.ones((2, 512), np.float32)
  np.testing.assert_array_equal(adapter.factored(x, w, theta), x @ w)
  assert pj.count(theta) == adapter.num_params(w.shape) == 16 * (512 + 64) + 64
  down, up = adapter.factors(theta)
  assert down is theta['a'] and up is theta['b']
  assert adapter.unapply is None  # the norms of w + s·a@b are not recoverable


def test_bf16_kernel_float32_params_exact_identity():
  w = jnp.asarray(np.random.default_rng(0).normal(size=(D_IN, D_OUT)), jnp.bfloat16)
  adapter = dora.dora(rank=2)
  theta = adapter.init(jax.random.key(0), w)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(theta))
  out = adapter.apply(w, theta)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.float32(out), np.float32(w))


def test_magnitude_is_trained_from_step_0():
  """loralib's DoRA re-created m lazily, so it was never trained (§3.2.1)."""
  w = jnp.asarray(np.random.default_rng(0).normal(size=(D_IN, D_OUT)), jnp.float32)
  adapter = dora.dora(rank=2)
  theta = adapter.init(jax.random.key(0), w)
  x = jax.random.normal(jax.random.key(1), (4, D_IN))
  probe = jax.random.normal(jax.random.key(2), (4, D_OUT))
  grads = jax.grad(lambda t: jnp.sum(jnp.sin(adapter.factored(x, w, t)) * probe))(theta)
  assert np.all(np.abs(np.asarray(grads['m'])) > 1e-6)
  assert np.any(np.asarray(grads['b']) != 0)


def test_a_zero_output_column_stays_zero_without_nan():
  w = np.random.default_rng(0).normal(size=(D_IN, D_OUT)).astype(np.float32)
  w[:, 2] = 0
  adapter = dora.dora(rank=2)
  theta = adapter.init(jax.random.key(0), w)
  out = np.asarray(adapter.apply(w, theta))
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out, w)


def test_normal_a_init():
  theta = dora.dora(rank=16, a_init='normal').init(
    jax.random.key(0), jnp.ones((1024, 64))
  )
  np.testing.assert_allclose(
    np.std(np.asarray(theta['a'], np.float64)), 0.02, rtol=0.03
  )


@pytest.mark.parametrize(
  'kwargs,leaf_shape,message',
  [
    ({'rank': 0}, (4, 4), 'dora: rank=0 must be > 0'),
    ({'rank': 2.5}, (4, 4), 'must be an int'),
    ({'rank': 5}, (8, 4), 'dora: rank=5 exceeds min(d_in, d_out)=4'),
    ({'alpha': 'big'}, (4, 4), "alpha='big' must be a number"),
    ({'a_init': 'xavier'}, (4, 4), "a_init='xavier' is not one of"),
    ({'param_dtype': 'int8'}, (4, 4), 'not a floating dtype'),
    ({'rank': 2}, (4, 4, 4), 'dora expects a 2-D kernel'),
  ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, leaf_shape, message):
  with pytest.raises(
    pj.PeftError, match=message.replace('(', r'\(').replace(')', r'\)')
  ):
    dora.dora(**kwargs).init(jax.random.key(0), jnp.ones(leaf_shape))
