"""The factored form of additive methods computes in the activation dtype."""

import jax
import jax.numpy as jnp
import numpy as np

import peft_jax as pj
from peft_jax._src import additive

D_IN, D_OUT, RANK, ALPHA = 48, 40, 4, 8


def lora_case(dtype):
  """Frozen ``w`` and input ``x`` in ``dtype``; LoRA params in float32 with a
  nonzero ``b`` (so the branch matters)."""
  keys = jax.random.split(jax.random.key(0), 4)
  w = jax.random.normal(keys[0], (D_IN, D_OUT)).astype(dtype)
  x = jax.random.normal(keys[1], (6, D_IN)).astype(dtype)
  adapter = pj.lora(rank=RANK, alpha=ALPHA)
  params, buffers = adapter.init(keys[2], w)
  params = params._replace(b=jax.random.normal(keys[3], params.b.shape))
  return adapter, w, x, params, buffers


def reference(x, w, a, b) -> np.ndarray:
  """``x @ w + (α/r)·(x @ a) @ b`` in float64 NumPy."""
  x, w, a, b = (np.asarray(v, np.float64) for v in (x, w, a, b))
  return x @ w + ALPHA / RANK * (x @ a) @ b


def dot_dtypes(fn, *args) -> set:
  jaxpr = jax.make_jaxpr(fn)(*args)
  return {
    str(eqn.outvars[0].aval.dtype)
    for eqn in jaxpr.eqns
    if eqn.primitive.name == 'dot_general'
  }


def test_bfloat16_activations_keep_the_branch_in_bfloat16():
  adapter, w, x, params, buffers = lora_case(jnp.bfloat16)
  assert params.a.dtype == jnp.float32
  factored = adapter.linear.factored
  y = factored(x, w, params, buffers)
  assert y.dtype == jnp.bfloat16
  # Every matmul, the rank-r ones included, runs on bfloat16 operands.
  assert dot_dtypes(factored, x, w, params, buffers) == {'bfloat16'}
  want = reference(x, w, params.a, params.b)
  np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=0.05, atol=0.2)


def test_the_gradient_reaches_float32_params_through_the_cast():
  adapter, w, x, params, buffers = lora_case(jnp.bfloat16)

  def loss(p):
    return jnp.sum(adapter.linear.factored(x, w, p, buffers).astype(jnp.float32))

  grads = jax.grad(loss)(params)
  assert grads.a.dtype == grads.b.dtype == jnp.float32
  # d/db of Σ s·(x a) b = s·(x a)ᵀ 1, d/da = s·xᵀ 1 bᵀ: float64 from the formula.
  xa = np.asarray(x, np.float64) @ np.asarray(params.a, np.float64)
  ones = np.ones((x.shape[0], D_OUT))
  want_b = ALPHA / RANK * xa.T @ ones
  want_a = ALPHA / RANK * np.asarray(x, np.float64).T @ ones @ np.asarray(params.b).T
  np.testing.assert_allclose(grads.b, want_b, rtol=0.05, atol=0.5)
  np.testing.assert_allclose(grads.a, want_a, rtol=0.05, atol=0.5)


def test_float32_is_the_plain_formula():
  adapter, w, x, params, buffers = lora_case(jnp.float32)
  factored = adapter.linear.factored
  assert dot_dtypes(factored, x, w, params, buffers) == {'float32'}
  y = factored(x, w, params, buffers)
  np.testing.assert_allclose(
    y, reference(x, w, params.a, params.b), rtol=1e-5, atol=1e-4
  )


def test_in_dtype_casts_floating_leaves_only():
  tree = {'a': jnp.ones(2, jnp.float32), 'mask': jnp.ones(2, jnp.int32), 'n': 3}
  cast = additive.in_dtype(tree, jnp.bfloat16)
  assert cast['a'].dtype == jnp.bfloat16 and cast['mask'].dtype == jnp.int32
  assert cast['n'] == 3
