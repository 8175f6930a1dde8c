"""Quantized frozen weights: the codes against the formulas, and models run
on them against the same model on the dequantized weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.ad_checkpoint import print_saved_residuals
from scipy import stats

import peft_jax as pj
from peft_jax._src import quantization, quantized_array
from peft_jax.models import llama
from tests import references

CONFIG = references.TINY_LLAMA
KERNELS = r'.*_proj/kernel'


def test_nf4_levels_are_qlora_normal_quantiles():
  """QLoRA (Dettmers et al. 2023, eq. 4 and App. E): 8 positive quantiles of
  N(0, 1) at probabilities spaced from δ = 0.9677083 to 1/2, 7 negative ones,
  and 0, scaled so the largest is 1."""
  delta = 0.9677083
  positive = stats.norm.ppf(np.linspace(delta, 0.5, 9)[:-1])
  negative = -stats.norm.ppf(np.linspace(delta, 0.5, 8)[:-1])
  levels = np.sort(np.concatenate([positive, [0.0], negative]))
  levels /= np.abs(levels).max()
  np.testing.assert_allclose(quantized_array.NF4_LEVELS, levels, atol=1e-6)


def reference_dequantized(w: np.ndarray, kind: str, group_size: int) -> np.ndarray:
  """Round-to-nearest absmax quantization in groups along axis -2, float64."""
  n, m = w.shape[-2:]
  groups = w.astype(np.float64).reshape(*w.shape[:-2], n // group_size, group_size, m)
  absmax = np.abs(groups).max(axis=-2, keepdims=True)
  if kind == 'nf4':
    levels = quantized_array.NF4_LEVELS.astype(np.float64)
    nearest = np.abs((groups / absmax)[..., None] - levels).argmin(-1)
    return (levels[nearest] * absmax).reshape(w.shape)
  top = {'int8': 127, 'int4': 7}[kind]
  scale = absmax / top
  return (np.clip(np.rint(groups / scale), -top, top) * scale).reshape(w.shape)


@pytest.mark.parametrize('kind', ['int8', 'int4', 'nf4'])
def test_dequantize_matches_the_formula(kind):
  w = np.random.default_rng(0).standard_normal((3, 64, 24)).astype(np.float32)
  q = quantized_array.quantize_array(w, kind, group_size=16)
  got = np.asarray(quantized_array.dequantize(q))
  want = reference_dequantized(w, kind, 16)
  assert q.shape == w.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  bits = 8 if kind == 'int8' else 4
  assert q.nbytes == w.size * bits // 8 + w.size // 16 * 4  # codes + f32 scales


def test_four_bit_codes_pack_low_nibble_first():
  w = np.zeros((4, 1), np.float32)
  w[:, 0] = [-7, 1, 7, -1]  # int4 codes c = level + 8: 1, 9, 15, 7
  q = quantized_array.quantize_array(w, 'int4', group_size=4)
  assert q.codes.dtype == np.uint8
  np.testing.assert_array_equal(q.codes[:, 0], [1 | 9 << 4, 15 | 7 << 4])


class TiedDense(nn.Module):
  """An embedding (gathered), three residual Dense layers, the tied output
  ``h @ Eᵀ``: the kernels' uses are ``x @ w``, the table's are not."""

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(40, 32, name='embed')
    h = embed(ids)
    for i in range(3):
      h = h + nn.Dense(32, name=f'dense_{i}')(jax.nn.gelu(h))
    return embed.attend(h)


def run_both(model, frozen_float, quantized, rules, ids, factored):
  """Outputs and θ-gradients on the quantized weights and on the same
  weights dequantized up front (plain arrays)."""
  tree = pj.by_rules(rules)
  params, buffers = tree.init(jax.random.key(1), quantized)
  params = references.perturb(params, seed=2, scale=0.1)
  fn = lambda w, ids: model.apply({'params': w}, ids)
  run = pj.adapted(tree, fn, factored=factored)
  out = lambda frozen: references.outputs_and_grad(
    lambda p: run(frozen, p, buffers, ids)
  )(params)
  return out(quantized), out(pj.dequantize(quantized))


def assert_close_trees(got, want, tol):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


@pytest.mark.parametrize('factored', [False, True])
@pytest.mark.parametrize(
  'rules',
  [
    [(r'dense_\d/kernel', 'lora(rank=4)')],
    [(r'dense_\d/kernel', 'dora(rank=4)')],  # uses w beyond x @ w
    [(r'dense_0/kernel', 'ia3()'), ('embed/embedding', None)],
  ],
  ids=['lora', 'dora', 'ia3'],
)
def test_quantized_model_equals_the_dequantized_one(rules, factored):
  model = TiedDense()
  ids = jnp.arange(12).reshape(2, 6) % 40
  frozen = model.init(jax.random.key(0), ids)['params']
  quantized = pj.quantize(frozen, 'nf4', group_size=8, select=r'.*(kernel|embedding)')
  got, want = run_both(model, frozen, quantized, rules, ids, factored)
  assert_close_trees(got, want, 2e-5)


@pytest.mark.parametrize(
  'kind', references.slow_unless(['int8', 'int4', 'nf4'], {'nf4'})
)
def test_scanned_llama_on_quantized_kernels(kind):
  model = llama.LlamaForCausalLM(CONFIG.replace(scan_layers=True))
  ids = jax.random.randint(jax.random.key(3), (2, 8), 0, CONFIG.vocab_size)
  frozen = references.initialised(model)
  quantized = pj.quantize(frozen, kind, group_size=16)
  rules = [(r'layers/.*_proj/kernel', pj.stacked(pj.lora(rank=4)))]
  got, want = run_both(model, frozen, quantized, rules, ids, factored=True)
  assert_close_trees(got, want, 1e-4)


def test_backward_pass_keeps_codes_not_dequantized_kernels(capsys):
  """Residuals for the backward pass hold no (d_in, d_out) float kernel on
  quantized weights (they do on float ones, so the check can fail)."""
  model = TiedDense()
  ids = jnp.arange(12).reshape(2, 6) % 40
  frozen = model.init(jax.random.key(0), ids)['params']
  tree = pj.by_rules([(r'dense_\d/kernel', 'lora(rank=4)')])
  params, buffers = tree.init(jax.random.key(1), frozen)
  fn = lambda w, ids: model.apply({'params': w}, ids)

  def residuals(weights):
    loss = lambda p: pj.adapted(tree, fn, factored=True)(weights, p, buffers, ids).sum()
    print_saved_residuals(loss, params)
    return capsys.readouterr().out

  kernel = 'f32[32,32]'
  assert kernel in residuals(frozen)
  assert kernel not in residuals(pj.quantize(frozen, 'nf4', group_size=8))


class DeepDense(nn.Module):
  """Eight residual 256 x 256 layers, unrolled."""

  @nn.compact
  def __call__(self, h):
    for i in range(8):
      h = h + nn.Dense(256, use_bias=False, name=f'dense_{i}')(jnp.tanh(h))
    return h


def test_compiled_gradient_holds_one_dequantized_kernel_at_a_time():
  """XLA's buffers for the LoRA gradient of an unrolled 8-layer model on nf4
  kernels: temporaries of about one float32 kernel, not eight (before the
  data dependency in dequantized_linear, XLA:CPU merged each backward
  dequantization into the forward one and kept all eight: 8.0 MiB at 512)."""
  model = DeepDense()
  x = jnp.ones((4, 256))
  frozen = pj.quantize(model.init(jax.random.key(0), x)['params'], 'nf4')
  tree = pj.by_rules([(r'dense_\d/kernel', 'lora(rank=4)')])
  params, buffers = tree.init(jax.random.key(1), frozen)
  run = pj.adapted(tree, lambda w, x: model.apply({'params': w}, x), factored=True)
  loss = lambda p: jnp.sum(run(frozen, p, buffers, x) ** 2)
  memory = jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis()
  kernel_bytes = 256 * 256 * 4
  assert memory.temp_size_in_bytes < 2 * kernel_bytes


def test_train_step_on_quantized_weights():
  model = llama.LlamaForCausalLM(CONFIG)
  ids = jax.random.randint(jax.random.key(3), (4, 8), 0, CONFIG.vocab_size)
  frozen = pj.quantize(references.initialised(model), 'nf4', group_size=16)
  tree = pj.by_rules([(KERNELS, 'lora(rank=4)')])
  params, buffers = tree.init(jax.random.key(1), frozen)

  def loss_fn(weights, batch, rng):
    del rng
    logits = model.apply({'params': weights}, batch[:, :-1])
    targets = jax.nn.one_hot(batch[:, 1:], CONFIG.vocab_size)
    return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), -1)), {}

  optimizer = optax.adam(1e-2)
  state = pj.TrainState.create(params, buffers, optimizer, jax.random.key(2))
  step = jax.jit(pj.make_train_step(loss_fn, tree, optimizer, factored=True))
  losses = []
  for _ in range(5):
    state, metrics = step(state, frozen, ids)
    losses.append(float(metrics['loss']))
  assert losses[-1] < losses[0]
  float_bytes = sum(x.nbytes for x in jax.tree.leaves(references.initialised(model)))
  assert quantization.stored_bytes(frozen) < 0.5 * float_bytes


def test_describe_and_count_see_logical_shapes(capsys):
  model = TiedDense()
  frozen = model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))['params']
  quantized = pj.quantize(frozen, 'int8', group_size=8)
  pj.describe([(r'dense_0/kernel', 'lora(rank=2)')], quantized)
  rows = {
    line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
  }
  assert rows['dense_1/kernel'][1:3] == ['(32,', '32)']
  assert rows['dense_0/kernel'][3:5] == ['lora(rank=2)', '128']
  assert rows['trainable'][:4] == [
    'trainable',
    '128',
    'of',
    '4,448',
  ]  # 40·32 + 3·(32·32 + 32)


@pytest.mark.parametrize(
  ('call', 'message'),
  [
    (lambda f: pj.quantize(f, 'fp3'), "unknown quantization kind 'fp3'"),
    (
      lambda f: pj.quantize(f, 'nf4', group_size=5),
      'dense_0/kernel: group_size=5 does not split axis -2 of length 32',
    ),
    (
      lambda f: pj.quantize(f, 'int4', select='('),
      "quantize: select='(' is not a regex",
    ),
    (
      lambda f: pj.quantize(f, 'int4', select='nothing'),
      "select='nothing' matches no float leaf",
    ),
  ],
)
def test_bad_quantization_is_one_line(call, message):
  frozen = TiedDense().init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))['params']
  with pytest.raises(pj.PeftError, match=r'^[^\n]*$') as info:
    call(frozen)
  assert message in str(info.value)
