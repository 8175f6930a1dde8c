"""One battery of checks run over every registered method (optax-style).

Each registered method needs a row in CASES: a small spec and a leaf shape
(non-square, so a transposed factor cannot pass). A new method without a row
fails ``test_every_method_has_a_case``. Methods that are not mergeable (they
have no weight-space ``apply``) are checked through their factored form.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax._src import paths, registry

# name -> (spec, leaf shape, identity at init per the spec)
CASES = {
  'lora': ('lora(rank=3, alpha=6)', (7, 5), True),
  'ia3': ('ia3()', (7, 5), True),
  'ssl': ('ssl()', (7, 5), True),
  'ssb': ('ssb()', (7, 5), True),
  'full': ('full()', (7, 5), True),
  'bitfit': ('bitfit()', (5,), True),
  'stacked': ('stacked("lora(rank=2, alpha=4)")', (3, 7, 5), True),
  'matrix_view': ('matrix_view("lora(rank=2, alpha=4)", n_in=2)', (2, 3, 5), True),
  # Reconstruction and combination (SVD-based).
  'sam_parser': ('sam_parser()', (7, 5), True),
  'pissa': ('pissa(rank=3, alpha=6)', (7, 5), True),
  'milora': ('milora(rank=3, alpha=6)', (7, 5), True),
  'svdiff': ('svdiff()', (7, 5), True),
  'spectral_adapter': ('spectral_adapter(rank=3, alpha=6)', (7, 5), True),
  'dora': ('dora(rank=3, alpha=6)', (7, 5), True),
  'ln_tuning': ('ln_tuning()', (5,), True),
  # Extension: low-rank family and matrix pattern constraints.
  'adalora': ('adalora(rank=3, alpha=6)', (7, 5), True),
  'flora': ('flora(rank=3, alpha=6)', (7, 5), True),
  'moslora': ('moslora(rank=3, alpha=6)', (7, 5), True),
  'trilora': ('trilora(rank=3, alpha=6)', (7, 5), True),
  'liera': ('liera(rank=3, alpha=3)', (7, 5), True),
  'vera': ('vera(rank=4)', (7, 5), True),
  'parallel_adapter': ('parallel_adapter(rank=3)', (7, 5), True),
  'mpc': ("mpc('trilora(rank=3, alpha=6)', kind='d')", (7, 5), True),
  'loha': ('loha(rank=2, alpha=4)', (7, 5), True),
  'lokr': ('lokr(rank=2, alpha=4)', (12, 8), True),
  'compacter': ('compacter(reduction_factor=2, n=2)', (8, 6), True),
  'intrinsic_said': ('intrinsic_said(dim=4)', (7, 5), True),
  # Orthogonal.
  'oft': ('oft(block_size=3)', (6, 5), True),
  'boft': ('boft(block_size=2, n_butterfly_factor=2)', (8, 5), True),
  # With training-time schedules (peft_jax.schedules).
  'lora_dash': ('lora_dash(rank=2, alpha=4, n_directions=2)', (7, 5), True),
  'flexlora': ('flexlora(rank=2, alpha=4, max_rank=3)', (7, 5), True),
}

# Trainable leaves that are inert until a schedule acts: LoRA-Dash's d gets
# zero gradient until lora_dash_schedule selects its directions.
INACTIVE_UNTIL_SCHEDULED = {'lora_dash': ('d',)}


def names_where(predicate):
  return [
    n for n in sorted(CASES) if n in pj.names() and predicate(pj.get(CASES[n][0]))
  ]


MERGEABLE = names_where(lambda a: a.mergeable)
FACTORED = names_where(lambda a: a.factored is not None)


def perturbed(theta, key):
  """Trainable parameters moved away from their init (so checks are not trivial)."""
  flat = paths.flatten(theta)
  keys = dict(zip(flat, jax.random.split(key, len(flat)), strict=True))

  def move(name, t):
    if paths.is_buffer(name):
      return t
    return t + 0.3 * jax.random.normal(keys[name], t.shape, t.dtype)

  return paths.map_named(move, theta)


def setup(name, dtype=jnp.float32, seed=0):
  spec, shape, _ = CASES[name]
  adapter = pj.get(spec)
  kw, ki, kp = jax.random.split(jax.random.key(seed), 3)
  w = jax.random.normal(kw, shape, jnp.float32).astype(dtype)
  theta0 = adapter.init(ki, w)
  return adapter, w, theta0, perturbed(theta0, kp)


def in_axes(adapter) -> int:
  """Leading input axes of the kernel (``matrix_view`` kernels have several)."""
  return adapter.kernel_in_axes or 1


def dense(adapter, x, w):
  """``x`` contracted with the kernel's input axes, as a Dense layer does."""
  return jnp.tensordot(x, w, axes=in_axes(adapter))


def inputs(adapter, w, batch, seed):
  shape = (*batch, *w.shape[: in_axes(adapter)])
  return jax.random.normal(jax.random.key(seed), shape)


def forward(adapter, x, w, theta):
  """``x @ w'``: the merged weight if mergeable, else the factored form."""
  if adapter.mergeable:
    return dense(adapter, x, pj.merge(adapter, w, theta))
  return adapter.factored(x, w, theta)


def test_every_method_has_a_case():
  assert sorted(CASES) == pj.names()


@pytest.mark.parametrize('name', sorted(CASES))
def test_registry_and_factory_give_the_same_adapter(name):
  _, args, kwargs = registry._parse(CASES[name][0])
  adapter = pj.get(CASES[name][0])
  assert getattr(pj, name)(*args, **kwargs) is adapter
  assert adapter.name.startswith(f'{name}(')
  assert adapter is pj.get(adapter.name)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('name', MERGEABLE)
def test_apply_keeps_shape_and_dtype_and_jits(name, dtype):
  adapter, w, _, theta = setup(name, dtype)
  eager = adapter.apply(w, theta)
  jitted = jax.jit(adapter.apply)(w, theta)
  assert eager.shape == w.shape and eager.dtype == w.dtype
  np.testing.assert_allclose(
    np.asarray(eager, np.float32), np.asarray(jitted, np.float32), rtol=1e-6, atol=1e-6
  )


# SVD-initialised methods reproduce w only up to float32 SVD round-off.
SVD_METHODS = ('pissa', 'milora', 'sam_parser', 'svdiff', 'spectral_adapter')


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('name', [n for n in MERGEABLE if CASES[n][2]])
def test_identity_at_init(name, dtype):
  adapter, w, theta0, _ = setup(name, dtype)
  exact = not adapter.name.startswith(SVD_METHODS)
  atol = 0 if exact else (1e-2 if dtype == jnp.bfloat16 else 1e-5)
  np.testing.assert_allclose(
    np.asarray(adapter.apply(w, theta0), np.float32),
    np.asarray(w, np.float32),
    atol=atol,
  )


@pytest.mark.parametrize('name', [n for n in sorted(CASES) if CASES[n][2]])
def test_factored_identity_at_init(name):
  adapter, w, theta0, _ = setup(name)
  if adapter.factored is None:
    pytest.skip('no factored form')
  x = inputs(adapter, w, (3,), 5)
  np.testing.assert_allclose(
    adapter.factored(x, w, theta0), dense(adapter, x, w), rtol=1e-5, atol=1e-5
  )


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
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b
  )


@pytest.mark.parametrize('name', FACTORED)
def test_factored_equals_merged_forward_and_gradients(name):
  adapter, w, _, theta = setup(name)
  if not adapter.mergeable:
    pytest.skip('no weight-space form to compare with')
  x = inputs(adapter, w, (4, 2), 9)
  target = jax.random.normal(jax.random.key(10), dense(adapter, x, w).shape)

  def merged_loss(theta, x):
    return jnp.sum(jnp.tanh(dense(adapter, x, pj.merge(adapter, w, theta))) * target)

  def factored_loss(theta, x):
    return jnp.sum(jnp.tanh(adapter.factored(x, w, theta)) * target)

  np.testing.assert_allclose(
    adapter.factored(x, w, theta),
    dense(adapter, x, adapter.apply(w, theta)),
    rtol=1e-5,
    atol=1e-5,
  )
  grad_merged = jax.grad(merged_loss, argnums=(0, 1))(theta, x)
  grad_factored = jax.jit(jax.grad(factored_loss, argnums=(0, 1)))(theta, x)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
    grad_merged,
    grad_factored,
  )


@pytest.mark.parametrize('name', names_where(lambda a: a.unapply is not None))
def test_unapply_inverts_apply(name):
  adapter, w, _, theta = setup(name)
  np.testing.assert_allclose(
    adapter.unapply(adapter.apply(w, theta), theta), w, rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize('name', names_where(lambda a: not a.mergeable))
def test_non_mergeable_methods_refuse_to_merge(name):
  adapter, w, _, theta = setup(name)
  with pytest.raises(pj.PeftError, match='not mergeable'):
    pj.merge(adapter, w, theta)


@pytest.mark.parametrize('name', sorted(CASES))
def test_gradient_reaches_every_trainable_leaf(name):
  adapter, w, _, theta = setup(name)
  if w.ndim == 2 or adapter.kernel_in_axes:
    x = inputs(adapter, w, (6,), 4)
    out = lambda t: forward(adapter, x, w, t)
  else:
    out = lambda t: adapter.apply(w, t)
  probe = jax.random.normal(jax.random.key(8), out(theta).shape)
  grads = jax.grad(lambda t: jnp.sum(jnp.sin(out(t)) * probe))(theta)
  inert = INACTIVE_UNTIL_SCHEDULED.get(name, ())
  for name_, leaf in paths.named_leaves(grads):
    if paths.is_buffer(name_):
      continue
    assert np.all(np.isfinite(leaf)), name_
    if name_ in inert:
      np.testing.assert_array_equal(leaf, 0, err_msg=name_)
    else:
      assert np.any(leaf != 0), name_


@pytest.mark.parametrize('name', MERGEABLE)
def test_works_through_by_rules(name):
  spec, shape, _ = CASES[name]
  frozen = {'block': {'leaf': jnp.ones(shape)}, 'other': jnp.ones(shape)}
  tree_adapter = pj.by_rules([('block/leaf', spec)])
  theta = tree_adapter.init(jax.random.key(0), frozen)
  out = jax.jit(tree_adapter.apply)(frozen, theta)
  assert jax.tree.structure(out) == jax.tree.structure(frozen)
  np.testing.assert_array_equal(out['other'], frozen['other'])


@pytest.mark.parametrize('name', names_where(lambda a: a.factors is not None))
def test_factors_are_low_rank_down_and_up(name):
  adapter, w, theta0, _ = setup(name)
  down, up = adapter.factors(theta0)
  n_in = in_axes(adapter)
  assert down.shape[0] == np.prod(w.shape[:n_in]) and up.shape[1] == np.prod(
    w.shape[n_in:]
  )
  assert down.shape[1] == up.shape[0]


@pytest.mark.parametrize('name', sorted(CASES))
def test_init_arrays_share_no_buffer(name):
  """Donating the train state must never see one buffer twice (or free w)."""
  _, w, theta0, _ = setup(name)
  pointers = [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(theta0)]
  pointers.append(w.unsafe_buffer_pointer())
  assert len(set(pointers)) == len(pointers)
