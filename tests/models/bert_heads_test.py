"""RoBERTa positions and the token-classification / multiple-choice heads.

The RoBERTa reference is an independent float64 NumPy encoder that numbers
positions with a Python loop over the token ids (HF's
``create_position_ids_from_input_ids``) and reads the ``roberta.``-prefixed
PyTorch arrays of a tiny random checkpoint directly.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import transformers
from flax import traverse_util
from safetensors import numpy as safetensors_numpy

import peft_jax as pj
from peft_jax.models import bert

PAD = 1  # RoBERTa's padding_idx.


# ---------------------------------------------------------------------------
# Independent float64 NumPy reference (PyTorch layout: y = x @ W.T + b).


def _ln(x, w, prefix, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * w[f'{prefix}.weight'] + w[f'{prefix}.bias']


def _lin(x, w, prefix):
  return x @ w[f'{prefix}.weight'].T + w[f'{prefix}.bias']


def _roberta_positions(ids, pad):
  """Position ids: pad+1, pad+2, ... over non-pad tokens; pad at pads."""
  out = np.full(ids.shape, pad)
  for row in range(ids.shape[0]):
    count = 0
    for col in range(ids.shape[1]):
      if ids[row, col] != pad:
        count += 1
        out[row, col] = pad + count
  return out


def _np_encoder(weights, hc, ids, mask, positions):
  w = {k.removeprefix('roberta.'): v.astype(np.float64) for k, v in weights.items()}
  heads, eps = hc.num_attention_heads, hc.layer_norm_eps
  b, s = ids.shape
  x = (
    w['embeddings.word_embeddings.weight'][ids]
    + w['embeddings.position_embeddings.weight'][positions]
    + w['embeddings.token_type_embeddings.weight'][0]
  )
  x = _ln(x, w, 'embeddings.LayerNorm', eps)
  bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
  split = lambda y: y.reshape(b, s, heads, -1).transpose(0, 2, 1, 3)
  for i in range(hc.num_hidden_layers):
    p = f'encoder.layer.{i}'
    q, k, v = (
      split(_lin(x, w, f'{p}.attention.self.{n}')) for n in ('query', 'key', 'value')
    )
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + bias
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, -1)
    a = _lin(context, w, f'{p}.attention.output.dense')
    x = _ln(x + a, w, f'{p}.attention.output.LayerNorm', eps)
    h = _lin(x, w, f'{p}.intermediate.dense')
    h = 0.5 * h * (1.0 + scipy.special.erf(h / np.sqrt(2.0)))
    x = _ln(x + _lin(h, w, f'{p}.output.dense'), w, f'{p}.output.LayerNorm', eps)
  return x


# ---------------------------------------------------------------------------
# A tiny random RoBERTa-style checkpoint.


def _roberta_hf_config():
  return transformers.RobertaConfig(
    vocab_size=50,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=24,
    max_position_embeddings=12,  # 10 tokens + padding_idx + 1.
    type_vocab_size=1,
    pad_token_id=PAD,
    layer_norm_eps=1e-5,
  )


def _roberta_weights(hc, pooler, seed=0):
  h, f = hc.hidden_size, hc.intermediate_size
  shapes = {
    'embeddings.word_embeddings.weight': (hc.vocab_size, h),
    'embeddings.position_embeddings.weight': (hc.max_position_embeddings, h),
    'embeddings.token_type_embeddings.weight': (hc.type_vocab_size, h),
    'embeddings.LayerNorm.weight': (h,),
    'embeddings.LayerNorm.bias': (h,),
  }
  dense = {'pooler.dense': (h, h)} if pooler else {}
  for i in range(hc.num_hidden_layers):
    p = f'encoder.layer.{i}'
    for name in ('query', 'key', 'value'):
      dense[f'{p}.attention.self.{name}'] = (h, h)
    dense[f'{p}.attention.output.dense'] = (h, h)
    dense[f'{p}.intermediate.dense'] = (f, h)
    dense[f'{p}.output.dense'] = (h, f)
    for name in ('attention.output.LayerNorm', 'output.LayerNorm'):
      shapes[f'{p}.{name}.weight'] = (h,)
      shapes[f'{p}.{name}.bias'] = (h,)
  for name, shape in dense.items():
    shapes[f'{name}.weight'] = shape
    shapes[f'{name}.bias'] = shape[:1]
  rng = np.random.default_rng(seed)
  weights = {
    f'roberta.{name}': rng.normal(scale=0.5, size=shape).astype(np.float32)
    for name, shape in shapes.items()
  }
  # Heads of an MLM checkpoint, which the encoder loader ignores.
  weights['lm_head.dense.weight'] = np.zeros((h, h), np.float32)
  weights['lm_head.bias'] = np.zeros((hc.vocab_size,), np.float32)
  return weights


def _roberta_inputs():
  ids = np.asarray(jax.random.randint(jax.random.key(1), (3, 10), 2, 50))
  mask = (np.arange(10)[None] < np.array([[10], [6], [2]])).astype(np.int32)
  return np.where(mask > 0, ids, PAD), mask


@functools.cache
def _roberta_checkpoint(tmp_dir, pooler):
  hc = _roberta_hf_config()
  weights = _roberta_weights(hc, pooler)
  directory = pathlib.Path(tmp_dir) / f'pooler_{pooler}'
  hc.save_pretrained(directory)
  safetensors_numpy.save_file(weights, directory / 'model.safetensors')
  config, params = bert.load_hf(directory)
  return hc, weights, config, params


@pytest.fixture(scope='module')
def roberta_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('roberta'))


# ---------------------------------------------------------------------------
# RoBERTa.


@pytest.mark.parametrize('pooler', [False, True])
def test_roberta_matches_float64_reference(roberta_dir, pooler):
  hc, weights, config, params = _roberta_checkpoint(roberta_dir, pooler)
  assert config.roberta and config.pad_token_id == PAD and config.max_length == 10
  assert ('pooler' in params) == pooler
  ids, mask = _roberta_inputs()
  model = bert.BertModel(config)
  hidden = jax.jit(lambda p: model.apply({'params': p}, ids, mask))(params)
  positions = _roberta_positions(ids, PAD)
  assert positions[1].tolist() == [2, 3, 4, 5, 6, 7, 1, 1, 1, 1]
  want = _np_encoder(weights, hc, ids, mask, positions)
  np.testing.assert_allclose(hidden, want, atol=1e-4, rtol=0)  # All positions.
  # BERT positions (0, 1, ...) would give other hidden states.
  bert_positions = np.broadcast_to(np.arange(10), ids.shape)
  assert np.abs(_np_encoder(weights, hc, ids, mask, bert_positions) - want).max() > 1e-2


def test_roberta_position_ids_helper():
  ids = jnp.array([[0, 5, 7, PAD, PAD], [PAD, 4, PAD, 9, 3]])
  got = bert.roberta_position_ids(ids != PAD, PAD)
  np.testing.assert_array_equal(got, _roberta_positions(np.asarray(ids), PAD))


@pytest.mark.slow
def test_roberta_prompt_positions_continue_the_numbering(roberta_dir):
  # Prepending a prompt equal to the embeddings of tokens t must give what
  # the input [t, ids] gives: prompt positions are numbered like tokens.
  _, _, config, params = _roberta_checkpoint(roberta_dir, False)
  ids, mask = _roberta_inputs()
  ids, mask = ids[:, :8], mask[:, :8]  # Room for 2 prompt positions.
  prompt_ids = np.array([7, 11])
  model = bert.BertModel(config)
  table = params['embeddings']['word_embeddings']['embedding']

  def prepend(value, prompt, buffers):
    x, m = value
    rows = jnp.broadcast_to(prompt, (x.shape[0], *prompt.shape))
    ones = jnp.ones((x.shape[0], prompt.shape[0]), m.dtype)
    return jnp.concatenate([rows, x], 1), jnp.concatenate([ones, m], 1)

  adapter = pj.ActivationAdapter(
    init=lambda key, value: (table[prompt_ids], None), apply=prepend
  )
  tree = pj.by_rules([('embeddings/input_embeddings', adapter)])
  hooks = pj.hook_points(model, ids, mask)
  theta, buffers = tree.init(jax.random.key(0), params, hooks)
  run = pj.adapted(tree, lambda w, i, m: model.apply({'params': w}, i, m))
  prompted = run(params, theta, buffers, ids, mask)
  full_ids = np.concatenate([np.broadcast_to(prompt_ids, (3, 2)), ids], 1)
  full_mask = np.concatenate([np.ones((3, 2), mask.dtype), mask], 1)
  direct = model.apply({'params': params}, full_ids, full_mask)[:, 2:]
  np.testing.assert_allclose(prompted, direct, atol=1e-5)


def test_roberta_config_and_length_limit(roberta_dir):
  _, _, config, params = _roberta_checkpoint(roberta_dir, False)
  assert bert.BertConfig.from_hf(transformers.BertConfig()).roberta is False
  ids = jnp.full((1, 11), 5, jnp.int32)
  with pytest.raises(ValueError, match=r'exceeds max_position_embeddings=12 less'):
    bert.BertModel(config).apply({'params': params}, ids)


def test_partial_pooler_is_named(tmp_path):
  hc = _roberta_hf_config()
  weights = _roberta_weights(hc, pooler=True)
  del weights['roberta.pooler.dense.bias']
  hc.save_pretrained(tmp_path)
  safetensors_numpy.save_file(weights, tmp_path / 'model.safetensors')
  with pytest.raises(
    ValueError, match=r"missing 1 tensor\(s\), e\.g\. \['pooler\.dense\.bias'\]"
  ):
    bert.load_hf(tmp_path)


# ---------------------------------------------------------------------------
# Heads (tiny random BERT).

CONFIG = bert.BertConfig(
  vocab_size=50,
  hidden_size=16,
  num_layers=2,
  num_heads=4,
  intermediate_size=24,
  max_position_embeddings=16,
)


def _ids(shape, seed=2):
  return np.asarray(jax.random.randint(jax.random.key(seed), shape, 1, 50))


def _flat_shapes(tree):
  return {k: v.shape for k, v in traverse_util.flatten_dict(tree, sep='/').items()}


@pytest.fixture(scope='module')
def token_classifier():
  ids = _ids((3, 7))
  mask = (np.arange(7)[None] < np.array([[7], [4], [2]])).astype(np.int32)
  model = bert.BertForTokenClassification(CONFIG, num_labels=5)
  params = jax.jit(model.init)(jax.random.key(0), ids, mask)['params']
  return model, params, ids, mask


@pytest.mark.slow
def test_token_classifier_params_shapes_and_hand_computation(token_classifier):
  model, params, ids, mask = token_classifier
  assert set(params) == {'bert', 'classifier'}
  assert _flat_shapes(params['classifier']) == {'kernel': (16, 5), 'bias': (5,)}
  encoder = bert.BertModel(CONFIG)
  assert _flat_shapes(params['bert']) == _flat_shapes(
    jax.eval_shape(encoder.init, jax.random.key(0), ids)['params']
  )
  logits = jax.jit(lambda p: model.apply({'params': p}, ids, mask))(params)
  assert logits.shape == (3, 7, 5) and logits.dtype == jnp.float32
  hidden = encoder.apply({'params': params['bert']}, ids, mask)
  head = params['classifier']
  np.testing.assert_allclose(logits, hidden @ head['kernel'] + head['bias'], atol=1e-5)


@pytest.mark.slow
def test_token_classifier_padding_keeps_real_token_logits(token_classifier):
  model, params, ids, mask = token_classifier
  logits = model.apply({'params': params}, ids, mask)
  n = int(mask[1].sum())
  alone = model.apply({'params': params}, ids[1:2, :n])
  np.testing.assert_allclose(alone[0], logits[1, :n], atol=1e-5)
  extra = model.apply(
    {'params': params},
    np.pad(ids, ((0, 0), (0, 3))),
    np.pad(mask, ((0, 0), (0, 3))),
  )
  real = mask[..., None] > 0
  np.testing.assert_allclose(
    np.where(real, extra[:, :7], 0), np.where(real, logits, 0), atol=1e-5
  )


@pytest.mark.slow
def test_token_classifier_dropout_only_when_not_deterministic(token_classifier):
  model, params, ids, mask = token_classifier
  apply = jax.jit(
    lambda p, rngs=None: model.apply(
      {'params': p}, ids, mask, deterministic=rngs is None, rngs=rngs
    )
  )
  base = apply(params)
  train = apply(params, {'dropout': jax.random.key(0)})
  assert np.abs(train - base).max() > 1e-3


@pytest.fixture(scope='module')
def multiple_choice():
  ids = _ids((2, 3, 6))
  lengths = np.array([[6, 4, 3], [5, 6, 2]])
  mask = (np.arange(6)[None, None] < lengths[..., None]).astype(np.int32)
  model = bert.BertForMultipleChoice(CONFIG)
  params = jax.jit(model.init)(jax.random.key(0), ids, mask)['params']
  return model, params, ids, mask


@pytest.mark.slow
def test_multiple_choice_params_shapes_and_hand_computation(multiple_choice):
  model, params, ids, mask = multiple_choice
  assert set(params) == {'bert', 'classifier'}
  assert _flat_shapes(params['classifier']) == {'kernel': (16, 1), 'bias': (1,)}
  types_ = (ids % 2).astype(np.int32)
  logits = model.apply({'params': params}, ids, mask, types_)
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  encoder, enc = bert.BertModel(CONFIG), {'params': params['bert']}
  # One question-choice row at a time: hidden, HF's pooler tanh(Dense(CLS)).
  hidden_fn = jax.jit(lambda i, m, t: encoder.apply(enc, i[None], m[None], t[None]))
  pooler, head = params['bert']['pooler']['dense'], params['classifier']
  want = np.zeros((2, 3))
  for i in range(2):
    for c in range(3):
      hidden = hidden_fn(ids[i, c], mask[i, c], types_[i, c])
      pooled = np.tanh(hidden[:, 0] @ pooler['kernel'] + pooler['bias'])
      want[i, c] = (pooled @ head['kernel'] + head['bias'])[0, 0]
  np.testing.assert_allclose(logits, want, atol=1e-5)


@pytest.mark.slow
def test_multiple_choice_padding_and_choice_order(multiple_choice):
  model, params, ids, mask = multiple_choice
  apply = lambda i, m: model.apply({'params': params}, i, m)
  logits = apply(ids, mask)
  padded = apply(
    np.pad(ids, ((0, 0), (0, 0), (0, 4))), np.pad(mask, ((0, 0), (0, 0), (0, 4)))
  )
  np.testing.assert_allclose(padded, logits, atol=1e-5)
  # Tokens behind the mask do not matter.
  scrambled = np.where(mask > 0, ids, _ids(ids.shape, seed=9))
  np.testing.assert_allclose(apply(scrambled, mask), logits, atol=1e-5)
  order = [2, 0, 1]
  np.testing.assert_allclose(
    apply(ids[:, order], mask[:, order]), logits[:, order], atol=1e-5
  )
  assert np.abs(logits[:, 0] - logits[:, 1]).max() > 1e-4
  assert np.all(np.isfinite(apply(ids, None)))


@pytest.mark.slow
def test_multiple_choice_rejects_bad_shapes(multiple_choice):
  model, params, ids, mask = multiple_choice
  with pytest.raises(ValueError, match=r'must be \(batch, num_choices, seq\)'):
    model.apply({'params': params}, ids[:, 0], mask[:, 0])
  with pytest.raises(ValueError, match=r'attention_mask has shape \(2, 3, 5\)'):
    model.apply({'params': params}, ids, mask[..., :5])
