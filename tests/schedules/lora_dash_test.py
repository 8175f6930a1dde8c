"""LoRA-Dash: the layer against the spec, and the direction selection by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_jax as pj
from peft_jax.methods.lora_dash import lora_dash
from peft_jax.schedules.lora_dash import lora_dash_schedule, select_directions

D_IN, D_OUT = 7, 5


def random_theta(seed, rank, n):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  return {
    'a': normal(D_IN, rank),
    'b': normal(rank, D_OUT),
    'd': normal(n),
    'buffers': {'v': normal(D_IN, n), 'u': normal(D_OUT, n)},
  }


@pytest.mark.parametrize('rank,alpha,n', [(1, 2.0, 1), (3, 16.0, 2), (4, 4.0, 5)])
def test_apply_and_factored_match_spec(rank, alpha, n):
  w = np.random.default_rng(1).normal(size=(D_IN, D_OUT)).astype(np.float32)
  theta = random_theta(2, rank, n)
  # Spec, PyTorch layout: W' = W + s·BA + U_I diag(d) V_Iᵀ, s = α/r.
  W, A, B = (np.float64(m).T for m in (w, theta['a'], theta['b']))
  U, V = np.float64(theta['buffers']['u']), np.float64(theta['buffers']['v'])
  expected = W + alpha / rank * B @ A + U @ np.diag(np.float64(theta['d'])) @ V.T
  adapter = lora_dash(rank, alpha, n_directions=n)
  np.testing.assert_allclose(adapter.apply(w, theta).T, expected, rtol=1e-5, atol=1e-5)
  x = np.random.default_rng(3).normal(size=(4, D_IN))
  np.testing.assert_allclose(
    adapter.factored(np.float32(x), w, theta), x @ expected.T, rtol=1e-4, atol=1e-4
  )
  np.testing.assert_allclose(
    adapter.unapply(adapter.apply(w, theta), theta), w, rtol=1e-5, atol=1e-5
  )


def test_init_is_lora_with_an_inactive_dash_so_identity():
  d_in, d_out, rank, n = 512, 64, 8, 4
  w = jax.random.normal(jax.random.key(1), (d_in, d_out))
  adapter = lora_dash(rank, n_directions=n)
  theta = adapter.init(jax.random.key(0), w)
  a = np.asarray(theta['a'], np.float64)
  bound = 1 / np.sqrt(d_in)  # KU(d_in), LoRA's default.
  assert np.all(np.abs(a) <= bound) and np.abs(a).max() > 0.95 * bound
  np.testing.assert_allclose(a.var(), bound**2 / 3, rtol=0.05)
  for name, shape in (('b', (rank, d_out)), ('d', (n,))):
    assert theta[name].shape == shape
    np.testing.assert_array_equal(theta[name], 0)
  for name, shape in (('v', (d_in, n)), ('u', (d_out, n))):
    assert theta['buffers'][name].shape == shape
    np.testing.assert_array_equal(theta['buffers'][name], 0)
  np.testing.assert_array_equal(adapter.apply(w, theta), w)
  assert pj.count(theta) == adapter.num_params(w.shape) == rank * (d_in + d_out) + n


def known_svd_problem():
  """``w = v diag(σ) uᵀ`` and ``Δw = v diag(δ) uᵀ`` with chosen σ and δ."""
  rng = np.random.default_rng(0)
  v, _ = np.linalg.qr(rng.normal(size=(D_IN, 5)))
  u, _ = np.linalg.qr(rng.normal(size=(D_OUT, 5)))
  sigma = np.array([8.0, 4.0, 2.0, 1.0, 0.5])
  delta = np.array([0.8, -0.8, 0.1, -0.3, 0.0])
  # c = |δ|/σ = [0.1, 0.2, 0.05, 0.3, 0]: the top-2 are 3 then 1, while the
  # largest |δ| are 0 and 1.
  w = np.float32((v * sigma) @ u.T)
  return w, v, u, delta, [3, 1]


def assert_same_directions(v_got, u_got, v, u, chosen):
  """Each chosen triplet's ``v_i u_iᵀ`` (sign-free), in order."""
  for j, i in enumerate(chosen):
    np.testing.assert_allclose(
      np.outer(v_got[:, j], u_got[:, j]), np.outer(v[:, i], u[:, i]), atol=1e-5
    )


def test_selects_the_directions_with_the_largest_relative_change():
  w, v, u, delta, chosen = known_svd_problem()
  v_got, u_got = select_directions(jnp.asarray(w), (v * delta) @ u.T, 2)
  assert v_got.shape == (D_IN, 2) and u_got.shape == (D_OUT, 2)
  assert_same_directions(v_got, u_got, v, u, chosen)


def dash_tree(warmup=5):
  w, v, u, delta, chosen = known_svd_problem()
  frozen = {'m': {'kernel': jnp.asarray(w)}, 'other': {'kernel': jnp.ones((4, 3))}}
  adapter = pj.by_rules(
    [('m/kernel', lora_dash(4, 8.0, n_directions=2)), ('other/kernel', 'lora(rank=2)')]
  )
  theta = adapter.init(jax.random.key(0), frozen)
  scale = 8.0 / 4
  # s · a @ b = v diag(δ) uᵀ with a rank-4 factorisation.
  theta['m']['kernel']['a'] = jnp.float32(v[:, :4] * delta[:4] / scale)
  theta['m']['kernel']['b'] = jnp.float32(u[:, :4].T)
  schedule = lora_dash_schedule(adapter, warmup_steps=warmup)
  return adapter, schedule, frozen, theta, (v, u, chosen)


def test_the_schedule_stores_the_directions_at_the_warmup_step_only():
  _, schedule, frozen, theta, (v, u, chosen) = dash_tree(warmup=5)
  update = jax.jit(schedule.update)
  state = schedule.init(frozen, theta)
  before, _, _ = update(state, frozen, theta, theta, (), 4)
  jax.tree.map(np.testing.assert_array_equal, before, theta)
  after, _, _ = update(state, frozen, theta, theta, (), 5)
  buffers = after['m']['kernel']['buffers']
  assert_same_directions(buffers['v'], buffers['u'], v, u, chosen)
  for key in ('a', 'b', 'd'):
    np.testing.assert_array_equal(after['m']['kernel'][key], theta['m']['kernel'][key])
  jax.tree.map(np.testing.assert_array_equal, after['other'], theta['other'])
  later = {
    **after,
    'm': {'kernel': {**after['m']['kernel'], 'a': -theta['m']['kernel']['a']}},
  }
  again, _, _ = update(state, frozen, later, later, (), 6)  # No second selection.
  jax.tree.map(np.testing.assert_array_equal, again, later)


def test_factored_equals_weight_space_after_selection():
  _, schedule, frozen, theta, _ = dash_tree()
  theta, _, _ = schedule.update((), frozen, theta, theta, (), 5)
  leaf_adapter = lora_dash(4, 8.0, n_directions=2)
  w, leaf_theta = frozen['m']['kernel'], dict(theta['m']['kernel'])
  leaf_theta['d'] = jnp.array([0.7, -1.3])
  x = jax.random.normal(jax.random.key(3), (3, D_IN))
  np.testing.assert_allclose(
    leaf_adapter.factored(x, w, leaf_theta),
    x @ leaf_adapter.apply(w, leaf_theta),
    rtol=1e-5,
    atol=1e-5,
  )
  grad = lambda f: jax.grad(lambda t: jnp.sum(jnp.sin(f(t))))(leaf_theta)
  jax.tree.map(
    lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-4, atol=1e-5),
    grad(lambda t: leaf_adapter.factored(x, w, t)),
    grad(lambda t: x @ leaf_adapter.apply(w, t)),
  )


def test_d_is_inactive_before_the_switch_and_trains_after():
  w, _, _, _, _ = known_svd_problem()
  frozen = {'m': {'kernel': jnp.asarray(w)}}
  adapter = pj.by_rules([('m/kernel', lora_dash(2, 4.0, n_directions=2))])
  schedule = lora_dash_schedule(adapter, warmup_steps=3)
  target = jax.random.normal(jax.random.key(7), (16, D_OUT))

  def loss_fn(params, batch, rng):
    del rng
    return jnp.mean((batch @ params['m']['kernel'] - target) ** 2), {}

  optimizer = optax.adamw(1e-2, weight_decay=0.1)  # Decay must not move d either.
  state = pj.TrainState.create(
    adapter.init(jax.random.key(1), frozen),
    optimizer,
    jax.random.key(2),
    schedule=schedule,
    frozen=frozen,
  )
  step = jax.jit(pj.make_train_step(loss_fn, adapter, optimizer, schedule=schedule))
  x = jax.random.normal(jax.random.key(4), (16, D_IN))
  history = []
  for _ in range(6):
    grads = jax.grad(lambda t: loss_fn(adapter.apply(frozen, t), x, None)[0])(
      state.params
    )
    state, _ = step(state, frozen, x)
    history.append((grads['m']['kernel'], state.params['m']['kernel']))
  for t in range(3):  # Updates 1..3: the d-term is zero, with zero gradient.
    grads, leaf = history[t]
    assert np.any(grads['b'] != 0)
    np.testing.assert_array_equal(grads['d'], 0)
    np.testing.assert_array_equal(leaf['d'], 0)
  for t in range(2):  # Update 3 ends with the selection.
    np.testing.assert_array_equal(history[t][1]['buffers']['v'], 0)
  v = history[2][1]['buffers']['v']
  np.testing.assert_allclose(v.T @ v, np.eye(2), atol=1e-5)  # Orthonormal bases.
  grads, leaf = history[5]
  assert np.all(grads['d'] != 0) and np.all(leaf['d'] != 0)
  assert np.all(leaf['a'] != history[2][1]['a'])  # A and B keep training.
  assert step._cache_size() == 1


@pytest.mark.parametrize(
  'kwargs,message',
  [
    ({'rank': 0}, 'rank=0 must be > 0'),
    ({'rank': 6}, r'rank=6 exceeds min\(d_in, d_out\)=5'),
    ({'n_directions': 0}, 'n_directions=0 must be > 0'),
    ({'n_directions': 6}, r'n_directions=6 exceeds min\(d_in, d_out\)=5'),
    ({'n_directions': 2.0}, 'n_directions=2.0 must be an int'),
    ({'a_init': 'zeros_like'}, "a_init='zeros_like' is not one of"),
    ({'alpha': 'big'}, "alpha='big' must be a number"),
    ({'param_dtype': 'int8'}, 'not a floating dtype'),
  ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, message):
  with pytest.raises(pj.PeftError, match=message):
    lora_dash(**{'rank': 2, **kwargs}).init(jax.random.key(0), jnp.ones((D_IN, D_OUT)))


def test_bad_schedules_are_clear_errors():
  adapter, _, frozen, _, _ = dash_tree()
  with pytest.raises(pj.PeftError, match='warmup_steps=0 must be > 0'):
    lora_dash_schedule(adapter, warmup_steps=0)
  lora_only = pj.by_rules([('.*/kernel', 'lora(rank=2)')])
  with pytest.raises(pj.PeftError, match=r'uses lora_dash\(\.\.\.\)'):
    lora_dash_schedule(lora_only).init(
      frozen, lora_only.init(jax.random.key(0), frozen)
    )
