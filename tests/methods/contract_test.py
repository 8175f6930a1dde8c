"""One battery of checks run over every registered method (optax-style).

Each registered method needs a row in CASES: a small spec and a leaf shape
(non-square, so a transposed factor cannot pass). A new method without a row
fails ``test_every_method_has_a_case``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj

# name -> (spec, leaf shape, identity at init per the spec)
CASES = {
  'lora': ('lora(rank=3, alpha=6)', (7, 5), True),
  'ia3': ('ia3()', (7, 5), True),
  'ssl': ('ssl()', (7, 5), True),
  'ssb': ('ssb()', (7, 5), True),
  'full': ('full()', (7, 5), True),
  'bitfit': ('bitfit()', (5,), True),
}


def perturbed(theta, key):
  """Adapter parameters moved away from their init (so checks are not trivial)."""
  leaves, treedef = jax.tree.flatten(theta)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten(
    [
      t + 0.3 * jax.random.normal(k, t.shape, t.dtype)
      for t, k in zip(leaves, keys, strict=True)
    ]
  )


def setup(name, dtype=jnp.float32, seed=0):
  spec, shape, _ = CASES[name]
  adapter = pj.get(spec)
  kw, ki, kp = jax.random.split(jax.random.key(seed), 3)
  w = jax.random.normal(kw, shape, jnp.float32).astype(dtype)
  theta0 = adapter.init(ki, w)
  return adapter, w, theta0, perturbed(theta0, kp)


def test_every_method_has_a_case():
  assert sorted(CASES) == pj.names()


@pytest.mark.parametrize('name', sorted(CASES))
def test_registry_and_factory_give_the_same_adapter(name):
  assert getattr(pj, name)() is pj.get(name)
  adapter = pj.get(CASES[name][0])
  assert adapter.name.startswith(f'{name}(')
  assert adapter is pj.get(adapter.name)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('name', sorted(CASES))
def test_apply_keeps_shape_and_dtype_and_jits(name, dtype):
  adapter, w, _, theta = setup(name, dtype)
  eager = adapter.apply(w, theta)
  jitted = jax.jit(adapter.apply)(w, theta)
  assert eager.shape == w.shape and eager.dtype == w.dtype
  np.testing.assert_allclose(
    np.asarray(eager, np.float32), np.asarray(jitted, np.float32), rtol=1e-6, atol=1e-6
  )


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('name', [n for n, c in CASES.items() if c[2]])
def test_identity_at_init(name, dtype):
  adapter, w, theta0, _ = setup(name, dtype)
  np.testing.assert_array_equal(np.asarray(adapter.apply(w, theta0)), np.asarray(w))


@pytest.mark.parametrize('name', sorted(CASES))
def test_trainable_count_matches_formula(name):
  adapter, w, theta0, _ = setup(name)
  assert adapter.num_params is not None, f'{name} declares no count formula'
  assert pj.count(theta0) == adapter.num_params(w.shape)


@pytest.mark.parametrize('name', sorted(CASES))
def test_init_is_deterministic_and_jittable(name):
  adapter, w, _, _ = setup(name)
  key = jax.random.key(3)
  a = adapter.init(key, w)
  b = jax.jit(adapter.init)(key, w)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize('name', [n for n in sorted(CASES) if pj.get(n).factored])
def test_factored_equals_merged_forward_and_gradients(name):
  adapter, w, _, theta = setup(name)
  x = jax.random.normal(jax.random.key(9), (4, 2, w.shape[0]))
  target = jax.random.normal(jax.random.key(10), (4, 2, w.shape[1]))

  def merged_loss(theta, x):
    return jnp.sum(jnp.tanh(x @ pj.merge(adapter, w, theta)) * target)

  def factored_loss(theta, x):
    return jnp.sum(jnp.tanh(adapter.factored(x, w, theta)) * target)

  np.testing.assert_allclose(
    adapter.factored(x, w, theta), x @ adapter.apply(w, theta), rtol=1e-5, atol=1e-5
  )
  grad_merged = jax.grad(merged_loss, argnums=(0, 1))(theta, x)
  grad_factored = jax.jit(jax.grad(factored_loss, argnums=(0, 1)))(theta, x)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
    grad_merged,
    grad_factored,
  )


@pytest.mark.parametrize('name', [n for n in sorted(CASES) if pj.get(n).unapply])
def test_unapply_inverts_apply(name):
  adapter, w, _, theta = setup(name)
  np.testing.assert_allclose(
    adapter.unapply(adapter.apply(w, theta), theta), w, rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize('name', sorted(CASES))
def test_gradient_reaches_every_adapter_leaf(name):
  adapter, w, _, theta = setup(name)
  probe = jax.random.normal(jax.random.key(4), w.shape)
  grads = jax.grad(lambda t: jnp.sum(jnp.sin(adapter.apply(w, t)) * probe))(theta)
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf)) and np.any(leaf != 0)


@pytest.mark.parametrize('name', sorted(CASES))
def test_works_through_by_rules(name):
  spec, shape, _ = CASES[name]
  frozen = {'block': {'leaf': jnp.ones(shape)}, 'other': jnp.ones(shape)}
  tree_adapter = pj.by_rules([('block/leaf', spec)])
  theta = tree_adapter.init(jax.random.key(0), frozen)
  out = jax.jit(tree_adapter.apply)(frozen, theta)
  assert jax.tree.structure(out) == jax.tree.structure(frozen)
  assert out['other'] is frozen['other'] or np.array_equal(
    out['other'], frozen['other']
  )
