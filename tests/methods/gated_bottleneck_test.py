"""Gated sequential adapters (``pfeiffer``/``houlsby`` with ``gated=True``,
UniPELT's adapter) against float64 NumPy, one sequence at a time.

``h' = h + g · (f(h @ down + b_d) @ up + b_u)``, ``g = mean_i σ(h_i · w_g +
b_g)`` per sequence, from the adapter's input ``h`` (adapter-transformers'
``Adapter.forward``). Expected values never come from the code under test.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax._src.bottleneck import BottleneckParams, GatedBottleneckParams
from tests import references

B, S, D = 2, 5, 24

NUMPY_ACTIVATIONS = {
  'relu': lambda z: np.maximum(z, 0),
  'swish': lambda z: z / (1 + np.exp(-z)),
}


def f64(t) -> np.ndarray:
  return np.asarray(t, np.float64)


def gated_reference(h, p, f) -> np.ndarray:
  """``h + g · (f(h @ down + b_d) @ up + b_u)``, one gate per sequence."""
  h = f64(h)
  out = np.empty_like(h)
  for index in np.ndindex(h.shape[:-2]):
    seq = h[index]
    z = seq @ f64(p.gate)[:, 0] + f64(p.gate_bias)[0]
    g = np.mean(1 / (1 + np.exp(-z)))
    branch = f(seq @ f64(p.down) + f64(p.down_bias)) @ f64(p.up) + f64(p.up_bias)
    out[index] = seq + g * branch
  return out


def hidden(*shape):
  return jax.ShapeDtypeStruct(shape or (B, S, D), jnp.float32)


@pytest.mark.parametrize(
  'spec, activation',
  [
    ('pfeiffer(reduction_factor=3, gated=True)', 'relu'),
    ('houlsby(reduction_factor=3, gated=True)', 'swish'),
    ("pfeiffer(reduction_factor=3, activation='swish', gated=True)", 'swish'),
  ],
)
@pytest.mark.parametrize('shape', [(S, D), (B, S, D), (3, B, S, D)])
def test_gated_sequential_adapters_equal_the_numpy_formula(spec, activation, shape):
  adapter = pj.get(spec)
  params, buffers = adapter.init(jax.random.key(0), hidden(*shape))
  assert isinstance(params, GatedBottleneckParams) and buffers is None
  assert params.gate.shape == (D, 1) and params.gate_bias.shape == (1,)
  params = references.perturb(params, 1)
  h = jax.random.normal(jax.random.key(2), shape)
  got = jax.jit(adapter.apply)(h, params, None)
  want = gated_reference(h, params, NUMPY_ACTIVATIONS[activation])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  r = D // 3
  assert (
    pj.count(params) == adapter.num_params(hidden(*shape)) == 2 * D * r + r + 2 * D + 1
  )


def test_gate_is_one_scalar_per_sequence_on_the_whole_branch():
  adapter = pj.pfeiffer(reduction_factor=3, gated=True)
  params, _ = adapter.init(jax.random.key(0), hidden())
  params = references.perturb(params, 3)
  h = jax.random.normal(jax.random.key(4), (B, S, D))
  ungated = BottleneckParams(*params[:4])
  plain = pj.pfeiffer(reduction_factor=3).apply(h, ungated, None)
  ratio = f64(adapter.apply(h, params, None) - h) / f64(plain - h)
  branch = f64(plain - h)
  gates = []
  for i in range(B):
    large = np.abs(branch[i]) > 0.5
    assert large.sum() > 10
    gates.append(np.median(ratio[i][large]))
    np.testing.assert_allclose(ratio[i][large], gates[i], rtol=1e-4)
    assert 0 < gates[i] < 1
  assert abs(gates[0] - gates[1]) > 1e-3


def test_gate_init_is_bert_and_the_bottleneck_init_is_unchanged():
  d = 1024
  value = hidden(1, 4, d)
  gated, _ = pj.pfeiffer(gated=True).init(jax.random.key(0), value)
  gate = f64(gated.gate)
  assert abs(gate.std() - 0.02) < 3e-3 and np.abs(gate).max() > 3 * 0.02
  np.testing.assert_array_equal(gated.gate_bias, np.zeros(1))
  weights = np.concatenate([f64(gated.down).ravel(), f64(gated.up).ravel()])
  assert abs(weights.std() - 0.02) < 1e-3
  assert not np.any(f64(gated.down_bias)) and not np.any(f64(gated.up_bias))
  houlsby, _ = pj.houlsby(gated=True).init(jax.random.key(0), value)
  assert abs(f64(houlsby.gate).std() - 0.02) < 3e-3
  assert np.abs(f64(houlsby.down)).max() <= 2e-2  # still truncated at 2σ


def test_gated_false_is_the_default_and_keeps_the_ungated_params():
  for method in (pj.pfeiffer, pj.houlsby):
    assert method(gated=False) is method()
    params, _ = method().init(jax.random.key(0), hidden())
    assert type(params) is BottleneckParams


def test_gradient_reaches_the_gate_at_init():
  adapter = pj.pfeiffer(reduction_factor=3, gated=True)
  params, _ = adapter.init(jax.random.key(0), hidden())
  h = jax.random.normal(jax.random.key(5), (B, S, D))
  grads = jax.grad(lambda p: jnp.sum(jnp.sin(adapter.apply(h, p, None))))(params)
  for field, g in grads._asdict().items():
    assert np.all(np.isfinite(g)) and np.any(g != 0), field


def test_keeps_the_activation_dtype():
  adapter = pj.houlsby(reduction_factor=3, gated=True)
  params, _ = adapter.init(jax.random.key(0), hidden())
  h = jax.random.normal(jax.random.key(6), (B, S, D), jnp.bfloat16)
  assert adapter.apply(h, params, None).dtype == jnp.bfloat16


# ---------------------------------------------------------------------------
# End to end: after BERT's FFN output Dense, against an interception.

CONFIG = references.TINY_BERT


def intercepting_gated(adapters: dict[tuple, GatedBottleneckParams]):
  """Replaces each listed Dense output ``y`` by ``gated_reference(y)`` (ReLU),
  by Flax method interception (independent of hook points). Eager only."""

  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    path = tuple(context.module.path)
    if context.method_name == '__call__' and path in adapters:
      want = gated_reference(y, adapters[path], NUMPY_ACTIVATIONS['relu'])
      return jnp.asarray(want, y.dtype)
    return y

  return nn.intercept_methods(interceptor)


def test_gated_pfeiffer_on_bert_equals_a_hand_written_interception():
  model, frozen, ids, mask = references.tiny_bert_classifier(2, 5)
  hooks = pj.hook_points(model, ids, mask)
  tree = pj.by_rules([('.*/ffn_output', 'pfeiffer(reduction_factor=4, gated=True)')])
  params, buffers = tree.init(jax.random.key(2), frozen, hooks)
  params = references.perturb(params, 3)
  by_dense = {
    ('bert', 'encoder', f'layer_{i}', 'output'): params['bert']['encoder'][
      f'layer_{i}'
    ]['ffn_output']
    for i in range(CONFIG.num_layers)
  }
  with intercepting_gated(by_dense):
    want = model.apply({'params': frozen}, ids, mask)
  assert not np.allclose(want, model.apply({'params': frozen}, ids, mask), atol=1e-3)
  fn = lambda w, ids, mask: model.apply({'params': w}, ids, mask)
  for factored in (False, True):
    got = jax.jit(pj.adapted(tree, fn, factored=factored))(
      frozen, params, buffers, ids, mask
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# Names and errors.


@pytest.mark.parametrize(
  'spec',
  [
    'pfeiffer(gated=True)',
    'pfeiffer(reduction_factor=8, init="houlsby", gated=True)',
    'houlsby(gated=True)',
  ],
)
def test_spec_strings_round_trip(spec):
  adapter = pj.get(spec)
  assert pj.get(adapter.name) is adapter
  assert 'gated=True' in adapter.name


@pytest.mark.parametrize('method', ['pfeiffer', 'houlsby'])
def test_gated_must_be_a_bool(method):
  with pytest.raises(pj.PeftError, match=f'{method}: gated=1 must be True or False'):
    pj.get(f'{method}(gated=1)')
