"""UniPELT (Mao et al., 2022) through ``pj.recipes.unipelt``: gated LoRA on
query/value, a gated prefix through the shared MLP and a gated Pfeiffer
adapter after the FFN, against the float64 NumPy BERT of
tests/bert_reference.py with every gate written from its formula
``g = mean_s σ(x W_g + b_g)`` of its own input."""

import jax
import jax.numpy as jnp
import numpy as np

import peft_jax as pj
from tests import bert_reference, references
from tests.methods.prefix_tuning_test import CONFIG, DH, H, L, mlp_prefix_np, setup

RANK, HIDDEN, FACTOR = 2, 6, 4
RULES = pj.recipes.unipelt(
  lora_rank=RANK, prefix_length=L, bottleneck=HIDDEN, reduction_factor=FACTOR
)


def f64(x):
  return np.asarray(x, np.float64)


def gate(x, weight, bias):
  """``mean_s σ(x W_g + b_g)``: ``(b, 1, heads)`` for ``x: (b, s, d)``."""
  z = x @ f64(weight) + f64(bias)
  return (1.0 / (1.0 + np.exp(-z))).mean(axis=1, keepdims=True)


def unipelt_edits(params):
  layers = params['encoder']
  shared = params['@shared']['prefix_tuning']

  def projection(i, name):
    if name not in ('query', 'value'):
      return None
    p = layers[f'layer_{i}']['attention'][name]['kernel']
    return lambda x, y: y + gate(x, p.gate, p.gate_bias) * (x @ f64(p.a) @ f64(p.b))

  def prefix(i):
    own = layers[f'layer_{i}']['attention']['attention_kv']
    pk, pv = mlp_prefix_np(shared, own.inner)

    def per_example(x):
      g = gate(x, own.gate.weight, own.gate.bias)[:, :, :, None]  # (b, 1, 1, 1)
      return g * pk[None], g * pv[None]

    return per_example

  def ffn(i):
    p = layers[f'layer_{i}']['ffn_output']

    def sequential(x, h):
      branch = np.maximum(h @ f64(p.down) + f64(p.down_bias), 0) @ f64(p.up)
      return h + gate(h, p.gate, p.gate_bias) * (branch + f64(p.up_bias))

    return sequential

  return bert_reference.Edits(prefix=prefix, ffn=ffn, projection=projection)


def test_unipelt_equals_the_numpy_encoder_with_all_three_gates():
  frozen, hooks, hidden, ids, mask = setup()
  tree = pj.by_rules(RULES)
  params, buffers = tree.init(jax.random.key(0), frozen, hooks)
  params = references.perturb(params, 1, scale=0.5)
  want = bert_reference.encoder(frozen, ids, mask, CONFIG, unipelt_edits(params))
  for factored in (False, True):
    got = jax.jit(pj.adapted(tree, hidden, factored=factored))(
      frozen, params, buffers, ids, mask
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  d, r = CONFIG.hidden_size, CONFIG.hidden_size // FACTOR
  per_layer = (
    2 * (RANK * 2 * d + d + 1)  # gated LoRA on q and v
    + 2 * H * DH * (HIDDEN + 1)
    + d
    + 1  # prefix head and its gate
    + 2 * d * r
    + r
    + d
    + d
    + 1  # gated Pfeiffer
  )
  shared = L * H * DH + H * DH * HIDDEN + HIDDEN
  assert pj.count(params) == CONFIG.num_layers * per_layer + shared


def test_one_optimizer_moves_every_part_and_every_gate():
  frozen, hooks, hidden, ids, mask = setup()
  tree = pj.by_rules(RULES)
  params, buffers = tree.init(jax.random.key(2), frozen, hooks)
  target = jax.random.normal(jax.random.key(3), (*ids.shape, CONFIG.hidden_size))

  def loss_fn(weights, batch, rng):
    del rng
    return jnp.mean((hidden(weights, *batch) - target) ** 2), {}

  state, losses = references.train(
    loss_fn, tree, frozen, params, buffers, (ids, mask), steps=3, lr=1e-2, factored=True
  )
  assert np.all(np.isfinite(losses))
  names = [name for name, _ in pj._src.paths.named_leaves(params)]
  assert any(n.endswith('/gate/weight') for n in names)  # the prefix gates
  for name, before, after in zip(
    names, jax.tree.leaves(params), jax.tree.leaves(state.params), strict=True
  ):
    assert np.any(np.asarray(before) != np.asarray(after)), name
