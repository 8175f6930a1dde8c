"""(IA)³ in weight space, both forms, against float64 NumPy.

Output form (default): ``w' = w · diag(l_out)``, ``y = (x @ w) ⊙ l_out``.
Feed-forward form (HF PEFT's ``feedforward_modules``): ``w' = diag(l_in) · w``,
``y = (x ⊙ l_in) @ w``; HF merges it as ``W * ia3_l`` with ``W = wᵀ:
(out_features, in_features)`` and ``ia3_l: (1, in_features)``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax.methods.ia3 import Ia3InputParams, Ia3Params

D_IN, D_OUT = 7, 5


def random_case(seed):
  """``(w (d_in, d_out), x (3, d_in), l_in (d_in,), l_out (d_out,))``, float64."""
  rng = np.random.default_rng(seed)
  w, x = rng.normal(size=(D_IN, D_OUT)), rng.normal(size=(3, D_IN))
  return w, x, rng.uniform(0.5, 1.5, D_IN), rng.uniform(0.5, 1.5, D_OUT)


def close(got, want):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-6)


def test_output_form_is_unchanged():
  w, x, _, l_out = random_case(0)
  adapter = pj.ia3()
  params, buffers = adapter.init(jax.random.key(0), jnp.float32(w))
  assert isinstance(params, Ia3Params) and buffers is None
  np.testing.assert_array_equal(params.l_out, np.ones(D_OUT))
  assert adapter.num_params((D_IN, D_OUT)) == pj.count(params) == D_OUT
  params = Ia3Params(jnp.float32(l_out))
  merged = adapter.apply(jnp.float32(w), params, None)
  close(merged, w @ np.diag(l_out))
  close(
    adapter.linear.factored(jnp.float32(x), jnp.float32(w), params, None),
    (x @ w) * l_out,
  )
  close(adapter.unapply(merged, params, None), w)


def test_feedforward_form_scales_the_input():
  w, x, l_in, _ = random_case(1)
  adapter = pj.ia3(feedforward=True)
  params, buffers = adapter.init(jax.random.key(0), jnp.float32(w))
  assert isinstance(params, Ia3InputParams) and buffers is None
  np.testing.assert_array_equal(params.l_in, np.ones(D_IN))
  assert adapter.num_params((D_IN, D_OUT)) == pj.count(params) == D_IN
  params = Ia3InputParams(jnp.float32(l_in))
  merged = adapter.apply(jnp.float32(w), params, None)
  close(merged, np.diag(l_in) @ w)
  close(merged, (w.T * l_in[None, :]).T)  # HF: W * ia3_l, W = wᵀ, (1, d_in)
  factored = adapter.linear.factored(jnp.float32(x), jnp.float32(w), params, None)
  close(factored, (x * l_in) @ w)
  close(adapter.unapply(merged, params, None), w)


def test_feedforward_form_keeps_the_kernel_dtype():
  w, _, l_in, _ = random_case(2)
  adapter = pj.ia3(feedforward=True, param_dtype='bfloat16')
  params, _ = adapter.init(jax.random.key(0), jnp.bfloat16(w))
  assert params.l_in.dtype == jnp.bfloat16
  merged = adapter.apply(jnp.bfloat16(w), Ia3InputParams(jnp.bfloat16(l_in)), None)
  assert merged.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.float64(merged), np.diag(l_in) @ w, rtol=2e-2, atol=2e-2
  )


def test_spec_strings_round_trip():
  adapter = pj.get('ia3(feedforward=True)')
  assert adapter.name == "ia3(feedforward=True, param_dtype='float32')"
  assert pj.get(adapter.name) is adapter is pj.ia3(feedforward=True)
  assert pj.get('ia3()').name == "ia3(feedforward=False, param_dtype='float32')"
  assert pj.get('ia3()') is not adapter


def test_feedforward_form_through_by_rules_merges_and_unmerges():
  w, x, l_in, _ = random_case(3)
  frozen = {'dense': {'kernel': jnp.float32(w)}}
  tree = pj.by_rules([('dense/kernel', 'ia3(feedforward=True)')])
  _, buffers = tree.init(jax.random.key(0), frozen)
  params = {'dense': {'kernel': Ia3InputParams(jnp.float32(l_in))}}
  merged = pj.merge(tree, frozen, params, buffers)
  close(merged['dense']['kernel'], np.diag(l_in) @ w)
  close(pj.unmerge(tree, merged, params, buffers)['dense']['kernel'], w)
  dense = lambda weights, x: x @ weights['dense']['kernel']
  y = pj.adapted(tree, dense, factored=True)(frozen, params, buffers, jnp.float32(x))
  close(y, (x * l_in) @ w)


@pytest.mark.parametrize(
  'spec,message',
  [
    ('ia3(feedforward=1)', r'ia3: feedforward=1 must be True or False'),
    ("ia3(feedforward='yes')", r"ia3: feedforward='yes' must be True or False"),
    ("ia3(param_dtype='int32')", r"ia3: param_dtype='int32' is not a floating"),
    (
      "ia3(feedforward=True, param_dtype='int8')",
      r"ia3: param_dtype='int8' is not a floating",
    ),
  ],
)
def test_bad_arguments_are_one_line_errors(spec, message):
  with pytest.raises(pj.PeftError, match=message) as error:
    pj.get(spec)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('feedforward', [False, True])
def test_non_matrix_leaf_is_a_one_line_error(feedforward):
  adapter = pj.ia3(feedforward=feedforward)
  with pytest.raises(pj.PeftError, match=r'ia3 expects a 2-D kernel') as error:
    adapter.init(jax.random.key(0), jnp.ones((3,)))
  assert '\n' not in str(error.value)
