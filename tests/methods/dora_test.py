"""DoRA against the spec's exact forward (§3.1), in the spec's PyTorch layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax.methods import dora
from peft_jax.methods.dora import DoraParams

D_IN, D_OUT, RANK, ALPHA = 9, 6, 3, 5.0


def random_params(seed, d_in=D_IN, d_out=D_OUT, rank=RANK):
  """Float64 ``DoraParams`` (NumPy), for the references."""
  rng = np.random.default_rng(seed)
  return DoraParams(
    a=rng.normal(size=(d_in, rank)),
    b=rng.normal(size=(rank, d_out)),
    m=rng.uniform(0.5, 2.0, size=d_out),
  )


def spec_forward(w, params, alpha=ALPHA, rank=RANK):
  """``W' = diag(m ⊘ ‖W + sBA‖_row) · (W + sBA)``, float64, PyTorch layout."""
  W, A, B = (np.float64(t).T for t in (w, params.a, params.b))
  V = W + alpha / rank * B @ A
  return np.diag(params.m / np.linalg.norm(V, axis=1)) @ V


def as_f32(params):
  return jax.tree.map(jnp.float32, params)


@pytest.mark.parametrize('shape', [(D_IN, D_OUT), (D_OUT, D_IN)])
def test_apply_and_factored_match_the_spec(shape):
  w = np.random.default_rng(0).normal(size=shape)
  params = random_params(1, *shape)
  expected = spec_forward(w, params)
  adapter = dora.dora(rank=RANK, alpha=ALPHA)
  np.testing.assert_allclose(
    adapter.apply(jnp.float32(w), as_f32(params), None).T,
    expected,
    rtol=1e-5,
    atol=1e-5,
  )
  x = np.random.default_rng(2).normal(size=(4, shape[0]))
  np.testing.assert_allclose(
    adapter.linear.factored(jnp.float32(x), jnp.float32(w), as_f32(params), None),
    x @ expected.T,
    rtol=1e-4,
    atol=1e-4,
  )
  # Every output unit (row of W') has norm m.
  np.testing.assert_allclose(np.linalg.norm(expected, axis=1), params.m, rtol=1e-12)


def test_gradients_treat_the_norm_as_a_constant():
  """The ``dora_simple`` stop-gradient: for ``L = Σ G ⊙ W'`` with
  ``c = m ⊘ n`` held fixed, ``dL/dm = Σ_i G ⊙ V / n``,
  ``dL/dB = s·diag(c) G Aᵀ`` and ``dL/dA = s·Bᵀ diag(c) G``."""
  w = np.random.default_rng(0).normal(size=(D_IN, D_OUT))
  params = random_params(1)
  G = np.random.default_rng(3).normal(size=(D_OUT, D_IN))
  W, A, B, s = np.float64(w).T, params.a.T, params.b.T, ALPHA / RANK
  V = W + s * B @ A
  n = np.linalg.norm(V, axis=1)
  c = params.m / n
  expected = DoraParams(
    m=np.sum(G * V, axis=1) / n,
    b=(s * np.diag(c) @ G @ A.T).T,
    a=(s * B.T @ np.diag(c) @ G).T,
  )
  adapter = dora.dora(rank=RANK, alpha=ALPHA)
  loss = lambda p: jnp.sum(adapter.apply(jnp.float32(w), p, None) * jnp.float32(G.T))
  grads = jax.grad(loss)(as_f32(params))
  for name in DoraParams._fields:
    np.testing.assert_allclose(
      getattr(grads, name),
      getattr(expected, name),
      rtol=1e-4,
      atol=1e-5,
      err_msg=name,
    )


def test_init_is_lora_init_with_magnitude_of_w_and_exact_identity():
  w = np.random.default_rng(0).normal(size=(512, 64)).astype(np.float32)
  adapter = dora.dora(rank=16)
  params, buffers = adapter.init(jax.random.key(0), w)
  assert isinstance(params, DoraParams) and buffers is None
  bound = 1 / np.sqrt(512)
  assert params.a.shape == (512, 16) and params.b.shape == (16, 64)
  assert np.all(np.abs(params.a) <= bound) and np.abs(params.a).max() > 0.95 * bound
  np.testing.assert_array_equal(params.b, 0)
  # m = the row norms of W (one per output unit) = the column norms of w.
  np.testing.assert_allclose(params.m, np.linalg.norm(np.float64(w).T, axis=1), 1e-6)
  np.testing.assert_array_equal(adapter.apply(w, params, buffers), w)
  x = np.ones((2, 512), np.float32)
  np.testing.assert_array_equal(adapter.linear.factored(x, w, params, buffers), x @ w)
  assert pj.count(params) == adapter.num_params(w.shape) == 16 * (512 + 64) + 64
  down, up = adapter.factors(params, buffers)
  assert down is params.a and up is params.b
  assert adapter.unapply is None  # the norms of w + s·a@b are not recoverable


def test_bf16_kernel_float32_params_exact_identity():
  w = jnp.asarray(np.random.default_rng(0).normal(size=(D_IN, D_OUT)), jnp.bfloat16)
  adapter = dora.dora(rank=2)
  params, buffers = adapter.init(jax.random.key(0), w)
  assert all(leaf.dtype == jnp.float32 for leaf in params)
  out = adapter.apply(w, params, buffers)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.float32(out), np.float32(w))
  # The factored output has the result type of x and w, not of the params.
  x = jnp.ones((2, D_IN), jnp.bfloat16)
  assert adapter.linear.factored(x, w, params, buffers).dtype == jnp.bfloat16


def test_magnitude_is_trained_from_step_0():
  """loralib's DoRA re-created m lazily, so it was never trained (§3.2.1)."""
  w = jnp.asarray(np.random.default_rng(0).normal(size=(D_IN, D_OUT)), jnp.float32)
  adapter = dora.dora(rank=2)
  params, buffers = adapter.init(jax.random.key(0), w)
  x = jax.random.normal(jax.random.key(1), (4, D_IN))
  probe = jax.random.normal(jax.random.key(2), (4, D_OUT))
  y = lambda p: adapter.linear.factored(x, w, p, buffers)
  grads = jax.grad(lambda p: jnp.sum(jnp.sin(y(p)) * probe))(params)
  assert np.all(np.abs(np.asarray(grads.m)) > 1e-6)
  assert np.any(np.asarray(grads.b) != 0)


def test_a_zero_output_column_stays_zero_without_nan():
  w = np.random.default_rng(0).normal(size=(D_IN, D_OUT)).astype(np.float32)
  w[:, 2] = 0
  adapter = dora.dora(rank=2)
  params, buffers = adapter.init(jax.random.key(0), w)
  out = np.asarray(adapter.apply(w, params, buffers))
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out, w)


def test_normal_a_init():
  params, _ = dora.dora(rank=16, a_init='normal').init(
    jax.random.key(0), jnp.ones((1024, 64))
  )
  np.testing.assert_allclose(np.std(np.asarray(params.a, np.float64)), 0.02, rtol=0.03)


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
