"""``magnitude``, ``lt_sft``, ``random`` and the ``where`` argument they share."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax import PeftError, selection
from peft_jax.methods.bitfit import is_bias


def frozen_tree(seed=0):
  rng = np.random.default_rng(seed)
  return {
    'encoder': {
      'query': {
        'kernel': jnp.asarray(rng.normal(size=(4, 6)), jnp.float32),
        'bias': jnp.asarray(rng.normal(size=6), jnp.float32),
      },
      'ffn': {'kernel': jnp.asarray(rng.normal(size=(6, 3)), jnp.bfloat16)},
    },
    'position_ids': jnp.arange(5),
  }


def test_magnitude_is_abs_theta_over_floating_leaves():
  frozen = frozen_tree()
  scores = selection.magnitude(frozen)
  assert set(scores) == {'encoder'}  # position_ids (int) is never scored
  for name in ('query', 'ffn'):
    for key, w in frozen['encoder'][name].items():
      got = scores['encoder'][name][key]
      assert got.dtype == jnp.float32 and got.shape == w.shape
      np.testing.assert_array_equal(got, np.abs(np.asarray(w, np.float64)))


def test_where_regex_list_and_predicate():
  frozen = frozen_tree()
  kernels = selection.magnitude(frozen, where='.*/kernel')
  assert set(kernels['encoder']['query']) == {'kernel'}
  assert set(kernels['encoder']['ffn']) == {'kernel'}
  listed = selection.magnitude(frozen, where=['encoder/ffn/.*', 'encoder/query/bias'])
  assert set(listed['encoder']['query']) == {'bias'}
  assert set(listed['encoder']) == {'query', 'ffn'}
  biases = selection.magnitude(frozen, where=is_bias)
  assert set(biases['encoder']) == {'query'}
  assert set(biases['encoder']['query']) == {'bias'}


def test_lt_sft_is_abs_change():
  frozen = frozen_tree(1)
  delta = frozen_tree(2)
  tuned = jax.tree.map(lambda w, d: w + 0.01 * d, frozen, delta)
  scores = selection.lt_sft(frozen, tuned, where='encoder/query/.*')
  for key, w0 in frozen['encoder']['query'].items():
    w1 = np.asarray(tuned['encoder']['query'][key], np.float64)
    want = np.abs(w1 - np.asarray(w0, np.float64))
    np.testing.assert_allclose(scores['encoder']['query'][key], want, rtol=1e-6)
  bad = {**tuned, 'encoder': {**tuned['encoder'], 'query': {'kernel': jnp.ones(3)}}}
  with pytest.raises(PeftError, match=r"tuned has shape \(3,\) at 'encoder/query/k"):
    selection.lt_sft(frozen, bad, where='encoder/query/kernel')
  with pytest.raises(PeftError, match="tuned has nothing at 'encoder/query/bias'"):
    selection.lt_sft(frozen, bad, where='encoder/query/bias')


def test_random_is_uniform_exact_size_and_keyed():
  frozen = frozen_tree()
  a = selection.random(jax.random.key(0), frozen, where='.*/kernel')
  again = selection.random(jax.random.key(0), frozen, where='.*/kernel')
  b = selection.random(jax.random.key(1), frozen, where='.*/kernel')
  flat = lambda s: np.concatenate([np.ravel(x) for x in jax.tree.leaves(s)])
  np.testing.assert_array_equal(flat(a), flat(again))
  assert not np.array_equal(flat(a), flat(b))
  assert flat(a).min() >= 0.0 and flat(a).max() < 1.0
  m = 4 * 6 + 6 * 3
  for p in (0.1, 0.5, 1.0):
    mask_a, mask_b = selection.top_p(a, p), selection.top_p(b, p)
    assert selection.count(mask_a) == selection.count(mask_b) == int(np.floor(p * m))
  masks = [selection.top_p(s, 0.5) for s in (a, b)]
  assert not np.array_equal(flat(masks[0]), flat(masks[1]))
  # A leaf's scores do not depend on which other leaves are scored.
  alone = selection.random(jax.random.key(0), frozen, where='encoder/ffn/kernel')
  np.testing.assert_array_equal(
    alone['encoder']['ffn']['kernel'], a['encoder']['ffn']['kernel']
  )


@pytest.mark.parametrize(
  ('where', 'match'),
  [
    ('.*/kernal', "where='.*/kernal' matches no floating leaf; closest names: "),
    ('position_ids', "where='position_ids' matches no floating leaf"),
    (['.*/kernel', 'decoder/.*'], "where='decoder/.*' matches no floating leaf"),
    ([], 'where=\\[\\] must be a regex'),
    ([3], 'where holds 3; expected regex strings'),
    ('/encoder/.*', 'starts with "/"'),
    ('(', "where='\\(' is not a regex"),
    (lambda n, w: w.ndim == 3, 'where=<lambda> matches no floating leaf'),
  ],
)
def test_bad_where_is_a_one_line_error(where, match):
  with pytest.raises(PeftError, match=match) as error:
    selection.magnitude(frozen_tree(), where=where)
  assert '\n' not in str(error.value)
