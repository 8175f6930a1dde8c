"""Prompt-tuning inits from the frozen embedding table (HF PEFT's
``SAMPLE_VOCAB`` and ``TEXT``): rows against NumPy indexing, the
repeat-and-truncate rule written out by hand, errors, and the docstring's
recipe end to end on a tiny BERT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax.methods.prompt_tuning import PromptParams
from peft_jax.models import bert
from tests import references

V, D = 11, 4
# Distinct rows, so a row names its token id.
TABLE = np.random.default_rng(0).normal(size=(V, D))
TEXT = [4, 2, 9]


def row_ids(prompt) -> np.ndarray:
  """The table row each prompt row equals (exactly, after the float32 cast)."""
  rows = np.asarray(prompt)
  matches = rows[:, None, :] == TABLE.astype(np.float32)[None, :, :]
  hits = np.all(matches, axis=-1)
  assert np.all(hits.sum(axis=1) == 1), 'a prompt row is not a table row'
  return np.argmax(hits, axis=1)


def test_vocabulary_rows_are_table_rows_drawn_with_replacement_over_all_ids():
  params = pj.prompt_from_vocabulary(jax.random.key(0), TABLE, 200)
  assert isinstance(params, PromptParams)
  assert params.prompt.shape == (200, D) and params.prompt.dtype == jnp.float32
  ids = row_ids(params.prompt)
  np.testing.assert_array_equal(params.prompt, TABLE[ids].astype(np.float32))
  # HF's rule: uniform over the whole vocabulary, with replacement.
  assert set(ids.tolist()) == set(range(V))
  counts = np.bincount(ids, minlength=V)
  assert counts.min() > 200 / V / 3 and counts.max() < 3 * 200 / V


def test_vocabulary_draw_is_a_function_of_the_key():
  one = pj.prompt_from_vocabulary(jax.random.key(1), TABLE, 5)
  again = pj.prompt_from_vocabulary(jax.random.key(1), jnp.asarray(TABLE), 5)
  other = pj.prompt_from_vocabulary(jax.random.key(2), TABLE, 5)
  np.testing.assert_array_equal(one.prompt, again.prompt)
  # Fewer rows than the vocabulary: still table rows, other rows by key.
  assert not np.array_equal(row_ids(one.prompt), row_ids(other.prompt))


@pytest.mark.parametrize(
  'length, ids',
  [
    (1, [4]),
    (2, [4, 2]),  # truncated
    (3, [4, 2, 9]),  # the text itself
    (6, [4, 2, 9, 4, 2, 9]),  # repeated twice
    (7, [4, 2, 9, 4, 2, 9, 4]),  # repeated ⌈7/3⌉ = 3 times, cut to 7
  ],
)
def test_text_rows_repeat_and_truncate_the_text(length, ids):
  for token_ids in (TEXT, np.array(TEXT), jnp.array(TEXT)):
    params = pj.prompt_from_text(token_ids, TABLE, length)
    assert params.prompt.dtype == jnp.float32
    np.testing.assert_array_equal(params.prompt, TABLE[ids].astype(np.float32))


def test_param_dtype_is_the_prompt_dtype():
  params = pj.prompt_from_text(TEXT, TABLE, 2, param_dtype='bfloat16')
  assert params.prompt.dtype == jnp.bfloat16
  params = pj.prompt_from_vocabulary(jax.random.key(0), TABLE, 2, param_dtype='float16')
  assert params.prompt.dtype == jnp.float16


@pytest.mark.parametrize(
  'call, match',
  [
    (lambda: pj.prompt_from_text([], TABLE, 3), r'token_ids of shape \(0,\)'),
    (lambda: pj.prompt_from_text([[1, 2]], TABLE, 3), r'token_ids of shape \(1, 2\)'),
    (lambda: pj.prompt_from_text([1.0, 2.0], TABLE, 3), 'dtype float64'),
    (lambda: pj.prompt_from_text([3, V], TABLE, 3), rf'in \[0, {V}\).*max {V}'),
    (lambda: pj.prompt_from_text([-1], TABLE, 3), 'min -1'),
    (lambda: pj.prompt_from_text(TEXT, TABLE[0], 3), r'table of shape \(4,\)'),
    (lambda: pj.prompt_from_text(TEXT, TABLE[None], 3), r'shape \(1, 11, 4\)'),
    (lambda: pj.prompt_from_text(TEXT, TABLE, 0), 'length=0 must be > 0'),
    (lambda: pj.prompt_from_text(TEXT, TABLE, 2.0), 'length=2.0 must be an int'),
    (lambda: pj.prompt_from_text(TEXT, TABLE, 2, param_dtype='int32'), 'int32'),
    (
      lambda: pj.prompt_from_vocabulary(jax.random.key(0), TABLE, -1),
      'prompt_from_vocabulary: length=-1 must be > 0',
    ),
    (
      lambda: pj.prompt_from_vocabulary(jax.random.key(0), np.zeros((0, 4)), 2),
      r'table of shape \(0, 4\)',
    ),
    (
      lambda: pj.prompt_from_vocabulary(jax.random.key(0), TABLE[0], 2),
      r'prompt_from_vocabulary: table of shape \(4,\) must be',
    ),
  ],
)
def test_bad_inputs_raise_one_line_errors(call, match):
  with pytest.raises(pj.PeftError, match=match) as error:
    call()
  assert '\n' not in str(error.value)


def test_text_prompt_equals_feeding_the_repeated_text_in_front():
  """The docstring's recipe: replace the init's params by the text prompt."""
  model, frozen, ids, mask = references.tiny_bert_encoder(2, 5)
  hidden = lambda w, ids, mask: model.apply({'params': w}, ids, mask)
  point = 'embeddings/input_embeddings'
  tree = pj.by_rules([(point, 'prompt_tuning(length=5)')])
  params, buffers = tree.init(
    jax.random.key(2), frozen, pj.hook_points(model, ids, mask)
  )
  table = frozen['embeddings']['word_embeddings']['embedding']
  params['embeddings']['input_embeddings'] = pj.prompt_from_text([7, 8], table, 5)
  prefix = jnp.broadcast_to(jnp.array([7, 8, 7, 8, 7]), (2, 5))
  full_ids = jnp.concatenate([prefix, ids], axis=1)
  full_mask = jnp.concatenate([jnp.ones((2, 5), mask.dtype), mask], axis=1)
  want = hidden(frozen, full_ids, full_mask)[:, 5:]
  got = pj.adapted(tree, hidden)(frozen, params, buffers, ids, mask)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Parity with Hugging Face PEFT: tests/fixtures/prompt_tuning_hf.npz, written
# by tests/fixtures/make_prompt_tuning_fixture.py with torch, transformers and
# peft (their versions are in the file). HF's prompt (the adapter's
# ``prompt_encoder.default.embedding.weight``, ``(l, d)``) is our
# ``PromptParams.prompt`` as it is: no transpose, no reshape.
#
# Tolerances: HF ran in float32 on torch, we run in float32 on XLA; the two
# sum in different orders, so logits and hidden states of order 1 differ by
# float32 round-off through 2 layers (measured ≲ 3e-6); 1e-5 (+ 1e-5
# relative) leaves room for other BLAS builds and is still far below what one
# prompt entry moved by 1e-2 gives (≳ 2e-3), let alone a wrong row, position
# or mask (≳ 1e-1).


def hf_prompt(arrays, part: str) -> PromptParams:
  """Our ``PromptParams`` from the fixture part's PEFT prompt (as it is)."""
  return PromptParams(
    jnp.asarray(arrays[f'{part}/prompt_encoder.default.embedding.weight'])
  )


def test_llama_logits_match_hf_peft_prompt_tuning():
  """HF's ``CAUSAL_LM`` prompt tuning on a tiny GQA Llama: the prompt before
  the token embeddings, the mask extended by ``l`` ones (row 1 is padded),
  RoPE positions ``0..l+s−1``. HF returns logits at the ``l`` virtual
  positions too; ours drops them, so the tokens' ``[:, l:]`` are compared.
  Also: HF's saved adapter (``prompt_embeddings``) is that same prompt, and
  our ``init`` gives HF's shape and dtype (HF's ``RANDOM`` init is
  ``N(0, 1)``, ours ``U(−0.5, 0.5)`` by default: only the shape can agree)."""
  arrays = references.hf_fixture('prompt_tuning')
  length = int(arrays['num_virtual_tokens'])
  model, frozen = references.hf_llama(arrays, 'llama')
  ids = arrays['llama/input_ids'].astype(np.int32)
  mask = arrays['llama/attention_mask'].astype(np.int32)
  tree = pj.by_rules([('input_embeddings', f'prompt_tuning(length={length})')])
  hooks = pj.hook_points(model, ids, attention_mask=mask)
  initial, _ = jax.eval_shape(tree.init, jax.random.key(0), frozen, hooks)
  prompt = hf_prompt(arrays, 'llama')
  assert initial['input_embeddings'].prompt == jax.ShapeDtypeStruct(
    prompt.prompt.shape, prompt.prompt.dtype
  )
  np.testing.assert_array_equal(arrays['llama/prompt_embeddings'], prompt.prompt)
  logits = lambda w, ids, mask: model.apply({'params': w}, ids, attention_mask=mask)
  got = jax.jit(pj.adapted(tree, logits))(
    frozen, {'input_embeddings': prompt}, None, ids, mask
  )
  want = arrays['llama/logits']
  assert want.shape == (ids.shape[0], length + ids.shape[1], got.shape[-1])
  np.testing.assert_allclose(got, want[:, length:], rtol=1e-5, atol=1e-5)


def test_bert_hidden_states_match_hf_peft_prompt_tuning():
  """HF's ``SEQ_CLS`` prompt tuning on a tiny BERT: the prompt before the
  word embeddings, then position ids ``0..l+s−1`` and token type 0 added to
  prompt and tokens alike, the mask extended by ``l`` ones. The tokens' last
  hidden states (HF's ``hidden_states[-1][:, l:]``) are compared.

  The classifier logits are not: HF's ``BertForSequenceClassification``
  pools position 0 of what it is fed, which under prompt tuning is the first
  virtual token, while our model drops the prompt positions before pooling
  and pools ``[CLS]``."""
  arrays = references.hf_fixture('prompt_tuning')
  length = int(arrays['num_virtual_tokens'])
  classifier, frozen = references.hf_bert_classifier(arrays, 'bert')
  model, frozen = bert.BertModel(classifier.config), frozen['bert']
  ids = arrays['bert/input_ids'].astype(np.int32)
  mask = arrays['bert/attention_mask'].astype(np.int32)
  point = 'embeddings/input_embeddings'
  tree = pj.by_rules([(point, f'prompt_tuning(length={length})')])
  params = {'embeddings': {'input_embeddings': hf_prompt(arrays, 'bert')}}
  hidden = lambda w, ids, mask: model.apply({'params': w}, ids, mask)
  got = jax.jit(pj.adapted(tree, hidden))(frozen, params, None, ids, mask)
  np.testing.assert_allclose(
    got, arrays['bert/hidden'][:, length:], rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize('text', ['short', 'long'])
def test_text_init_matches_hf_peft_prompt_tuning_init_text(text):
  """HF's ``PromptTuningInit.TEXT`` (all-MiniLM-L6-v2's tokenizer, ``[CLS]``
  and ``[SEP]`` included) on a model of that tokenizer's vocabulary:
  ``prompt_from_text`` of the ids HF's tokenizer gave returns HF's initial
  prompt exactly, for a text shorter than the prompt (ids repeated) and one
  longer (ids cut). The fixture keeps only the table rows of those ids; the
  other rows are zeros here, so a wrong id reads zeros or a wrong row."""
  arrays = references.hf_fixture('prompt_tuning')
  ids = arrays[f'text/{text}/input_ids']
  assert (ids[0], ids[-1]) == (101, 102)  # [CLS] … [SEP]: special tokens in.
  length = int(arrays['text/length'])
  assert (ids.size < length) == (text == 'short')
  rows = arrays['text/rows']
  table = np.zeros((int(arrays['text/vocab_size']), rows.shape[1]), np.float32)
  table[arrays['text/row_ids']] = rows
  got = pj.prompt_from_text(ids, table, length).prompt
  np.testing.assert_array_equal(got, arrays[f'text/{text}/prompt'])
