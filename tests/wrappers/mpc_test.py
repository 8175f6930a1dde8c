"""Matrix Pattern Constraints against the spec's Eqs. 25/26 and the reference code."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_jax as pj
from peft_jax._src.patterns import pattern_penalty
from peft_jax.methods.adalora import AdaLoraParams
from peft_jax.methods.lora import LoraParams
from peft_jax.wrappers import mpc

D_IN, D_OUT, RANK = 9, 6, 3


def spec_penalty(down, up, kind, form):
  """R_o / R_d in the spec's layout: A = downᵀ (r, d_in), B = upᵀ (d_out, r)."""
  A, B = np.float64(down).T, np.float64(up).T
  eye = np.eye(A.shape[0])
  gram_b = B.T @ B
  target = eye if kind == 'o' else np.diag(np.diag(gram_b))
  norms = [np.linalg.norm(A @ A.T - eye), np.linalg.norm(gram_b - target)]
  return sum(n**2 for n in norms) if form == 'squared' else np.mean(norms)


def random_factors(seed):
  rng = np.random.default_rng(seed)
  return (
    rng.normal(size=(D_IN, RANK)).astype(np.float32),
    rng.normal(size=(RANK, D_OUT)).astype(np.float32),
  )


@pytest.mark.parametrize('form', ['squared', 'mean'])
@pytest.mark.parametrize('kind', ['o', 'd'])
def test_penalty_matches_closed_form(kind, form):
  down, up = random_factors(0)
  np.testing.assert_allclose(
    pattern_penalty(down, up, kind, form), spec_penalty(down, up, kind, form), rtol=1e-5
  )
  adapter = mpc('lora(rank=3)', kind=kind, gamma=0.3, form=form)
  np.testing.assert_allclose(
    adapter.regularizer(None, LoraParams(down, up), None),
    0.3 * spec_penalty(down, up, kind, form),
    rtol=1e-5,
  )


def orthonormal(seed, n, r):
  return np.linalg.qr(np.random.default_rng(seed).normal(size=(n, r)))[0]


@pytest.mark.parametrize('form', ['squared', 'mean'])
def test_zero_for_orthonormal_factors_and_d_frees_the_up_norms(form):
  down = orthonormal(1, D_IN, RANK)
  up = orthonormal(2, D_OUT, RANK).T
  for kind in ('o', 'd'):
    assert float(pattern_penalty(down, up, kind, form)) < 1e-5
  scaled_up = np.diag([0.5, 2.0, 3.0]) @ up  # Orthogonal rows, free norms.
  assert float(pattern_penalty(down, scaled_up, 'd', form)) < 1e-5
  assert float(pattern_penalty(down, scaled_up, 'o', form)) > 1.0


@pytest.mark.parametrize('kind', ['o', 'd'])
def test_mean_form_has_zero_not_nan_gradients_at_zero_residual(kind):
  # Exactly orthonormal down and a zero up: a residual is exactly 0, where an
  # unguarded sqrt would give NaN gradients (torch.norm gives 0).
  down, up = jnp.eye(D_IN, RANK), jnp.zeros((RANK, D_OUT))
  grads = jax.grad(pattern_penalty, argnums=(0, 1))(down, up, kind, 'mean')
  for g in grads:
    np.testing.assert_array_equal(g, np.zeros_like(g))


def test_mean_form_and_mean_reduction_are_the_reference_code():
  """compute_orth_regu: γ_code·(1/N)·Σ over all N = 2L factors of ‖·‖_F."""
  shapes = {'q': (D_IN, D_OUT), 'k': (D_IN, D_OUT), 'ffn': (D_OUT, D_IN)}
  frozen = {name: jnp.zeros(shape) for name, shape in shapes.items()}
  rules = [('q|k|ffn', "mpc('lora(rank=3)', gamma=0.1, form='mean')")]
  adapter = pj.by_rules(rules)  # regularizer='mean', the default
  params, buffers = adapter.init(jax.random.key(0), frozen)
  params = jax.tree.map(lambda t: t + 0.5, params)
  norms = []
  for leaf in params.values():
    A, B = np.float64(leaf.a).T, np.float64(leaf.b).T
    norms.append(np.linalg.norm(A @ A.T - np.eye(3)))
    norms.append(np.linalg.norm(B.T @ B - np.eye(3)))
  gamma_code = 0.1  # The code's reg_orth_coef, unchanged.
  np.testing.assert_allclose(
    adapter.regularizer(frozen, params, buffers), gamma_code * np.mean(norms), rtol=1e-5
  )
  # The paper's loss, γ Σ_leaves R with squared norms: form='squared', 'sum'.
  paper = pj.by_rules(
    [('q|k|ffn', "mpc('lora(rank=3)', gamma=0.1)")], regularizer='sum'
  )
  expected = 0.1 * sum(
    spec_penalty(leaf.a, leaf.b, 'o', 'squared') for leaf in params.values()
  )
  np.testing.assert_allclose(
    paper.regularizer(frozen, params, buffers), expected, rtol=1e-5
  )


def loss_fn(params, batch, rng):
  del rng
  return jnp.mean((batch['x'] @ params['dense']['kernel'] - batch['y']) ** 2), {}


def test_train_step_adds_the_penalty():
  rng = np.random.default_rng(4)
  frozen = {'dense': {'kernel': jnp.float32(rng.normal(size=(D_IN, D_OUT)))}}
  batch = {'x': jnp.float32(rng.normal(size=(8, D_IN)))}
  batch['y'] = jnp.float32(rng.normal(size=(8, D_OUT)))
  spec = "mpc('lora(rank=3, b_init=\"normal\")', kind='d', gamma=0.3)"
  adapter = pj.by_rules([('dense/kernel', spec)])
  params, buffers = adapter.init(jax.random.key(0), frozen)
  leaf = params['dense']['kernel']
  expected = 0.3 * spec_penalty(leaf.a, leaf.b, 'd', 'squared')
  optimizer = optax.sgd(0.1)
  for factored in (False, True):
    step = pj.make_train_step(loss_fn, adapter, optimizer, factored=factored)
    state = pj.TrainState.create(params, buffers, optimizer, jax.random.key(1))
    _, metrics = jax.jit(step)(state, frozen, batch)
    np.testing.assert_allclose(metrics['regularizer'], expected, rtol=1e-5)
    task_loss, _ = loss_fn(adapter.apply(frozen, params, buffers), batch, None)
    np.testing.assert_allclose(metrics['loss'], task_loss, rtol=1e-5)


def test_spec_strings_parse_and_keep_the_method():
  spec = "mpc('lora(rank=4)', kind='d', gamma=0.3)"
  adapter = pj.get(spec)
  base = pj.get('lora(rank=4)')
  assert adapter.name == (
    f"mpc(method={base.name!r}, kind='d', gamma=0.3, form='squared')"
  )
  assert adapter is pj.get(adapter.name)
  assert adapter.apply is base.apply and adapter.linear is base.linear
  frozen = {'dense': {'kernel': jnp.ones((D_IN, D_OUT))}}
  tree = pj.by_rules([('dense/kernel', spec)], regularizer='sum')
  params, buffers = tree.init(jax.random.key(0), frozen)
  assert pj.count(params) == 4 * (D_IN + D_OUT)
  leaf = params['dense']['kernel']
  np.testing.assert_allclose(
    tree.regularizer(frozen, params, buffers),
    0.3 * spec_penalty(leaf.a, leaf.b, 'd', 'squared'),
    rtol=1e-5,
  )


def test_adds_to_an_existing_regularizer():
  down, up = random_factors(5)
  params = AdaLoraParams(a=down, b=up, e=np.ones(RANK, np.float32))
  base = pj.get('adalora(rank=3, reg_orth_coef=0.1)')
  wrapped = mpc('adalora(rank=3, reg_orth_coef=0.1)', kind='d', gamma=0.2)
  np.testing.assert_allclose(
    wrapped.regularizer(None, params, None),
    base.regularizer(None, params, None) + 0.2 * spec_penalty(down, up, 'd', 'squared'),
    rtol=1e-5,
  )


@pytest.mark.parametrize(
  'kwargs,message',
  [
    ({'method': 'ssb()'}, r'mpc: method ssb\(\) has no low-rank factors'),
    ({'method': 3}, 'method spec 3 has type int'),
    ({'method': 'houlsby()'}, 'mpc wraps weight-space methods'),
    ({'method': 'lora', 'kind': 'n'}, "kind='n' is not one of 'o', 'd'"),
    ({'method': 'lora', 'form': 'sum'}, "form='sum' is not one of"),
    ({'method': 'lora', 'gamma': -1}, 'gamma=-1.0 must be >= 0'),
    ({'method': 'lora', 'gamma': 'big'}, "gamma='big' must be a number"),
  ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, message):
  with pytest.raises(pj.PeftError, match=message):
    mpc(**kwargs)
