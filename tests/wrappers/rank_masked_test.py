"""rank_masked: a rank-R LoRA that acts as rank r, against plain jnp."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj

D_IN, D_OUT, R = 7, 9, 6


def masked_leaf(rank, rslora=False):
  """``(adapter, w, params, buffers)`` of one leaf at ``rank``, with random
  nonzero ``a`` and ``b`` (``b`` is 0 at init)."""
  spec = f"rank_masked('lora(rank={R}, alpha=3.0, rslora={rslora})')"
  tree = pj.by_rules([('w', spec)])
  w = jax.random.normal(jax.random.key(0), (D_IN, D_OUT))
  params, buffers = tree.init(jax.random.key(1), {'w': w})
  lora = params['w']._replace(b=jax.random.normal(jax.random.key(2), (R, D_OUT)))
  params, buffers = pj.with_rank({'w': lora}, buffers, rank)
  return pj.get(spec), w, params['w'], buffers['w']


@pytest.mark.parametrize('rslora', [False, True])
@pytest.mark.parametrize('rank', [1, 4, R])
def test_a_rank_r_leaf_is_the_rank_r_lora_in_weight_and_factored_form(rank, rslora):
  adapter, w, params, buffers = masked_leaf(rank, rslora)
  scale = 3.0 / (np.sqrt(rank) if rslora else rank)  # s(r), HF PEFT's rank_pattern
  want = w + scale * params.a[:, :rank] @ params.b[:rank]
  np.testing.assert_allclose(
    adapter.apply(w, params, buffers), want, rtol=1e-6, atol=1e-6
  )
  x = jax.random.normal(jax.random.key(3), (4, D_IN))
  np.testing.assert_allclose(
    adapter.linear.factored(x, w, params, buffers), x @ want, rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    adapter.unapply(want, params, buffers), w, rtol=1e-5, atol=1e-6
  )
  np.testing.assert_array_equal(params.a[:, rank:], 0)
  np.testing.assert_array_equal(params.b[rank:], 0)
  down, up = adapter.factors(params, buffers)
  np.testing.assert_array_equal(down, jnp.where(jnp.arange(R) < rank, params.a, 0))
  np.testing.assert_array_equal(up, params.b)
  # The count is the θ the optimizer holds: R, not r, rank components.
  assert adapter.num_params((D_IN, D_OUT)) == pj.count(params) == R * (D_IN + D_OUT)


def test_init_is_lora_of_rank_r_max():
  w = jax.random.normal(jax.random.key(0), (D_IN, D_OUT))
  masked = pj.rank_masked(pj.lora(rank=R, alpha=3.0))
  params, buffers = masked.init(jax.random.key(1), w)
  plain, _ = pj.lora(rank=R, alpha=3.0).init(jax.random.key(1), w)
  assert int(buffers.rank) == R
  params = params._replace(b=jnp.ones_like(params.b))
  np.testing.assert_array_equal(
    masked.apply(w, params, buffers), pj.lora(rank=R, alpha=3.0).apply(w, params, None)
  )
  np.testing.assert_array_equal(params.a, plain.a)


def test_pad_rank_writes_a_rank_r_lora_in_and_keeps_other_leaves():
  frozen = {
    'w': jax.random.normal(jax.random.key(0), (D_IN, D_OUT)),
    'v': jax.random.normal(jax.random.key(1), (D_IN, D_OUT)),
  }
  low = pj.by_rules([('w', 'lora(rank=2, alpha=3.0)'), ('v', 'dora(rank=1)')])
  padded = pj.by_rules(
    [('w', f"rank_masked('lora(rank={R}, alpha=3.0)')"), ('v', 'dora(rank=1)')]
  )
  params, buffers = low.init(jax.random.key(2), frozen)
  params['w'] = params['w']._replace(b=jnp.ones((2, D_OUT)))
  like = jax.eval_shape(padded.init, jax.random.key(0), frozen)
  got_params, got_buffers = pj.pad_rank(params, buffers, like)
  assert int(got_buffers['w'].rank) == 2
  np.testing.assert_array_equal(got_params['w'].a[:, :2], params['w'].a)
  np.testing.assert_array_equal(got_params['w'].a[:, 2:], 0)
  np.testing.assert_array_equal(got_params['w'].b[2:], 0)
  jax.tree.map(np.testing.assert_array_equal, got_params['v'], params['v'])
  np.testing.assert_allclose(
    pj.merge(padded, frozen, got_params, got_buffers)['w'],
    pj.merge(low, frozen, params, buffers)['w'],
    rtol=1e-6,
  )


def test_stacked_rank_masked_has_a_rank_per_layer():
  w = jax.random.normal(jax.random.key(0), (3, D_IN, D_OUT))
  tree = pj.by_rules([('w', f'stacked("rank_masked(\'lora(rank={R})\')")')])
  params, buffers = pj.with_rank(*tree.init(jax.random.key(1), {'w': w}), 2)
  np.testing.assert_array_equal(buffers['w'].rank, [2, 2, 2])
  np.testing.assert_array_equal(params['w'].a[..., 2:], 0)


def test_bad_input_is_named():
  with pytest.raises(pj.PeftError, match=r'rank_masked wraps lora; got dora\(rank=2\)'):
    pj.rank_masked('dora(rank=2)')
  with pytest.raises(pj.PeftError, match=r'got stacked\(.*wrap the other way round'):
    pj.rank_masked("stacked('lora')")
  _, _, params, buffers = masked_leaf(R)
  with pytest.raises(pj.PeftError, match=rf"with_rank: rank=7 exceeds w's R={R}"):
    pj.with_rank({'w': params}, {'w': buffers}, 7)
  with pytest.raises(pj.PeftError, match='with_rank: rank=0 must be > 0'):
    pj.with_rank({'w': params}, {'w': buffers}, 0)
  with pytest.raises(pj.PeftError, match='pad_rank: the buffers hold no RankMask'):
    pj.pad_rank({'w': params}, None, ({'w': params}, None))


def test_a_padded_adapter_and_its_rank_round_trip_through_an_adapter_file(tmp_path):
  rules = [('w', f"rank_masked('lora(rank={R})')")]
  frozen = {'w': jax.random.normal(jax.random.key(0), (D_IN, D_OUT))}
  params, buffers = pj.with_rank(*pj.by_rules(rules).init(jax.random.key(1), frozen), 3)
  path = str(tmp_path / 'adapter.safetensors')
  pj.save_adapter(path, params, buffers, rules=rules)
  loaded = pj.load_adapter_file(path, frozen)
  assert int(loaded.buffers['w'].rank) == 3
  np.testing.assert_array_equal(loaded.params['w'].a, params['w'].a)


def test_mpc_sees_the_masked_factors():
  """MPC_o on ``(a ⊙ m, b ⊙ mᵀ)``: the rank-r penalty plus 1 per masked
  diagonal entry of each factor's Gram matrix (a constant: no gradient)."""
  adapter, w, params, buffers = masked_leaf(2)
  down, up = params.a[:, :2], params.b[:2]
  gram = lambda g: jnp.sum((jnp.pad(g, (0, R - 2)) - jnp.eye(R)) ** 2)
  want = gram(down.T @ down) + gram(up @ up.T)
  got = pj.mpc(adapter, kind='o', gamma=1.0).regularizer(w, params, buffers)
  np.testing.assert_allclose(got, want, rtol=1e-5)
