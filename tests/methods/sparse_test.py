"""sparse: θ = θ0 + M ⊙ Δ with M given by its indices (Fu et al., Definition 1).

Expected values come from NumPy (float64) on the mask itself: the scattered
update, the factored product, its gradient, the ‖θ − θ0‖₀ invariant after
AdamW with weight decay, and the p-sparse file.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_jax as pj
from peft_jax._src import paths
from peft_jax.methods.sparse import encode, flat_indices


def random_mask(rng, shape, k):
  mask = np.zeros(int(np.prod(shape)), bool)
  mask[rng.choice(mask.size, k, replace=False)] = True
  return mask.reshape(shape)


def test_apply_scatters_values_at_the_mask():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(9, 7)).astype(np.float32)
  mask = random_mask(rng, w.shape, 11)
  tree = pj.by_rules(pj.sparse_rules({'d': {'kernel': mask}}))
  params, buffers = tree.init(jax.random.key(0), {'d': {'kernel': w}})
  values = rng.normal(size=11).astype(np.float32)
  params = {'d': {'kernel': params['d']['kernel']._replace(values=jnp.asarray(values))}}

  got = np.asarray(tree.apply({'d': {'kernel': w}}, params, buffers)['d']['kernel'])

  expected = w.astype(np.float64)
  expected[mask] += values  # Boolean indexing is row-major, as the flat indices.
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert np.count_nonzero(got != w) == 11
  back = tree.unapply({'d': {'kernel': got}}, params, buffers)['d']['kernel']
  np.testing.assert_allclose(back, w, atol=1e-6)


def test_gradient_of_the_values_is_the_weight_gradient_at_the_mask():
  rng = np.random.default_rng(1)
  w = rng.normal(size=(6, 4)).astype(np.float32)
  mask = random_mask(rng, w.shape, 8)
  ((_, adapter),) = pj.sparse_rules({'k': mask})
  params, buffers = adapter.init(jax.random.key(0), w)
  x = rng.normal(size=(2, 5, 6)).astype(np.float32)
  cotangent = rng.normal(size=(2, 5, 4))
  grad = jax.grad(lambda p: jnp.sum((x @ adapter.apply(w, p, buffers)) * cotangent))(
    params
  )
  # d/dv_j of Σ (x @ w')·c = (xᵀc)[r_j, c_j]: the dense weight gradient read
  # at the masked entries (row-major, as the flat indices).
  weight_grad = np.einsum('bti,bto->io', x.astype(np.float64), cotangent)
  np.testing.assert_allclose(grad.values, weight_grad[mask], rtol=1e-4, atol=1e-5)
  assert adapter.linear is None  # The factored path applies it in weight space.


def test_random_init_picks_k_distinct_entries_per_key():
  adapter = pj.sparse(k=20)
  w = jnp.zeros((10, 12))
  chosen = [
    np.asarray(flat_indices(adapter.init(jax.random.key(s), w)[1])) for s in (0, 1)
  ]
  for idx in chosen:
    assert idx.shape == (20,) and len(set(idx.tolist())) == 20
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < 120
  assert not np.array_equal(chosen[0], chosen[1])
  assert pj.count(adapter.init(jax.random.key(0), w)[0]) == 20


def test_gaps_are_uint16_unless_a_gap_needs_more():
  assert encode(np.array([3, 70000, 70010])).gaps.dtype == np.uint32
  buffers = encode(np.array([3, 60000, 60010]))
  assert buffers.gaps.dtype == np.uint16
  np.testing.assert_array_equal(flat_indices(buffers), [3, 60000, 60010])


def mlp(rng):
  return {
    'hidden': {'kernel': rng.normal(size=(6, 16)).astype(np.float32)},
    'out': {'kernel': rng.normal(size=(16, 3)).astype(np.float32)},
  }


def test_l0_invariant_holds_after_adamw_with_weight_decay_and_clipping():
  rng = np.random.default_rng(2)
  frozen = mlp(rng)
  mask = {
    name: {'kernel': random_mask(rng, leaf['kernel'].shape, 5)}
    for name, leaf in frozen.items()
  }
  adapter = pj.by_rules(pj.sparse_rules(mask))
  x = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(32, 3)), jnp.float32)

  def loss_fn(weights, batch, rng):
    del rng
    h = jnp.tanh(batch[0] @ weights['hidden']['kernel'])
    return jnp.mean((h @ weights['out']['kernel'] - batch[1]) ** 2), {}

  optimizer = optax.chain(
    optax.clip_by_global_norm(0.1), optax.adamw(1e-1, weight_decay=0.5)
  )
  params, buffers = adapter.init(jax.random.key(0), frozen)
  state = pj.TrainState.create(params, buffers, optimizer, jax.random.key(1))
  step = jax.jit(pj.make_train_step(loss_fn, adapter, optimizer))
  first = None
  for _ in range(50):
    state, metrics = step(state, frozen, (x, y))
    first = first if first is not None else float(metrics['loss'])
  assert float(metrics['loss']) < first

  merged = pj.merge(adapter, frozen, state.params, state.buffers)
  for name, leaf in frozen.items():
    changed = np.asarray(merged[name]['kernel']) != leaf['kernel']
    assert np.count_nonzero(changed) <= 5
    assert not np.any(changed & ~mask[name]['kernel'])
  # The optimizer state is k-sized: two Adam moments of 5 values per leaf.
  moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) == 1]
  assert sorted(np.size(m) for m in moments) == [5] * 4


# all-MiniLM-L6-v2's parameter shapes (config: 6 layers, hidden 384, FFN 1536,
# vocabulary 30522, 512 positions, 2 token types), kernels and embeddings:
# 22.5M parameters.
def minilm_shapes():
  d, f = 384, 1536
  shapes = {'embeddings/word': (30522, d), 'embeddings/position': (512, d)}
  shapes['embeddings/type'] = (2, d)
  for i in range(6):
    for name in ('query', 'key', 'value', 'output'):
      shapes[f'layer_{i}/attention/{name}/kernel'] = (d, d)
    shapes[f'layer_{i}/intermediate/kernel'] = (d, f)
    shapes[f'layer_{i}/output/kernel'] = (f, d)
  return shapes


def test_p_sparse_file_of_a_half_percent_minilm_mask_is_small_and_exact(tmp_path):
  rng = np.random.default_rng(3)
  shapes = minilm_shapes()
  total = sum(int(np.prod(s)) for s in shapes.values())
  # A global mask: about 0.5% of all entries together.
  flat = rng.random(total) < 0.005
  k_total = int(flat.sum())
  cuts = np.cumsum([int(np.prod(s)) for s in shapes.values()])[:-1]
  pieces = np.split(flat, cuts)
  mask = {n: m.reshape(s) for (n, s), m in zip(shapes.items(), pieces, strict=True)}
  frozen = paths.nest(
    {n: jax.ShapeDtypeStruct(s, jnp.float32) for n, s in shapes.items()}
  )
  adapter = pj.by_rules(pj.sparse_rules(paths.nest(mask)))
  params, buffers = jax.jit(lambda key: adapter.init(key, frozen))(jax.random.key(0))
  params = jax.tree.map(
    lambda v: jnp.asarray(rng.normal(size=v.shape).astype(v.dtype)), params
  )
  path = tmp_path / 'sparse.safetensors'
  pj.save_adapter(str(path), params, buffers, {'p': 0.005})

  assert pj.count(params) == k_total
  # 6 bytes per changed entry (a float32 value and a uint16 gap): 0.68 MB.
  assert path.stat().st_size < 0.7e6, path.stat().st_size
  like = jax.eval_shape(adapter.init, jax.random.key(0), frozen)
  got_params, got_buffers, meta = pj.load_adapter(str(path), like)
  assert meta['p'] == 0.005
  for name, leaf_mask in mask.items():
    got, sent = paths.subtree(got_params, name), paths.subtree(params, name)
    np.testing.assert_array_equal(got.values, sent.values)  # Bit-exact.
    gaps = np.asarray(paths.subtree(got_buffers, name).gaps, np.int64)
    indices = np.cumsum(gaps)  # The stored gaps decoded in NumPy.
    np.testing.assert_array_equal(indices, np.flatnonzero(leaf_mask))


@pytest.mark.parametrize(
  'call, message',
  [
    (lambda: pj.sparse(k=0), 'k=0'),
    (
      lambda: pj.sparse(k=50).init(jax.random.key(0), jnp.zeros((4, 5))),
      'k=50 exceeds',
    ),
    (lambda: pj.sparse_rules({'w': np.ones((2, 2), np.float32)}), 'not bool'),
    (
      lambda: pj.sparse_rules({'w': np.ones((2, 2), bool)})[0][1].init(
        jax.random.key(0), jnp.zeros((3, 2))
      ),
      r'mask has shape \(2, 2\)',
    ),
  ],
)
def test_bad_input_is_a_one_line_error(call, message):
  with pytest.raises(pj.PeftError, match=message):
    call()
