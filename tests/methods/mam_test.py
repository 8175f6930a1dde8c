"""MAM (He et al., 2022) as a composition: LoRA on the query/value kernels,
prefix tuning through its shared MLP at every ``attention_kv`` and a scaled
parallel adapter at every ``ffn_block``, in one θ, one optimizer, one
checkpoint and one ``describe`` table. The forward pass is checked against
the float64 NumPy BERT of tests/bert_reference.py with all three written
from their formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from tests import bert_reference, references
from tests.methods.prefix_tuning_test import CONFIG, DH, H, L, mlp_prefix_np, setup

RANK, ALPHA, HIDDEN, R, SCALE = 2, 4.0, 6, 4, 2.0
RULES = [
  ('.*/attention/(query|value)/kernel', f'lora(rank={RANK}, alpha={ALPHA})'),
  *pj.recipes.mam(prefix_length=L, bottleneck=HIDDEN, rank=R, scale=SCALE),
]


def f64(x):
  return np.asarray(x, np.float64)


def lora_weights(frozen, params):
  """``w + (α/r)·a@b`` on the query and value kernels, in float64 NumPy."""
  out = jax.tree.map(f64, frozen)
  for i in range(CONFIG.num_layers):
    attention = out['encoder'][f'layer_{i}']['attention']
    for name in ('query', 'value'):
      p = params['encoder'][f'layer_{i}']['attention'][name]['kernel']
      attention[name]['kernel'] = attention[name]['kernel'] + (ALPHA / RANK) * (
        f64(p.a) @ f64(p.b)
      )
  return out


def mam_edits(params):
  """Prefix and scaled parallel FFN branch of layer ``i`` from the formulas."""
  layers = params['encoder']
  shared = params['@shared']['prefix_tuning']

  def prefix(i):
    return mlp_prefix_np(shared, layers[f'layer_{i}']['attention']['attention_kv'])

  def ffn(i):
    p = layers[f'layer_{i}']['ffn_block']
    branch = lambda x: np.maximum(x @ f64(p.down) + f64(p.down_bias), 0) @ f64(p.up)
    return lambda x, h: h + SCALE * branch(x)

  return bert_reference.Edits(prefix=prefix, ffn=ffn)


@pytest.mark.parametrize('factored', [False, True])
def test_mam_equals_the_numpy_encoder_with_all_three_parts(factored):
  frozen, hooks, hidden, ids, mask = setup()
  tree = pj.by_rules(RULES)
  params, buffers = tree.init(jax.random.key(0), frozen, hooks)
  params = references.perturb(params, 1)
  assert not tree.mergeable
  want = bert_reference.encoder(
    lora_weights(frozen, params), ids, mask, CONFIG, mam_edits(params)
  )
  got = jax.jit(pj.adapted(tree, hidden, factored=factored))(
    frozen, params, buffers, ids, mask
  )
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_one_optimizer_trains_every_part_and_one_file_holds_them(tmp_path):
  frozen, hooks, hidden, ids, mask = setup()
  tree = pj.by_rules(RULES)
  params, buffers = tree.init(jax.random.key(2), frozen, hooks)
  target = jax.random.normal(jax.random.key(3), (*ids.shape, CONFIG.hidden_size))

  def loss_fn(weights, batch, rng):
    del rng
    out = hidden(weights, *batch)
    return jnp.mean((out - target) ** 2), {}

  state, losses = references.train(
    loss_fn, tree, frozen, params, buffers, (ids, mask), steps=5, lr=1e-2
  )
  assert losses[-1] < losses[0]
  # Every trainable leaf moved: LoRA's a and b, the shared MLP, every
  # layer's prefix head and FFN branch.
  names = [name for name, _ in pj._src.paths.named_leaves(params)]
  for name, before, after in zip(
    names, jax.tree.leaves(params), jax.tree.leaves(state.params), strict=True
  ):
    assert np.any(np.asarray(before) != np.asarray(after)), name
  assert any(n.startswith('@shared/prefix_tuning/') for n in names)
  path = str(tmp_path / 'mam.safetensors')
  pj.save_adapter(path, state.params, state.buffers, {'rules': repr(RULES)})
  like = jax.eval_shape(lambda k: tree.init(k, frozen, hooks), jax.random.key(0))
  loaded, _, _ = pj.load_adapter(path, like)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(state.params), strict=True):
    np.testing.assert_array_equal(a, b)


def test_describe_has_one_table_for_all_three_and_merge_names_what_stays():
  frozen, hooks, *_ = setup()
  lines = []
  pj.describe(RULES, frozen, hooks, print_fn=lines.append)
  table = lines[0]
  assert 'lora(rank=2, alpha=4.0)' in table
  assert '@shared/prefix_tuning' in table and 'scaled_parallel' in table
  tree = pj.by_rules(RULES)
  params, buffers = tree.init(jax.random.key(0), frozen, hooks)
  total = pj.count(params)
  per_layer = (
    2 * (RANK * 2 * CONFIG.hidden_size)  # LoRA on q and v
    + 2 * H * DH * (HIDDEN + 1)  # prefix head
    + 2 * CONFIG.hidden_size * R
    + R  # FFN branch
  )
  shared = L * H * DH + H * DH * HIDDEN + HIDDEN
  assert total == CONFIG.num_layers * per_layer + shared
  assert f'{total:,}' in table
  with pytest.raises(
    pj.PeftError,
    match=r'prefix_tuning at 2 hook points .*scaled_parallel at 2 hook points',
  ):
    pj.merge(tree, frozen, params, buffers)
