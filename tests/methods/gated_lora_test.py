"""Gated LoRA (UniPELT's LoRA) against float64 NumPy, one sequence at a time.

The reference loops over the sequences of ``x`` and writes the gate out for
each: ``g = mean_i σ(x_i · w_g + b_g)``, ``y = x W + g · x A B``; expected
values never come from the code under test.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax.methods.gated_lora import GatedLoraParams, gated_lora
from tests import references

D_IN, D_OUT, RANK = 9, 6, 3


def f64(t) -> np.ndarray:
  return np.asarray(t, np.float64)


def sigmoid(z):
  return 1 / (1 + np.exp(-z))


def sequence_gate(seq, p) -> float:
  """``mean_i σ(seq[i] · w_g + b_g)`` for one sequence ``seq: (s, d_in)``."""
  return float(np.mean(sigmoid(seq @ f64(p.gate)[:, 0] + f64(p.gate_bias)[0])))


def gated_delta(x, p) -> np.ndarray:
  """``g · (x @ a) @ b``, with one gate per sequence (the last two axes)."""
  x = f64(x)
  out = np.zeros((*x.shape[:-1], p.b.shape[1]))
  for index in np.ndindex(x.shape[:-2]):
    seq = x[index]
    out[index] = sequence_gate(seq, p) * (seq @ f64(p.a) @ f64(p.b))
  return out


def random_params(seed, d_in=D_IN, d_out=D_OUT, rank=RANK) -> GatedLoraParams:
  rng = np.random.default_rng(seed)
  normal = lambda *shape: np.float32(rng.normal(size=shape))
  return GatedLoraParams(
    a=normal(d_in, rank),
    b=normal(rank, d_out),
    gate=normal(d_in, 1),
    gate_bias=normal(1),
  )


def weight_and_input(seed, batch):
  rng = np.random.default_rng(seed)
  w = np.float32(rng.normal(size=(D_IN, D_OUT)))
  x = np.float32(rng.normal(size=(*batch, D_IN)))
  return w, x


@pytest.mark.parametrize('batch', [(5,), (2, 5), (3, 2, 4)])
def test_factored_is_xw_plus_gate_times_xab(batch):
  """Rank 2 is one sequence ``(s, d_in)``; higher ranks one per leading index."""
  w, x = weight_and_input(0, batch)
  params = random_params(1)
  got = jax.jit(gated_lora(RANK).linear.factored)(x, w, params, None)
  want = f64(x) @ f64(w) + gated_delta(x, params)
  assert got.shape == (*batch[:-1], batch[-1], D_OUT) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_each_sequence_gets_its_own_gate_broadcast_over_positions_and_outputs():
  w, x = weight_and_input(2, (2, 5))
  params = random_params(3)
  y = f64(gated_lora(RANK).linear.factored(x, w, params, None))
  branch = f64(x) @ f64(params.a) @ f64(params.b)
  ratio = (y - f64(x) @ f64(w)) / branch  # g, at every position and output
  gates = [sequence_gate(f64(x[i]), params) for i in range(2)]
  for i in range(2):
    large = np.abs(branch[i]) > 0.5  # where float32 rounding cannot swamp g
    assert large.sum() > 10
    np.testing.assert_allclose(ratio[i][large], gates[i], rtol=1e-4)
  assert abs(gates[0] - gates[1]) > 1e-3
  # No mixing across the batch: changing one example leaves the other alone.
  moved = x.copy()
  moved[1] += 1.0
  y_moved = gated_lora(RANK).linear.factored(moved, w, params, None)
  np.testing.assert_allclose(y_moved[0], y[0], rtol=1e-6, atol=1e-6)
  assert not np.allclose(y_moved[1], y[1], atol=1e-2)


def test_init_is_kaiming_a_zero_b_small_gate_and_the_identity():
  d_in, d_out, rank = 512, 64, 8
  adapter = gated_lora(rank)
  w = jax.random.normal(jax.random.key(1), (d_in, d_out))
  params, buffers = adapter.init(jax.random.key(0), w)
  assert isinstance(params, GatedLoraParams) and buffers is None
  assert jax.tree.map(jnp.shape, params) == GatedLoraParams(
    (d_in, rank), (rank, d_out), (d_in, 1), (1,)
  )
  bound = 1 / np.sqrt(d_in)
  a = f64(params.a)
  assert np.all(np.abs(a) <= bound) and np.abs(a).max() > 0.95 * bound
  np.testing.assert_array_equal(params.b, np.zeros((rank, d_out)))
  gate = f64(params.gate)
  assert abs(gate.std() - 0.02) < 3e-3 and np.abs(gate).max() > 0.04  # untruncated
  assert 0 < abs(float(params.gate_bias[0])) <= bound
  x = jax.random.normal(jax.random.key(2), (4, 7, d_in))
  np.testing.assert_array_equal(adapter.linear.factored(x, w, params, buffers), x @ w)
  down, up = adapter.factors(params, buffers)
  np.testing.assert_array_equal(down, params.a)
  np.testing.assert_array_equal(up, params.b)


def test_gate_bias_init_is_torch_linear_default():
  """``U(±1/√d_in)`` over many draws: mean 0, variance ``1/(3 d_in)``."""
  adapter = gated_lora(1)
  w = jnp.zeros((16, 4))
  keys = jax.random.split(jax.random.key(0), 2000)
  bias = jax.vmap(lambda k: adapter.init(k, w)[0].gate_bias[0])(keys)
  bound = 1 / 4
  assert np.all(np.abs(bias) <= bound) and np.abs(bias).max() > 0.99 * bound
  np.testing.assert_allclose(f64(bias).var(), bound**2 / 3, rtol=0.1)


def test_count_is_r_times_din_plus_dout_plus_the_gate():
  adapter = gated_lora(8)
  params, _ = jax.eval_shape(adapter.init, jax.random.key(0), jnp.zeros((768, 3072)))
  want = 8 * (768 + 3072) + 768 + 1
  assert pj.count(params) == adapter.num_params((768, 3072)) == want


def test_gradients_reach_every_factor_and_the_gate_as_numpy_says():
  w, x = weight_and_input(4, (3, 5))
  params = random_params(5)
  probe = np.random.default_rng(6).normal(size=(3, 5, D_OUT))
  loss = lambda p: jnp.sum(gated_lora(RANK).linear.factored(x, w, p, None) * probe)
  grads = jax.jit(jax.grad(loss))(params)
  for field, g in grads._asdict().items():
    assert np.all(np.isfinite(g)) and np.any(g != 0), field
  # L = Σ_e g_e c_e, c_e = Σ probe_e ⊙ x_e A B, g_e = mean_i σ(z_ei):
  # dL/dw_g = Σ_e c_e mean_i σ'(z_ei) x_ei, dL/db_g = Σ_e c_e mean_i σ'(z_ei).
  want_gate, want_bias = np.zeros(D_IN), 0.0
  for e in range(3):
    seq = f64(x[e])
    c = np.sum(probe[e] * (seq @ f64(params.a) @ f64(params.b)))
    s = sigmoid(seq @ f64(params.gate)[:, 0] + f64(params.gate_bias)[0])
    want_gate += c * np.mean((s * (1 - s))[:, None] * seq, axis=0)
    want_bias += c * np.mean(s * (1 - s))
  np.testing.assert_allclose(grads.gate[:, 0], want_gate, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grads.gate_bias[0], want_bias, rtol=1e-4, atol=1e-5)


def test_bf16_input_keeps_its_dtype():
  w, x = weight_and_input(7, (2, 5))
  w, x = jnp.bfloat16(w), jnp.bfloat16(x)
  y = gated_lora(RANK).linear.factored(x, w, random_params(8), None)
  assert y.dtype == jnp.bfloat16 and y.shape == (2, 5, D_OUT)


# ---------------------------------------------------------------------------
# End to end on a tiny BERT, against an independent interception.

CONFIG = references.TINY_BERT
QV_RULE = ('.*/attention/(query|value)/kernel', 'gated_lora(rank=2)')


def bert_setup():
  return references.tiny_bert_classifier(2, 5)


def intercepting_gated_lora(adapters: dict[tuple, GatedLoraParams]):
  """Adds ``gated_delta`` of each Dense's own input to its output, by Flax
  method interception (independent of peft_jax). Eager only."""

  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    path = tuple(context.module.path)
    if context.method_name == '__call__' and path in adapters:
      return jnp.asarray(f64(y) + gated_delta(args[0], adapters[path]), y.dtype)
    return y

  return nn.intercept_methods(interceptor)


def test_on_bert_query_and_value_equal_a_hand_written_interception():
  model, frozen, ids, mask = bert_setup()
  tree = pj.by_rules([QV_RULE])
  assert not tree.mergeable
  params, buffers = tree.init(jax.random.key(2), frozen)
  params = references.perturb(params, 3)
  by_dense = {}
  for i in range(CONFIG.num_layers):
    attention = params['bert']['encoder'][f'layer_{i}']['attention']
    for name in ('query', 'value'):
      p = attention[name]['kernel']
      assert isinstance(p, GatedLoraParams)
      by_dense[('bert', 'encoder', f'layer_{i}', 'attention', name)] = p
  with intercepting_gated_lora(by_dense):
    want = model.apply({'params': frozen}, ids, mask)
  assert not np.allclose(want, model.apply({'params': frozen}, ids, mask), atol=1e-3)
  fn = lambda w, ids, mask: model.apply({'params': w}, ids, mask)
  for factored in (False, True):
    got = jax.jit(pj.adapted(tree, fn, factored=factored))(
      frozen, params, buffers, ids, mask
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  d, layers = CONFIG.hidden_size, CONFIG.num_layers
  assert pj.count(params) == 2 * layers * (2 * (d + d) + d + 1)
  with pytest.raises(pj.PeftError, match='not mergeable'):
    pj.merge(tree, frozen, params, buffers)


def loss_fn(weights, batch, rng):
  del rng
  pred = jnp.tanh(batch['x'] @ weights['dense']['kernel'])
  return jnp.mean((pred - batch['y']) ** 2), {}


@pytest.mark.parametrize('factored', [False, True])
def test_trains_on_either_path(factored):
  rng = np.random.default_rng(9)
  frozen = {'dense': {'kernel': jnp.float32(rng.normal(size=(D_IN, D_OUT)))}}
  x = jnp.float32(rng.normal(size=(4, 6, D_IN)))
  shift = np.outer(rng.normal(size=D_IN), rng.normal(size=D_OUT))  # rank one
  batch = {'x': x, 'y': jnp.tanh(x @ (frozen['dense']['kernel'] + 0.3 * shift))}
  tree = pj.by_rules([('dense/kernel', 'gated_lora(rank=3)')])
  params, buffers = tree.init(jax.random.key(0), frozen)
  _, losses = references.train(
    loss_fn, tree, frozen, params, buffers, batch, steps=20, lr=0.05, factored=factored
  )
  assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------------------
# Names and errors.


@pytest.mark.parametrize(
  'spec', ['gated_lora()', 'gated_lora(4)', 'gated_lora(rank=2)']
)
def test_spec_strings_round_trip(spec):
  adapter = pj.get(spec)
  assert pj.get(adapter.name) is adapter
  assert adapter.apply is None and adapter.linear.factored is not None


def test_canonical_name_lists_every_argument():
  assert pj.gated_lora().name == "gated_lora(rank=8, param_dtype='float32')"


@pytest.mark.parametrize(
  'kwargs,leaf_shape,message',
  [
    ({'rank': 0}, (4, 4), 'rank=0 must be > 0'),
    ({'rank': 5}, (8, 4), r'rank=5 exceeds min\(d_in, d_out\)=4'),
    ({'param_dtype': 'int8'}, (4, 4), 'not a floating dtype'),
    ({'rank': 2}, (4,), 'expects a 2-D kernel'),
  ],
)
def test_bad_hyperparameters_are_one_line_errors(kwargs, leaf_shape, message):
  with pytest.raises(pj.PeftError, match=f'gated_lora.*{message}') as error:
    gated_lora(**kwargs).init(jax.random.key(0), jnp.ones(leaf_shape))
  assert '\n' not in str(error.value)


def test_an_input_without_a_sequence_axis_is_a_one_line_error():
  adapter = gated_lora(2)
  params, _ = adapter.init(jax.random.key(0), jnp.ones((D_IN, D_OUT)))
  with pytest.raises(pj.PeftError) as error:
    adapter.linear.factored(jnp.ones(D_IN), jnp.ones((D_IN, D_OUT)), params, None)
  assert str(error.value) == (
    'gated_lora gates over a sequence axis: x must be (..., s, d); got shape (9,)'
  )
