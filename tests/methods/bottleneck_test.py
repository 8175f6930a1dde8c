"""Bottleneck adapters (houlsby, pfeiffer, scaled_parallel) against float64 NumPy.

Every value check draws fresh random inputs and parameters moved away from
their init, and compares with the formula written out in float64 NumPy, never
with the code under test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax._src.bottleneck import BottleneckParams
from peft_jax.methods.scaled_parallel import (
  LearnedScaledParallelParams,
  ScaledParallelParams,
)
from tests import references

B, S, D = 2, 5, 24

NUMPY_ACTIVATIONS = {
  'relu': lambda z: np.maximum(z, 0),
  'tanh': np.tanh,
  'swish': lambda z: z / (1 + np.exp(-z)),
}


def f64(t) -> np.ndarray:
  return np.asarray(t, np.float64)


def sequential_reference(h, p, f) -> np.ndarray:
  """``h + f(h @ down + b_d) @ up + b_u``."""
  return (
    f64(h) + f(f64(h) @ f64(p.down) + f64(p.down_bias)) @ f64(p.up) + f64(p.up_bias)
  )


def parallel_reference(x, h, p, s, f) -> np.ndarray:
  """``h + s · f(x @ down + b_d) @ up``."""
  return f64(h) + s * (f(f64(x) @ f64(p.down) + f64(p.down_bias)) @ f64(p.up))


def activations(seed, n=1):
  keys = jax.random.split(jax.random.key(seed), n)
  return [jax.random.normal(k, (B, S, D)) for k in keys]


def hidden():
  return jax.ShapeDtypeStruct((B, S, D), jnp.float32)


def pair():
  return (hidden(), hidden())


def initialised(spec, value, seed=0):
  adapter = pj.get(spec)
  params, buffers = adapter.init(jax.random.key(seed), value)
  assert buffers is None
  return adapter, params


# ---------------------------------------------------------------------------
# Sequential: houlsby and pfeiffer.


@pytest.mark.parametrize('method', ['houlsby', 'pfeiffer'])
@pytest.mark.parametrize('activation', sorted(NUMPY_ACTIVATIONS))
def test_sequential_adapters_equal_the_numpy_formula(method, activation):
  spec = f'{method}(reduction_factor=3, activation={activation!r})'
  adapter, params = initialised(spec, hidden())
  assert isinstance(params, BottleneckParams)
  assert params.down.shape == (D, 8) and params.up.shape == (8, D)
  params = references.perturb(params, 1)
  (h,) = activations(2)
  got = jax.jit(adapter.apply)(h, params, None)
  want = sequential_reference(h, params, NUMPY_ACTIVATIONS[activation])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert pj.count(params) == adapter.num_params(hidden()) == 2 * D * 8 + 8 + D


def test_pfeiffer_defaults_are_seq_bn():
  """r = d/16, ReLU, weights N(0, 0.02²) untruncated, biases 0."""
  d = 1024
  adapter, params = initialised('pfeiffer()', jax.ShapeDtypeStruct((1, d), jnp.float32))
  assert params.down.shape == (d, 64) and params.up.shape == (64, d)
  weights = np.concatenate([f64(params.down).ravel(), f64(params.up).ravel()])
  assert abs(weights.std() - 0.02) < 1e-3 and abs(weights.mean()) < 1e-3
  assert np.abs(weights).max() > 3 * 0.02  # not truncated at 2σ
  assert not np.any(f64(params.down_bias)) and not np.any(f64(params.up_bias))
  params = references.perturb(params, 12)
  h = jax.random.normal(jax.random.key(13), (3, d))
  want = sequential_reference(h, params, NUMPY_ACTIVATIONS['relu'])
  np.testing.assert_allclose(adapter.apply(h, params, None), want, rtol=1e-4, atol=1e-4)


def test_pfeiffer_houlsby_init_is_truncated_at_two_sigma():
  _, params = initialised('pfeiffer(init="houlsby")', hidden())
  weights = np.concatenate([f64(params.down).ravel(), f64(params.up).ravel()])
  assert np.abs(weights).max() <= 2e-2 and weights.std() > 5e-3


# ---------------------------------------------------------------------------
# Scaled parallel.


@pytest.mark.parametrize(
  'spec, scale, rank',
  [
    ('scaled_parallel(reduction_factor=3, scale=2.0)', 2.0, 8),
    ('scaled_parallel(rank=5, scale=-0.5, activation="tanh")', -0.5, 5),
    ('scaled_parallel(reduction_factor=4, learned_scale=True)', None, 6),
  ],
)
def test_scaled_parallel_equals_the_numpy_formula(spec, scale, rank):
  adapter, params = initialised(spec, pair())
  learned = scale is None
  typed = LearnedScaledParallelParams if learned else ScaledParallelParams
  assert isinstance(params, typed)
  assert params.down.shape == (D, rank) and params.up.shape == (rank, D)
  params = references.perturb(params, 3)
  x, h = activations(4, 2)
  got_x, got_h = jax.jit(adapter.apply)((x, h), params, None)
  np.testing.assert_array_equal(got_x, x)
  s = float(params.scale) if learned else scale
  f = np.tanh if 'tanh' in spec else NUMPY_ACTIVATIONS['relu']
  np.testing.assert_allclose(
    got_h, parallel_reference(x, h, params, s, f), rtol=1e-5, atol=1e-5
  )
  assert pj.count(params) == adapter.num_params(pair()) == 2 * D * rank + rank + learned


def test_plain_parallel_adapter_is_scale_one():
  adapter, params = initialised('scaled_parallel(scale=1.0)', pair())
  params = references.perturb(params, 5)
  x, h = activations(6, 2)
  f = NUMPY_ACTIVATIONS['relu']
  np.testing.assert_allclose(
    adapter.apply((x, h), params, None)[1],
    f64(h) + f(f64(x) @ f64(params.down) + f64(params.down_bias)) @ f64(params.up),
    rtol=1e-5,
    atol=1e-5,
  )


def test_learned_scale_gradient_is_the_branch_sum():
  """d sum(h') / ds = sum(f(x W_d + b_d) W_u), and s starts at ``scale``."""
  adapter, params = initialised(
    'scaled_parallel(scale=3.0, learned_scale=True)', pair()
  )
  assert params.scale.shape == () and float(params.scale) == 3.0
  params = references.perturb(params, 7)
  x, h = activations(8, 2)
  grad = jax.grad(lambda p: jnp.sum(adapter.apply((x, h), p, None)[1]))(params)
  f = NUMPY_ACTIVATIONS['relu']
  branch = f(f64(x) @ f64(params.down) + f64(params.down_bias)) @ f64(params.up)
  np.testing.assert_allclose(grad.scale, branch.sum(), rtol=1e-4)


@pytest.mark.parametrize('learned', [False, True])
def test_scaled_parallel_is_the_identity_at_init_with_he_init(learned):
  spec = f'scaled_parallel(reduction_factor=2, learned_scale={learned})'
  adapter, params = initialised(spec, pair())
  bound = 1 / np.sqrt(D)
  down = f64(params.down)
  assert np.abs(down).max() <= bound and np.abs(down).max() > 0.8 * bound
  assert not np.any(f64(params.down_bias)) and not np.any(f64(params.up))
  x, h = activations(9, 2)
  out = adapter.apply((x, h), params, None)
  np.testing.assert_array_equal(out[0], x)
  np.testing.assert_array_equal(out[1], h)


def test_scaled_parallel_keeps_the_activation_dtype():
  adapter, params = initialised('scaled_parallel(learned_scale=True)', pair())
  params = references.perturb(params, 10)
  x, h = (t.astype(jnp.bfloat16) for t in activations(11, 2))
  out_x, out_h = adapter.apply((x, h), params, None)
  assert out_x.dtype == out_h.dtype == jnp.bfloat16


# ---------------------------------------------------------------------------
# Errors and names.


@pytest.mark.parametrize(
  'value',
  [
    hidden(),
    (hidden(),),
    (hidden(), hidden(), hidden()),
    (hidden(), jax.ShapeDtypeStruct((B, S, D + 1), jnp.float32)),
    (jax.ShapeDtypeStruct((S, D), jnp.float32),) * 2,
  ],
)
def test_scaled_parallel_names_the_value_it_needs(value):
  with pytest.raises(pj.PeftError) as error:
    pj.scaled_parallel().init(jax.random.key(0), value)
  message = str(error.value)
  assert '\n' not in message
  assert message.startswith(
    'scaled_parallel acts at an ffn_block or attention_block hook point, whose '
    'value is (x (batch, seq, d), h (batch, seq, d)); got'
  )


@pytest.mark.parametrize('method', ['houlsby', 'pfeiffer'])
def test_sequential_adapters_reject_a_pair(method):
  with pytest.raises(pj.PeftError) as error:
    pj.get(f'{method}()').init(jax.random.key(0), pair())
  assert '\n' not in str(error.value)
  assert str(error.value).startswith(f'{method} acts on a (batch, seq, d) activation')


@pytest.mark.parametrize(
  'spec, match',
  [
    ('pfeiffer(reduction_factor=0)', 'pfeiffer: reduction_factor=0 must be > 0'),
    ('pfeiffer(init="xavier")', "pfeiffer: init='xavier' is not one of"),
    ('pfeiffer(activation="elu")', "pfeiffer: activation='elu' is not one of"),
    ('scaled_parallel(rank=0)', 'scaled_parallel: rank=0 must be > 0'),
    ('scaled_parallel(scale="4")', "scaled_parallel: scale='4' must be a number"),
    ('scaled_parallel(learned_scale=1)', 'learned_scale=1 must be True or False'),
    ('scaled_parallel(param_dtype="int32")', 'not a floating dtype name'),
  ],
)
def test_bad_hyper_parameters_are_one_line_errors(spec, match):
  with pytest.raises(pj.PeftError, match=match) as error:
    pj.get(spec)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize(
  'spec',
  [
    'pfeiffer()',
    'pfeiffer(reduction_factor=8, activation="swish", init="houlsby")',
    'scaled_parallel()',
    'scaled_parallel(reduction_factor=4, scale=2.0)',
    'scaled_parallel(rank=16, scale=1.0, learned_scale=True)',
  ],
)
def test_spec_strings_round_trip(spec):
  adapter = pj.get(spec)
  assert pj.get(adapter.name) is adapter
  method, _, _ = spec.partition('(')
  assert adapter.name.startswith(f'{method}(reduction_factor=')


def test_canonical_name_lists_every_argument():
  assert pj.get('scaled_parallel(reduction_factor=4, scale=2.0)').name == (
    'scaled_parallel(reduction_factor=4, rank=None, scale=2.0, '
    "learned_scale=False, activation='relu', param_dtype='float32')"
  )
