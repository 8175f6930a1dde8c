"""P-tuning against float64 NumPy prompt encoders written from the formulas
(the LSTM with explicit gates), the prepend and mask at the hook point, end
to end on a tiny BERT (reduced to the tested ``prompt_tuning`` path), the
count formula, torch's init ranges, errors and spec round trips; HF PEFT's
``PromptEncoder`` itself where its fixture was generated."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax.methods.p_tuning import (
  DenseParams,
  LstmDirection,
  LstmLayer,
  PTuningParams,
  encode,
)
from peft_jax.methods.prompt_tuning import PromptParams
from tests import references

B, S, L, D, H = 2, 5, 4, 6, 4  # 2h ≠ d: the LSTM layers' inputs differ
FIXTURE = pathlib.Path(__file__).parent.parent / 'fixtures' / 'p_tuning_hf.npz'


def f64(x):
  return np.asarray(x, np.float64)


def relu(x):
  return np.maximum(x, 0)


def sigmoid(x):
  return 1 / (1 + np.exp(-x))


def np_lstm_direction(p: LstmDirection, xs, reverse: bool) -> np.ndarray:
  """One LSTM direction from h = c = 0, gates i, f, g, o in torch's order."""
  n = np.shape(p.w_hh)[0]
  h, c = np.zeros(n), np.zeros(n)
  out = np.zeros((len(xs), n))
  for t in reversed(range(len(xs))) if reverse else range(len(xs)):
    z = xs[t] @ f64(p.w_ih) + f64(p.b_ih) + h @ f64(p.w_hh) + f64(p.b_hh)
    i = sigmoid(z[:n])
    f = sigmoid(z[n : 2 * n])
    g = np.tanh(z[2 * n : 3 * n])
    o = sigmoid(z[3 * n :])
    c = f * c + i * g
    h = o * np.tanh(c)
    out[t] = h
  return out


def np_prompt(params: PTuningParams) -> np.ndarray:
  """``P: (l, d)`` of HF's ``PromptEncoder`` for these parameters."""
  x = f64(params.embedding)
  layers = [(f64(dense.kernel), f64(dense.bias)) for dense in params.head]
  if not params.lstm:
    (w1, b1), (w2, b2), (w3, b3) = layers
    return relu(relu(x @ w1 + b1) @ w2 + b2) @ w3 + b3
  for layer in params.lstm:
    forward = np_lstm_direction(layer.forward, x, reverse=False)
    backward = np_lstm_direction(layer.backward, x, reverse=True)
    x = np.concatenate([forward, backward], axis=1)
  (w1, b1), (w2, b2) = layers
  return relu(x @ w1 + b1) @ w2 + b2


def value(dtype=jnp.float32, mask=True):
  x = jax.random.normal(jax.random.key(7), (B, S, D), dtype)
  return x, (jnp.ones((B, S), jnp.int32).at[1, -2:].set(0) if mask else None)


def random_params(spec: str, seed: int = 3) -> PTuningParams:
  """The adapter's init moved by noise (so no check passes at init)."""
  params, _ = pj.get(spec).init(jax.random.key(seed), jax.eval_shape(value))
  return references.perturb(params, seed + 1, scale=0.5)


SPECS = [
  f'p_tuning(length={L}, hidden={H})',
  f'p_tuning(length={L})',  # h = d
  f"p_tuning(length={L}, encoder='lstm', hidden={H}, lstm_layers=1)",
  f"p_tuning(length={L}, encoder='lstm', hidden={H})",
  f"p_tuning(length={L}, encoder='lstm', hidden={H}, lstm_layers=3)",
]


@pytest.mark.parametrize('spec', SPECS)
def test_encoder_equals_the_numpy_formula(spec):
  params = random_params(spec)
  want = np_prompt(params)
  assert want.shape == (L, D)
  np.testing.assert_allclose(encode(params), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(encode)(params), want, rtol=1e-5, atol=1e-5)


def test_lstm_layout_is_torch_transposed():
  """Shapes of torch's ``nn.LSTM(d, h, num_layers=2, bidirectional=True)``
  and ``mlp_head`` (torch docs), transposed."""
  params = random_params(f"p_tuning(length={L}, encoder='lstm', hidden={H})")
  first, second = params.lstm
  assert first.forward.w_ih.shape == (D, 4 * H)  # weight_ih_l0: (4h, d)
  assert second.backward.w_ih.shape == (2 * H, 4 * H)  # weight_ih_l1_reverse
  assert second.forward.w_hh.shape == (H, 4 * H)  # weight_hh_l1: (4h, h)
  assert first.backward.b_hh.shape == (4 * H,)  # bias_hh_l0_reverse
  assert [d.kernel.shape for d in params.head] == [(2 * H, 2 * H), (2 * H, D)]


@pytest.mark.parametrize('spec', SPECS[::2])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_prompt_is_prepended_and_the_mask_extended(spec, dtype):
  adapter, params = pj.get(spec), random_params(spec)
  x, mask = value(dtype)
  out, out_mask = jax.jit(adapter.apply)((x, mask), params, None)
  assert out.shape == (B, L + S, D) and out.dtype == dtype
  prompt = np_prompt(params).astype(np.float32)
  for b in range(B):  # The same prompt for every batch element.
    np.testing.assert_allclose(
      np.asarray(out[b, :L], np.float32),
      np.asarray(jnp.asarray(prompt, dtype), np.float32),
      rtol=1e-5,
      atol=1e-5,
    )
  np.testing.assert_array_equal(out[:, L:], x)
  want_mask = np.concatenate([np.ones((B, L), np.int32), np.asarray(mask)], axis=1)
  np.testing.assert_array_equal(out_mask, want_mask)
  assert out_mask.dtype == mask.dtype
  _, no_mask = adapter.apply(value(mask=False), params, None)
  assert no_mask is None


@pytest.mark.parametrize('encoder', ['mlp', 'lstm'])
def test_tiny_bert_equals_prompt_tuning_with_the_numpy_prompt(encoder):
  """The adapted BERT equals BERT with the NumPy encoder's output as a flat
  ``prompt_tuning`` prompt (tested against feeding tokens in hooks_test)."""
  model, frozen, ids, mask = references.tiny_bert_encoder(B, S)
  hooks = pj.hook_points(model, ids, mask)
  hidden = lambda w, ids, mask: model.apply({'params': w}, ids, mask)
  point = 'embeddings/input_embeddings'
  tree = pj.by_rules([(point, f"p_tuning(length={L}, encoder='{encoder}', hidden=5)")])
  params, buffers = tree.init(jax.random.key(2), frozen, hooks)
  params = references.perturb(params, 3, scale=0.5)
  entry = params['embeddings']['input_embeddings']
  assert isinstance(entry, PTuningParams) and bool(entry.lstm) == (encoder == 'lstm')
  flat = pj.by_rules([(point, f'prompt_tuning(length={L})')])
  flat_params, flat_buffers = flat.init(jax.random.key(2), frozen, hooks)
  prompt = jnp.asarray(np_prompt(entry), jnp.float32)
  flat_params['embeddings']['input_embeddings'] = PromptParams(prompt)
  want = pj.adapted(flat, hidden)(frozen, flat_params, flat_buffers, ids, mask)
  got = jax.jit(pj.adapted(tree, hidden))(frozen, params, buffers, ids, mask)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # The prompt matters: without it the output differs.
  plain = hidden(frozen, ids, mask)
  assert np.abs(np.asarray(plain - want)).max() > 1e-2


@pytest.mark.parametrize(
  'spec, count',
  [
    # l·d + (d·h + h) + (h·h + h) + (h·d + d), l = 4, d = 6, h = 4
    (f'p_tuning(length={L}, hidden={H})', 24 + 28 + 20 + 30),
    (f'p_tuning(length={L})', 24 + 42 + 42 + 42),  # h = d = 6
    # l·d + per layer 2·(4h·(d_k + h) + 8h), d_0 = d = 6, d_k = 2h = 8,
    # + (2h·2h + 2h) + (2h·d + d)
    (
      f"p_tuning(length={L}, encoder='lstm', hidden={H}, lstm_layers=1)",
      24 + 2 * (16 * 10 + 32) + 72 + 54,
    ),
    (
      f"p_tuning(length={L}, encoder='lstm', hidden={H})",
      24 + 2 * (16 * 10 + 32) + 2 * (16 * 12 + 32) + 72 + 54,
    ),
  ],
)
def test_count_is_the_formula(spec, count):
  adapter = pj.get(spec)
  params, buffers = adapter.init(jax.random.key(0), jax.eval_shape(value))
  assert buffers is None
  assert pj.count(params) == adapter.num_params(jax.eval_shape(value)) == count


def test_init_is_torch_default():
  """``nn.Embedding`` N(0, 1); ``nn.Linear`` U(±1/√fan_in) for weight and
  bias; ``nn.LSTM`` U(±1/√h) for every weight and bias."""
  d, h = 64, 48
  x = jax.ShapeDtypeStruct((1, 1, d), jnp.float32)
  spec = f"p_tuning(length=50, encoder='lstm', hidden={h})"
  # Jitted: one compile, not one random draw's compile per leaf shape.
  params = jax.jit(lambda key: pj.get(spec).init(key, (x, None))[0])(jax.random.key(0))

  def assert_uniform(a, bound):
    a = np.asarray(a)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert abs(a.mean()) < 4 * bound / np.sqrt(3 * a.size)  # 4σ of the mean

  embedding = np.asarray(params.embedding)
  assert abs(embedding.mean()) < 0.05 and abs(embedding.std() - 1) < 0.05
  for layer in params.lstm:
    for leaf in jax.tree.leaves(layer):
      assert_uniform(leaf, h**-0.5)
  for dense in params.head:
    fan_in = dense.kernel.shape[0]
    assert_uniform(dense.kernel, fan_in**-0.5)
    assert_uniform(dense.bias, fan_in**-0.5)
  leaves = jax.tree.leaves(params)
  assert len({np.asarray(a).ravel()[0] for a in leaves}) == len(leaves)  # own keys
  bf16 = pj.p_tuning(encoder='lstm', param_dtype='bfloat16')
  init = jax.eval_shape(lambda key: bf16.init(key, (x, None)), jax.random.key(0))
  dtypes = {a.dtype for a in jax.tree.leaves(init)}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize(
  'spec, match',
  [
    ("p_tuning(encoder='gru')", "encoder='gru' is not one of 'mlp', 'lstm'"),
    ('p_tuning(length=0)', 'p_tuning: length=0 must be > 0'),
    ('p_tuning(hidden=0)', 'p_tuning: hidden=0 must be > 0'),
    ('p_tuning(hidden=2.5)', 'hidden=2.5 must be an int'),
    ('p_tuning(lstm_layers=3)', "lstm_layers=3 applies only to encoder='lstm'"),
    ("p_tuning(encoder='lstm', lstm_layers=0)", 'lstm_layers=0 must be > 0'),
    ("p_tuning(param_dtype='int8')", "param_dtype='int8' is not a floating dtype"),
    ('p_tuning(dropout=0.1)', 'p_tuning\\(\\): .*accepted: length, encoder'),
  ],
)
def test_bad_arguments_raise_one_line_errors(spec, match):
  with pytest.raises(pj.PeftError, match=match) as error:
    pj.get(spec)
  assert '\n' not in str(error.value)


def test_wrong_hook_point_raises_one_line_error():
  adapter = pj.p_tuning(length=2)
  hidden = jax.ShapeDtypeStruct((B, S, D), jnp.float32)
  with pytest.raises(pj.PeftError, match='p_tuning acts at an input_embeddings') as e:
    adapter.init(jax.random.key(0), hidden)
  assert '\n' not in str(e.value)


def test_spec_round_trips_through_get():
  adapter = pj.p_tuning(length=3, encoder='lstm')
  assert adapter.name == (
    "p_tuning(length=3, encoder='lstm', hidden=None, lstm_layers=2, "
    "param_dtype='float32')"
  )
  assert pj.get(adapter.name) is adapter
  assert pj.get("p_tuning(3, encoder='lstm')") is adapter
  assert pj.get('p_tuning').name.startswith("p_tuning(length=20, encoder='mlp'")


def from_torch(state: dict, layers: int) -> PTuningParams:
  """``PTuningParams`` from HF's ``PromptEncoder.state_dict()`` (NumPy)."""

  def direction(k, suffix):
    names = [f'lstm_head.{w}_l{k}{suffix}' for w in ('weight_ih', 'weight_hh')]
    biases = [f'lstm_head.{b}_l{k}{suffix}' for b in ('bias_ih', 'bias_hh')]
    return LstmDirection(*(state[n].T for n in names), *(state[n] for n in biases))

  lstm = tuple(
    LstmLayer(direction(k, ''), direction(k, '_reverse')) for k in range(layers)
  )
  head = tuple(
    DenseParams(state[f'mlp_head.{i}.weight'].T, state[f'mlp_head.{i}.bias'])
    for i in (0, 2, 4)
    if f'mlp_head.{i}.weight' in state
  )
  return PTuningParams(state['embedding.weight'], lstm, head)


@pytest.mark.parametrize('encoder', ['mlp', 'lstm'])
def test_matches_hf_peft_prompt_encoder_fixture(encoder):
  if not FIXTURE.exists():
    pytest.skip(
      f'{FIXTURE.name} not generated: run tests/fixtures/make_p_tuning_fixture.py '
      'where torch and peft are installed'
    )
  with np.load(FIXTURE) as data:
    arrays = {k: data[k] for k in data.files}
  prefix = f'{encoder}/'
  state = {
    k.removeprefix(prefix): v
    for k, v in arrays.items()
    if k.startswith(prefix) and k != f'{prefix}output'
  }
  layers = int(arrays['lstm_layers'])
  params = from_torch(state, layers if encoder == 'lstm' else 0)
  length, d = params.embedding.shape
  hidden = int(arrays['hidden'])
  adapter = pj.p_tuning(length, encoder=encoder, hidden=hidden, lstm_layers=layers)
  x = jax.ShapeDtypeStruct((1, 1, d), jnp.float32)
  assert adapter.num_params((x, None)) == sum(v.size for v in state.values())
  # Tolerance 1e-6: float32 round-off between torch and XLA on outputs below 1
  # (measured ≲ 1e-7); one embedding entry moved by 1e-2 changes the LSTM
  # encoder's output by ~4e-5, which 1e-5 would barely catch.
  np.testing.assert_allclose(
    encode(params), arrays[f'{prefix}output'], rtol=1e-6, atol=1e-6
  )
