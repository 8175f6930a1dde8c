"""LoRA-Dash: the layer against the spec, and the direction selection by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_jax as pj
from peft_jax.methods.lora_dash import LoraDashBuffers, LoraDashParams, lora_dash
from peft_jax.methods.lora_dash_schedule import lora_dash_schedule, select_directions
from tests.methods.spec_checks import assert_factored_and_inverse
from tests.references import compiled_programs
from tests.schedules.wrapping import KINDS, wrapped

D_IN, D_OUT = 7, 5


def random_theta(seed, rank, n):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  params = LoraDashParams(a=normal(D_IN, rank), b=normal(rank, D_OUT), d=normal(n))
  return params, LoraDashBuffers(v=normal(D_IN, n), u=normal(D_OUT, n))


@pytest.mark.parametrize('rank,alpha,n', [(1, 2.0, 1), (3, 16.0, 2), (4, 4.0, 5)])
def test_apply_and_factored_match_spec(rank, alpha, n):
  w = np.random.default_rng(1).normal(size=(D_IN, D_OUT)).astype(np.float32)
  params, buffers = random_theta(2, rank, n)
  # Spec, PyTorch layout: W' = W + s·BA + U_I diag(d) V_Iᵀ, s = α/r.
  W, A, B = (np.float64(m).T for m in (w, params.a, params.b))
  U, V = np.float64(buffers.u), np.float64(buffers.v)
  expected = W + alpha / rank * B @ A + U @ np.diag(np.float64(params.d)) @ V.T
  adapter = lora_dash(rank, alpha, n_directions=n)
  np.testing.assert_allclose(
    adapter.apply(w, params, buffers).T, expected, rtol=1e-5, atol=1e-5
  )
  x = np.random.default_rng(3).normal(size=(4, D_IN))
  assert_factored_and_inverse(adapter, w, params, expected, x, buffers)
  down, up = adapter.factors(params, buffers)  # The LoRA factors (a, b).
  np.testing.assert_array_equal(down, params.a)
  np.testing.assert_array_equal(up, params.b)


def test_init_is_lora_with_an_inactive_dash_so_identity():
  d_in, d_out, rank, n = 512, 64, 8, 4
  w = jax.random.normal(jax.random.key(1), (d_in, d_out))
  adapter = lora_dash(rank, n_directions=n)
  params, buffers = adapter.init(jax.random.key(0), w)
  assert isinstance(params, LoraDashParams) and isinstance(buffers, LoraDashBuffers)
  a = np.asarray(params.a, np.float64)
  bound = 1 / np.sqrt(d_in)  # KU(d_in), LoRA's default.
  assert np.all(np.abs(a) <= bound) and np.abs(a).max() > 0.95 * bound
  np.testing.assert_allclose(a.var(), bound**2 / 3, rtol=0.05)
  for x, shape in ((params.b, (rank, d_out)), (params.d, (n,))):
    assert x.shape == shape
    np.testing.assert_array_equal(x, 0)
  for x, shape in ((buffers.v, (d_in, n)), (buffers.u, (d_out, n))):
    assert x.shape == shape and x.dtype == jnp.float32
    np.testing.assert_array_equal(x, 0)
  np.testing.assert_array_equal(adapter.apply(w, params, buffers), w)
  assert pj.count(params) == adapter.num_params(w.shape) == rank * (d_in + d_out) + n


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
  params, buffers = adapter.init(jax.random.key(0), frozen)
  scale = 8.0 / 4
  # s · a @ b = v diag(δ) uᵀ with a rank-4 factorisation.
  params['m']['kernel'] = params['m']['kernel']._replace(
    a=jnp.float32(v[:, :4] * delta[:4] / scale), b=jnp.float32(u[:, :4].T)
  )
  schedule = lora_dash_schedule(adapter, warmup_steps=warmup)
  return adapter, schedule, frozen, params, buffers, (v, u, chosen)


def test_the_schedule_stores_the_directions_at_the_warmup_step_only():
  _, schedule, frozen, params, buffers, (v, u, chosen) = dash_tree(warmup=5)
  update = jax.jit(schedule.update)
  state = schedule.init(frozen, params, buffers)
  before = update(state, frozen, params, buffers, params, (), 4)
  jax.tree.map(np.testing.assert_array_equal, before, (params, buffers, (), ()))
  out, after, opt_state, _ = update(state, frozen, params, buffers, params, (), 5)
  directions = after['m']['kernel']
  assert_same_directions(directions.v, directions.u, v, u, chosen)
  jax.tree.map(np.testing.assert_array_equal, out, params)  # Parameters untouched.
  assert opt_state == () and set(after) == {'m'}  # lora has no buffers.
  later = {
    **out,
    'm': {'kernel': out['m']['kernel']._replace(a=-params['m']['kernel'].a)},
  }
  again = update(state, frozen, later, after, later, (), 6)  # No second selection.
  jax.tree.map(np.testing.assert_array_equal, again, (later, after, (), ()))


def test_factored_equals_weight_space_after_selection():
  _, schedule, frozen, params, buffers, _ = dash_tree()
  params, buffers, _, _ = schedule.update((), frozen, params, buffers, params, (), 5)
  leaf_adapter = lora_dash(4, 8.0, n_directions=2)
  w, leaf_buffers = frozen['m']['kernel'], buffers['m']['kernel']
  leaf_params = params['m']['kernel']._replace(d=jnp.array([0.7, -1.3]))
  x = jax.random.normal(jax.random.key(3), (3, D_IN))
  factored = lambda p: leaf_adapter.linear.factored(x, w, p, leaf_buffers)
  merged = lambda p: x @ leaf_adapter.apply(w, p, leaf_buffers)
  np.testing.assert_allclose(
    factored(leaf_params), merged(leaf_params), rtol=1e-5, atol=1e-5
  )
  grad = lambda f: jax.grad(lambda p: jnp.sum(jnp.sin(f(p))))(leaf_params)
  jax.tree.map(
    lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-4, atol=1e-5),
    grad(factored),
    grad(merged),
  )
  assert np.all(grad(factored).d != 0)  # The dash is live after the selection.


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
    *adapter.init(jax.random.key(1), frozen),
    optimizer,
    jax.random.key(2),
    schedule=schedule,
    frozen=frozen,
  )
  step = jax.jit(pj.make_train_step(loss_fn, adapter, optimizer, schedule=schedule))
  x = jax.random.normal(jax.random.key(4), (16, D_IN))
  history = []
  with compiled_programs() as compiled:
    for _ in range(6):
      loss = lambda p, b: loss_fn(adapter.apply(frozen, p, b), x, None)[0]
      grads = jax.grad(loss)(state.params, state.buffers)
      state, _ = step(state, frozen, x)
      history.append(
        (
          grads['m']['kernel'],
          state.params['m']['kernel'],
          state.buffers['m']['kernel'],
        )
      )
  for t in range(3):  # Updates 1..3: the d-term is zero, with zero gradient.
    grads, leaf, _ = history[t]
    assert np.any(grads.b != 0)
    np.testing.assert_array_equal(grads.d, 0)
    np.testing.assert_array_equal(leaf.d, 0)
  for t in range(2):  # Update 3 ends with the selection.
    np.testing.assert_array_equal(history[t][2].v, 0)
  for basis in history[2][2]:  # Orthonormal bases v and u.
    np.testing.assert_allclose(basis.T @ basis, np.eye(2), atol=1e-5)
  grads, leaf, _ = history[5]
  assert np.all(grads.d != 0) and np.all(leaf.d != 0)
  assert np.all(leaf.a != history[2][1].a)  # A and B keep training.
  assert compiled.count('jit(step)') == 1, compiled


DASH = 'lora_dash(rank=2, alpha=4.0, n_directions=2)'
GOVERNED = ('w0', 'w1')
OTHERS = [('other/kernel', 'lora(rank=2)')]


def numpy_directions(w, delta, n):
  """Float64 reference: ``(V, U, I)`` with ``I`` the top-``n`` ``|δ_i|/σ_i``.

  PyTorch layout ``W = wᵀ = U diag(σ) Vᵀ``, ``δ_i = u_iᵀ ΔW v_i``.
  """
  W, dW = np.float64(w).T, np.float64(delta).T
  U, sigma, Vt = np.linalg.svd(W, full_matrices=False)
  rate = np.abs(np.sum(U * (dW @ Vt.T), axis=0)) / sigma
  order = np.argsort(-rate)
  assert rate[order[n - 1]] > 1.05 * rate[order[n]]  # A clear top-n.
  return Vt.T, U, list(order[:n])


def wrap_problem():
  """Two 6×4 lora_dash leaves with trained-looking factors, one lora leaf."""
  rng = np.random.default_rng(5)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  frozen = {name: {'kernel': normal(6, 4)} for name in GOVERNED}
  frozen['other'] = {'kernel': normal(4, 3)}
  plain = pj.by_rules([('(w0|w1)/kernel', DASH), *OTHERS])
  params, buffers = plain.init(jax.random.key(0), frozen)
  for name in GOVERNED:
    params[name]['kernel'] = params[name]['kernel']._replace(b=normal(2, 4))
  return plain, frozen, params, buffers


@pytest.mark.parametrize('kind', ('plain', *KINDS))
def test_each_matrix_gets_its_directions_however_the_method_is_wrapped(kind):
  """Under matrix_view the directions are those of the (d_in, d_out) view of
  the kernel; under stacked, those of each layer's matrix."""
  plain, frozen, params, buffers = wrap_problem()
  same = lambda tree: tree
  adapter, wrapped_frozen, to, back = (
    (plain, frozen, same, same)
    if kind == 'plain'
    else wrapped(kind, DASH, frozen, GOVERNED, OTHERS)
  )
  schedule = lora_dash_schedule(adapter, warmup_steps=3)
  state = schedule.init(wrapped_frozen, to(params), to(buffers))
  out, out_buffers, _, _ = jax.jit(schedule.update)(
    state, wrapped_frozen, to(params), to(buffers), to(params), (), 3
  )
  jax.tree.map(np.testing.assert_array_equal, back(out), params)
  out_buffers = back(out_buffers)
  dash = jnp.array([0.7, -1.3])
  with_dash = {
    **params,
    **{n: {'kernel': params[n]['kernel']._replace(d=dash)} for n in GOVERNED},
  }
  weights = back(adapter.apply(wrapped_frozen, to(with_dash), to(out_buffers)))
  for name in GOVERNED:
    leaf, w = params[name]['kernel'], frozen[name]['kernel']
    delta = 4.0 / 2 * np.float64(leaf.a) @ np.float64(leaf.b)
    v, u, chosen = numpy_directions(w, delta, 2)
    got = out_buffers[name]['kernel']
    assert_same_directions(got.v, got.u, v, u, chosen)
    # The method reads the stored directions as it stores them.
    expected = w + delta + (got.v * dash) @ got.u.T
    np.testing.assert_allclose(
      np.reshape(weights[name]['kernel'], w.shape), expected, rtol=1e-5, atol=1e-5
    )


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
  adapter, _, frozen, _, _, _ = dash_tree()
  with pytest.raises(pj.PeftError, match='warmup_steps=0 must be > 0'):
    lora_dash_schedule(adapter, warmup_steps=0)
  with pytest.raises(pj.PeftError, match='needs a tree-level adapter'):
    lora_dash_schedule(lora_dash(2)).init(frozen, {}, {})


@pytest.mark.parametrize('spec', ['lora(rank=2)', 'flexlora(rank=2)'])
def test_a_tree_without_lora_dash_leaves_is_a_one_line_error(spec):
  _, _, frozen, _, _, _ = dash_tree()
  others = pj.by_rules([('.*/kernel', spec)])
  with pytest.raises(pj.PeftError, match=r'no leaf of .* has LoraDashParams') as error:
    lora_dash_schedule(others).init(frozen, *others.init(jax.random.key(0), frozen))
  assert '\n' not in str(error.value)
