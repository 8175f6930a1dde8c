"""``top_p`` and ``count`` on known scores."""

import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax import PeftError, selection

SCORES = {
  'a': {'w': jnp.array([[50.0, 10.0], [30.0, 70.0]])},
  'b': jnp.array([2.0, 8.0, 0.0, 4.0, 6.0, 9.0]),
}


def as_numpy(mask):
  return {'a/w': np.asarray(mask['a']['w']), 'b': np.asarray(mask['b'])}


def test_global_scope_takes_the_top_floor_p_m_over_all_leaves():
  # m = 10, k = 5: 70, 50, 30, 10 (all of a) and 9 (one of b).
  mask = as_numpy(selection.top_p(SCORES, 0.5))
  np.testing.assert_array_equal(mask['a/w'], [[True, True], [True, True]])
  np.testing.assert_array_equal(mask['b'], [False, False, False, False, False, True])
  assert mask['a/w'].dtype == bool
  assert selection.count(selection.top_p(SCORES, 0.5)) == 5


def test_per_leaf_scope_takes_floor_p_size_in_each_leaf():
  # a: k = 2 (70, 50); b: k = 3 (9, 8, 6).
  mask = as_numpy(selection.top_p(SCORES, 0.5, scope='per_leaf'))
  np.testing.assert_array_equal(mask['a/w'], [[True, False], [False, True]])
  np.testing.assert_array_equal(mask['b'], [False, True, False, False, True, True])


def test_rounding_is_floor():
  # per leaf: ⌊0.3·4⌋ = 1 and ⌊0.3·6⌋ = 1; global: ⌊0.3·10⌋ = 3.
  per_leaf = as_numpy(selection.top_p(SCORES, 0.3, scope='per_leaf'))
  assert per_leaf['a/w'].sum() == 1 and per_leaf['b'].sum() == 1
  assert per_leaf['a/w'][1, 1] and per_leaf['b'][5]
  assert selection.count(selection.top_p(SCORES, 0.3)) == 3
  assert selection.count(selection.top_p(SCORES, 0.19)) == 1
  # 0.29 · 100 is 28.999999999999996 in floats; ⌊p·m⌋ is 29.
  uniform = {'w': jnp.asarray(np.random.default_rng(0).uniform(size=(10, 10)))}
  assert selection.count(selection.top_p(uniform, 0.29)) == 29
  assert selection.count(selection.top_p(uniform, 1.0)) == 100


def test_ties_still_give_exactly_k():
  tied = {'w': jnp.zeros((4, 5)), 'v': jnp.ones(3)}
  mask = selection.top_p(tied, 0.35)  # k = ⌊0.35·23⌋ = 8: the 3 ones + 5 zeros
  assert selection.count(mask) == 8
  assert np.asarray(mask['v']).all()
  assert selection.count(selection.top_p(tied, 0.35, scope='per_leaf')) == 7 + 1


@pytest.mark.parametrize(
  ('scores', 'p', 'scope', 'match'),
  [
    (SCORES, 0, 'global', 'p=0 must be a share in \\(0, 1\\]'),
    (SCORES, 1.5, 'global', 'p=1.5 must be'),
    (SCORES, -0.1, 'global', 'p=-0.1 must be'),
    (SCORES, True, 'global', 'p=True must be'),
    (SCORES, '0.5', 'global', "p='0.5' must be"),
    (SCORES, 0.5, 'foo', "scope='foo' is not one of \\('global', 'per_leaf'\\)"),
    (SCORES, 0.05, 'global', 'p=0.05 selects no entry of 10 scored entries'),
    (SCORES, 0.1, 'per_leaf', 'p=0.1 selects no entry'),
    ({}, 0.5, 'global', 'scores is empty'),
    (jnp.ones(3), 0.5, 'global', 'scores is ArrayImpl; expected a score tree'),
    ({'w': jnp.array([1.0, jnp.nan])}, 0.5, 'global', "scores at 'w' hold NaN"),
  ],
)
def test_bad_arguments_are_one_line_errors(scores, p, scope, match):
  with pytest.raises(PeftError, match=match) as error:
    selection.top_p(scores, p, scope=scope)
  assert '\n' not in str(error.value)
