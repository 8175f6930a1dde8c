"""Bad values given to the core API: one-line PeftErrors naming the value and
what was expected; non-finite training steps reported and, on request, skipped."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_jax as pj

RULES = [('dense/kernel', 'lora(rank=2, alpha=4, b_init="normal")')]
KEY = jax.random.key(0)


def frozen_tree(kernel=None):
  kernel = jax.random.normal(KEY, (4, 3)) if kernel is None else kernel
  return {'dense': {'kernel': kernel, 'bias': jnp.zeros(3)}}


def loss_fn(weights, batch, rng):
  del rng
  y = batch['x'] @ weights['dense']['kernel'] + weights['dense']['bias']
  return jnp.mean((y - batch['y']) ** 2), {}


def batch(fill=None):
  x = jax.random.normal(jax.random.key(1), (5, 4))
  return {'x': x if fill is None else jnp.full_like(x, fill), 'y': jnp.ones((5, 3))}


def init(rules=RULES, frozen=None):
  return pj.by_rules(rules).init(KEY, frozen_tree() if frozen is None else frozen)


def create(params, **kwargs):
  return pj.TrainState.create(params, None, optax.sgd(0.1), KEY, **kwargs)


def apply_to_bool_leaf():
  params, buffers = init()
  frozen = frozen_tree(jnp.ones((4, 3), bool))
  return pj.by_rules(RULES).apply(frozen, params, buffers)


def unmerge_zero_scale():
  adapter = pj.by_rules([('dense/kernel', 'ia3()')])
  params, buffers = adapter.init(KEY, frozen_tree())
  params = jax.tree.map(lambda x: x.at[0].set(0.0), params)
  merged = pj.merge(adapter, frozen_tree(), params, buffers)
  return pj.unmerge(adapter, merged, params, buffers)


def schedule_without_frozen():
  schedule = pj.Schedule(init=lambda frozen, params, buffers: (), update=None)
  return create(init()[0], schedule=schedule)


# (id, call, substrings: the bad value, then what was expected).
CATALOGUE = [
  ('unknown method', lambda: pj.get('lroa(rank=2)'), ("'lroa'", 'did you mean lora')),
  ('unparsable spec', lambda: pj.get('lora(rank=2'), ("'lora(rank=2'", 'expected')),
  ('rank=0', lambda: pj.get('lora(rank=0)'), ('rank=0', 'must be > 0')),
  ('rank str', lambda: pj.get("lora(rank='8')"), ("rank='8'", 'must be an int')),
  ('rank bool', lambda: pj.get('lora(rank=True)'), ('rank=True', 'must be an int')),
  ('lora alpha=0', lambda: pj.get('lora(alpha=0)'), ('alpha=0.0', 'must be > 0')),
  ('lora alpha nan', lambda: pj.lora(alpha=np.nan), ('alpha=nan', 'finite number')),
  ('dora alpha -inf', lambda: pj.dora(alpha=-np.inf), ('alpha=-inf', 'finite')),
  ('adalora alpha nan', lambda: pj.adalora(alpha=np.nan), ('alpha=nan', 'finite')),
  ('pissa alpha inf', lambda: pj.pissa(alpha=np.inf), ('alpha=inf', 'finite')),
  ('loha alpha=0', lambda: pj.get('loha(alpha=0)'), ('alpha=0.0', 'must be > 0')),
  ('lokr alpha<0', lambda: pj.get('lokr(alpha=-1.0)'), ('alpha=-1.0', 'must be > 0')),
  (
    'fourierft scaling=0',
    lambda: pj.get('fourierft(scaling=0)'),
    ('scaling=0.0', '> 0'),
  ),
  ('vera d_init=0', lambda: pj.get('vera(d_init=0)'), ('d_init=0.0', 'nonzero')),
  (
    'scaled_parallel scale=0',
    lambda: pj.get('scaled_parallel(scale=0)'),
    ('scale=0.0', 'nonzero'),
  ),
  (
    'diff_pruning beta inf',
    lambda: pj.diff_pruning(beta=np.inf),
    ('beta=inf', 'finite'),
  ),
  (
    'param_dtype int8',
    lambda: pj.get("lora(param_dtype='int8')"),
    ("param_dtype='int8'", 'not a floating dtype'),
  ),
  (
    'rule matches no leaf',
    lambda: init([('nothing', 'lora(rank=2)')]),
    ("'nothing'", 'matches no leaf'),
  ),
  (
    'bad regex',
    lambda: pj.by_rules([('dense/(kernel', 'lora(rank=2)')]),
    ("'dense/(kernel'", 'is not a regex'),
  ),
  (
    'rank above the kernel',
    lambda: init([('dense/kernel', 'lora(rank=8)')]),
    ('rank=8', 'min(d_in, d_out)=3'),
  ),
  (
    'regularizer',
    lambda: pj.by_rules(RULES, regularizer='max'),
    ("regularizer='max'", "'sum' or 'mean'"),
  ),
  (
    'int leaf at init',
    lambda: init(frozen=frozen_tree(jnp.ones((4, 3), jnp.int32))),
    ('dense/kernel', 'lora(rank=2', 'int32', 'adapters change floating weights'),
  ),
  (
    'bool leaf at apply',
    apply_to_bool_leaf,
    ('dense/kernel', 'bool', 'adapters change floating weights'),
  ),
  (
    'nan leaf at init',
    lambda: init(
      [('dense/kernel', 'pissa(rank=2)')],
      frozen_tree(jnp.ones((4, 3)).at[1, :].set(jnp.nan)),
    ),
    ('dense/kernel', '3 non-finite entries', 'pissa(rank=2)', 'expected finite'),
  ),
  (
    'float16 params',
    lambda: create({'a': jnp.ones(2, jnp.float16)}),
    ("'a'", 'float16', 'use bfloat16 or float32'),
  ),
  (
    'int params',
    lambda: create({'a': jnp.ones(2, jnp.int32)}),
    ("'a'", 'int32', 'must be floating'),
  ),
  (
    'schedule without frozen',
    schedule_without_frozen,
    ('frozen=None', 'needs frozen='),
  ),
  (
    'skip_nonfinite not a bool',
    lambda: pj.make_train_step(
      loss_fn, pj.by_rules(RULES), optax.sgd(0.1), skip_nonfinite=1
    ),
    ('skip_nonfinite=1', 'True or False'),
  ),
  (
    'unmerge a zero scale',
    unmerge_zero_scale,
    ('dense/kernel', 'cannot unmerge', 'ia3()', 'its scale has zeros'),
  ),
]


@pytest.mark.parametrize(
  'call, needles', [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE]
)
def test_bad_input_is_a_one_line_error_naming_value_and_expectation(call, needles):
  with pytest.raises(pj.PeftError) as e:
    call()
  message = str(e.value)
  assert '\n' not in message
  for needle in needles:
    assert needle in message, (needle, message)


def test_a_catalogue_of_at_least_twenty_cases():
  assert len(CATALOGUE) >= 20


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_float32_and_bfloat16_params_are_accepted(dtype):
  params, _ = init([('dense/kernel', f'lora(rank=2, param_dtype="{dtype}")')])
  state = create(params)
  assert state.params['dense']['kernel'].a.dtype == jnp.dtype(dtype)


def test_quantized_leaves_pass_the_floating_check():
  frozen = pj.quantize(frozen_tree(), 'int8', group_size=4)
  params, _ = init(frozen=frozen)
  assert params['dense']['kernel'].a.shape == (4, 2)


def test_traced_leaves_are_not_checked_for_finiteness():
  """The value check is eager only: traced leaves are left to the user."""
  frozen = frozen_tree(jnp.full((4, 3), jnp.nan))
  shapes, _ = jax.eval_shape(pj.by_rules(RULES).init, KEY, frozen)
  assert shapes['dense']['kernel'].a.shape == (4, 2)


def steps():
  """``(plain, skipping)`` jitted steps with Adam, and the state at step 0."""
  adapter, adam = pj.by_rules(RULES), optax.adam(0.1)
  params, buffers = adapter.init(KEY, frozen_tree())
  state = pj.TrainState.create(params, buffers, adam, KEY)
  plain = jax.jit(pj.make_train_step(loss_fn, adapter, adam))
  skipping = jax.jit(pj.make_train_step(loss_fn, adapter, adam, skip_nonfinite=True))
  return plain, skipping, state


def test_finite_metric_is_true_on_a_normal_step_and_false_on_a_nan_batch():
  plain, _, state = steps()
  _, metrics = plain(state, frozen_tree(), batch())
  assert metrics['finite'].dtype == jnp.bool_ and bool(metrics['finite'])
  assert 'skipped' not in metrics
  updated, metrics = plain(state, frozen_tree(), batch(np.nan))
  assert not bool(metrics['finite'])
  assert np.isnan(updated.params['dense']['kernel'].a).all()  # Not skipped.


def test_skip_nonfinite_keeps_the_state_on_a_nan_batch_then_updates():
  plain, skipping, state = steps()
  frozen = frozen_tree()
  skipped, metrics = skipping(state, frozen, batch(np.inf))
  assert int(metrics['skipped']) == 1 and not bool(metrics['finite'])
  assert int(skipped.step) == 1
  for kept, old in (
    (skipped.params, state.params),
    (skipped.opt_state, state.opt_state),
  ):
    jax.tree.map(np.testing.assert_array_equal, kept, old)
  got, metrics = skipping(skipped, frozen, batch())
  assert int(metrics['skipped']) == 0 and bool(metrics['finite'])
  want, _ = plain(state._replace(step=state.step + 1), frozen, batch())
  assert int(got.step) == 2
  assert not np.array_equal(
    got.params['dense']['kernel'].a, state.params['dense']['kernel'].a
  )
  for a, b in ((got.params, want.params), (got.opt_state, want.opt_state)):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), a, b)
