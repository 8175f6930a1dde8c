"""AdaLoRA's layer and orthogonality penalty against the spec, in its PyTorch layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax.methods.adalora import AdaLoraParams, adalora
from tests.methods.spec_checks import assert_factored_and_inverse

D_IN, D_OUT = 9, 6


def random_params(seed, rank):
  rng = np.random.default_rng(seed)
  return AdaLoraParams(
    a=rng.normal(size=(D_IN, rank)).astype(np.float32),
    b=rng.normal(size=(rank, D_OUT)).astype(np.float32),
    e=rng.normal(size=rank).astype(np.float32),
  )


@pytest.mark.parametrize(
  'rank,alpha,masked',
  [(1, 1.0, 0), (4, 16.0, 0), (4, 16.0, 2), (3, 0.0, 0), (3, -2.0, 1)],
)
def test_apply_and_factored_match_spec(rank, alpha, masked):
  w = np.random.default_rng(1).normal(size=(D_IN, D_OUT)).astype(np.float32)
  params = random_params(2, rank)
  params.e[:masked] = 0  # A budget mask does not change the scale.
  # Spec: h = W x + (α/(r₀+1e-5))·B diag(e) A x, α ≤ 0 replaced by r₀.
  W, A, B = (np.float64(m).T for m in (w, params.a, params.b))
  s = (alpha if alpha > 0 else rank) / (rank + 1e-5)
  expected = W + s * B @ np.diag(np.float64(params.e)) @ A
  adapter = adalora(rank, alpha)
  np.testing.assert_allclose(
    adapter.apply(w, params, None).T, expected, rtol=1e-5, atol=1e-5
  )
  x = np.random.default_rng(3).normal(size=(5, D_IN))
  assert_factored_and_inverse(adapter, w, params, expected, x)


@pytest.mark.parametrize('std', [0.02, 0.1])
def test_init_is_normal_factors_and_zero_e_so_identity(std):
  w = jax.random.normal(jax.random.key(1), (512, 256))
  adapter = adalora(16, init_std=std)
  params, buffers = adapter.init(jax.random.key(0), w)
  assert isinstance(params, AdaLoraParams) and buffers is None
  for leaf, shape in ((params.a, (512, 16)), (params.b, (16, 256))):
    assert leaf.shape == shape
    np.testing.assert_allclose(np.std(np.float64(leaf)), std, rtol=0.03)
    assert abs(np.mean(np.float64(leaf))) < 0.05 * std
  np.testing.assert_array_equal(params.e, np.zeros(16))
  np.testing.assert_array_equal(adapter.apply(w, params, buffers), w)


def test_trainable_count_is_r_times_din_plus_dout_plus_one():
  adapter = adalora(8)
  params, _ = jax.eval_shape(adapter.init, jax.random.key(0), jnp.zeros((768, 3072)))
  assert pj.count(params) == adapter.num_params((768, 3072)) == 8 * (768 + 3072 + 1)


def test_orthogonality_penalty_is_the_codes_mean_of_unsquared_norms():
  params = random_params(4, 3)
  A, B = np.float64(params.a).T, np.float64(params.b).T
  eye = np.eye(3)
  norms = [np.linalg.norm(A @ A.T - eye), np.linalg.norm(B.T @ B - eye)]
  squared = sum(n**2 for n in norms)
  default = adalora(3, reg_orth_coef=0.3)
  terms = default.regularizer(None, params, None)
  assert terms.shape == ()  # one term per matrix
  np.testing.assert_allclose(terms, 0.3 * np.mean(norms), rtol=1e-5)
  paper = adalora(3, reg_orth_coef=0.3, reg_form='squared')
  np.testing.assert_allclose(
    paper.regularizer(None, params, None), 0.3 * squared, rtol=1e-5
  )
  assert adalora(3, reg_orth_coef=0).regularizer is None
  down, up = default.factors(params, None)
  np.testing.assert_array_equal(down, params.a)
  np.testing.assert_array_equal(up, params.b)


def test_params_are_float32_for_bf16_weights_and_result_stays_bf16():
  w = jnp.ones((8, 4), jnp.bfloat16)
  adapter = adalora(2)
  params, buffers = adapter.init(jax.random.key(0), w)
  assert all(leaf.dtype == jnp.float32 for leaf in params)
  assert adapter.apply(w, params, buffers).dtype == jnp.bfloat16


@pytest.mark.parametrize(
  'kwargs,leaf_shape,message',
  [
    ({'rank': 0}, (4, 4), 'rank=0 must be > 0'),
    ({'rank': 2.5}, (4, 4), 'must be an int'),
    ({'rank': 5}, (8, 4), r'rank=5 exceeds min\(d_in, d_out\)=4'),
    ({'alpha': 'big'}, (4, 4), "alpha='big' must be a number"),
    ({'init_std': 0.0}, (4, 4), 'init_std=0.0 must be > 0'),
    ({'reg_orth_coef': -0.1}, (4, 4), 'reg_orth_coef=-0.1 must be >= 0'),
    ({'reg_form': 'cubed'}, (4, 4), "reg_form='cubed' is not one of"),
    ({'param_dtype': 'int8'}, (4, 4), 'not a floating dtype'),
    ({'rank': 2}, (4, 4, 4), 'expects a 2-D kernel'),
  ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, leaf_shape, message):
  with pytest.raises(pj.PeftError, match=f'adalora.*{message}'):
    adalora(**kwargs).init(jax.random.key(0), jnp.ones(leaf_shape))
