"""Tests for peft_jax.models.deberta on tiny random DeBERTa-v2/v3 checkpoints.

No DeBERTa weights ship offline. The parity reference is an independent
float64 NumPy DeBERTa-v2 written from the paper / Hugging Face formulas: it
reads the PyTorch-named arrays directly (so it checks the weight conversion
too), buckets relative positions with scalar Python arithmetic and gathers
the projected relative embeddings per (query, key) pair rather than the
scores. When torch is installed the model is also compared with
``transformers.DebertaV2Model`` on the same random weights.
"""

import math
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import transformers
from flax import traverse_util
from safetensors import numpy as safetensors_numpy

import peft_jax as pj
from peft_jax.models import deberta

SEQ = 20  # > max_relative_positions: exercises log buckets and clipping.
V3 = dict(
  relative_attention=True,
  position_buckets=8,
  max_relative_positions=16,
  pos_att_type='p2c|c2p',
  norm_rel_ebd='layer_norm',
  position_biased_input=False,
  type_vocab_size=0,
)
VARIANTS = {
  'v3_shared_keys': V3 | dict(share_att_key=True),
  'v3_separate_keys': V3 | dict(share_att_key=False),
  'c2p_absolute_types_no_rel_norm': V3
  | dict(
    share_att_key=False,
    pos_att_type='c2p',
    norm_rel_ebd='none',
    position_biased_input=True,
    type_vocab_size=2,
  ),
  'p2c_no_buckets': V3
  | dict(share_att_key=True, pos_att_type='p2c', position_buckets=-1),
}


# ---------------------------------------------------------------------------
# Independent float64 NumPy reference (PyTorch layout: y = x @ W.T + b).


def _ref_bucket(r, buckets, max_pos):
  """Log-bucketed relative position of one integer distance ``r``."""
  mid = buckets // 2
  if buckets <= 0 or max_pos <= 0 or abs(r) <= mid:
    return r
  steps = math.ceil(math.log(abs(r) / mid) / math.log((max_pos - 1) / mid) * (mid - 1))
  return int(math.copysign(steps + mid, r))


def _ln(x, w, prefix, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * w[f'{prefix}.weight'] + w[f'{prefix}.bias']


def _lin(x, w, prefix):
  return x @ w[f'{prefix}.weight'].T + w[f'{prefix}.bias']


def _gelu(x):
  return 0.5 * x * (1.0 + scipy.special.erf(x / np.sqrt(2.0)))


def _np_deberta(torch_weights, hc, ids, mask, token_types=None, prefix_kv=None):
  """Last hidden states ``(batch, seq, hidden)`` of DeBERTa-v2, float64.

  ``prefix_kv``: optional ``(keys, values)`` ``(heads, p, d_head)`` prepended
  in every layer; their scores are the content term alone.
  """
  w = {
    k.removeprefix('deberta.'): v.astype(np.float64) for k, v in torch_weights.items()
  }
  b, s = ids.shape
  h = hc.num_attention_heads
  eps = hc.layer_norm_eps
  att = list(hc.pos_att_type)
  x = w['embeddings.word_embeddings.weight'][ids]
  if hc.position_biased_input:
    x = x + w['embeddings.position_embeddings.weight'][:s]
  if hc.type_vocab_size > 0:
    types_ = np.zeros_like(ids) if token_types is None else token_types
    x = x + w['embeddings.token_type_embeddings.weight'][types_]
  x = _ln(x, w, 'embeddings.LayerNorm', eps) * mask[..., None]
  max_rel = hc.max_relative_positions
  span = hc.position_buckets if hc.position_buckets > 0 else max_rel
  rel_table = w['encoder.rel_embeddings.weight'][: 2 * span]
  if hc.norm_rel_ebd == 'layer_norm':
    rel_table = _ln(rel_table, w, 'encoder.LayerNorm', eps)
  delta = np.array(
    [
      [_ref_bucket(i - j, hc.position_buckets, max_rel) for j in range(s)]
      for i in range(s)
    ]
  )
  c_idx = np.clip(delta + span, 0, 2 * span - 1)  # Pk row for (i, j).
  p_idx = np.clip(-delta.T + span, 0, 2 * span - 1)  # Pq row for (i, j).
  scale = np.sqrt(hc.hidden_size // h * (1 + len(att)))
  split = lambda y: y.reshape(*y.shape[:-1], h, -1).swapaxes(-2, -3)  # (.., h, n, dh)
  both = mask[:, None, :, None] * mask[:, None, None, :] > 0
  for layer in range(hc.num_hidden_layers):
    p = f'encoder.layer.{layer}.attention'
    q, k, v = (
      split(_lin(x, w, f'{p}.self.{n}_proj')) for n in ('query', 'key', 'value')
    )
    pq_name, pk_name = (
      ('query', 'key') if hc.share_att_key else ('pos_query', 'pos_key')
    )
    scores = np.einsum('bhid,bhjd->bhij', q, k)
    if 'c2p' in att:
      pk = split(_lin(rel_table, w, f'{p}.self.{pk_name}_proj'))  # (h, 2span, dh)
      scores = scores + np.einsum('bhid,hijd->bhij', q, pk[:, c_idx])
    if 'p2c' in att:
      pq = split(_lin(rel_table, w, f'{p}.self.{pq_name}_proj'))
      scores = scores + np.einsum('bhjd,hijd->bhij', k, pq[:, p_idx])
    scores = np.where(both, scores / scale, -1e30)
    if prefix_kv is not None:
      pk_, pv_ = prefix_kv
      extra = np.einsum('bhid,hpd->bhip', q, pk_) / scale
      extra = np.where(mask[:, None, :, None] > 0, extra, -1e30)
      scores = np.concatenate([extra, scores], -1)
      v = np.concatenate([np.broadcast_to(pv_, (b, *pv_.shape)), v], -2)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ v).swapaxes(1, 2).reshape(b, s, -1)
    a = _lin(context, w, f'{p}.output.dense')
    x = _ln(x + a, w, f'{p}.output.LayerNorm', eps)
    f = f'encoder.layer.{layer}'
    ff = _lin(_gelu(_lin(x, w, f'{f}.intermediate.dense')), w, f'{f}.output.dense')
    x = _ln(x + ff, w, f'{f}.output.LayerNorm', eps)
  return x


# ---------------------------------------------------------------------------
# Tiny random checkpoints.


def _hf_config(variant='v3_shared_keys', **overrides):
  kwargs = dict(
    vocab_size=50,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=24,
    layer_norm_eps=1e-7,
  )
  return transformers.DebertaV2Config(**(kwargs | VARIANTS[variant] | overrides))


def _random_torch_weights(hc, seed=0):
  """A PyTorch-named DebertaV2Model state dict with random values."""
  d, f = hc.hidden_size, hc.intermediate_size
  span = hc.position_buckets if hc.position_buckets > 0 else hc.max_relative_positions
  shapes = {
    'embeddings.word_embeddings.weight': (hc.vocab_size, d),
    'encoder.rel_embeddings.weight': (2 * span, d),
  }
  norms = ['embeddings.LayerNorm']
  if hc.norm_rel_ebd == 'layer_norm':
    norms.append('encoder.LayerNorm')
  if hc.position_biased_input:
    shapes['embeddings.position_embeddings.weight'] = (hc.max_position_embeddings, d)
  if hc.type_vocab_size:
    shapes['embeddings.token_type_embeddings.weight'] = (hc.type_vocab_size, d)
  dense = {}
  for i in range(hc.num_hidden_layers):
    p = f'encoder.layer.{i}'
    names = ['query_proj', 'key_proj', 'value_proj']
    if not hc.share_att_key:
      names += ['pos_key_proj'] * ('c2p' in hc.pos_att_type)
      names += ['pos_query_proj'] * ('p2c' in hc.pos_att_type)
    for name in names:
      dense[f'{p}.attention.self.{name}'] = (d, d)
    dense[f'{p}.attention.output.dense'] = (d, d)
    dense[f'{p}.intermediate.dense'] = (f, d)
    dense[f'{p}.output.dense'] = (d, f)
    norms += [f'{p}.attention.output.LayerNorm', f'{p}.output.LayerNorm']
  rng = np.random.default_rng(seed)
  normal = lambda scale, shape: rng.normal(scale=scale, size=shape).astype(np.float32)
  weights = {name: normal(0.5, shape) for name, shape in shapes.items()}
  for name, shape in dense.items():
    weights[f'{name}.weight'] = normal(0.3, shape)
    weights[f'{name}.bias'] = normal(0.1, shape[:1])
  for name in norms:
    weights[f'{name}.weight'] = 1 + normal(0.2, (d,))
    weights[f'{name}.bias'] = normal(0.1, (d,))
  return weights


def _write(directory, hc, weights):
  directory = pathlib.Path(directory)
  hc.save_pretrained(directory)
  safetensors_numpy.save_file(weights, directory / 'model.safetensors')
  return directory


def _inputs(batch=3, seq=SEQ, seed=1):
  ids = np.asarray(jax.random.randint(jax.random.key(seed), (batch, seq), 1, 50))
  lengths = [seq, seq - 6, 3][:batch]
  mask = (np.arange(seq)[None] < np.array(lengths)[:, None]).astype(np.int32)
  return ids, mask


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')


@pytest.fixture(scope='module', params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
  hc = _hf_config(request.param)
  weights = _random_torch_weights(hc)
  config, params = deberta.load_hf(
    _write(tmp_path_factory.mktemp(request.param), hc, weights)
  )
  return types.SimpleNamespace(hc=hc, weights=weights, config=config, params=params)


@pytest.fixture(scope='module')
def v3(tmp_path_factory):
  """DeBERTa-v3 layout with separate position projections (both terms)."""
  hc = _hf_config('v3_separate_keys')
  weights = _random_torch_weights(hc, seed=5)
  config, params = deberta.load_hf(_write(tmp_path_factory.mktemp('v3'), hc, weights))
  return types.SimpleNamespace(hc=hc, weights=weights, config=config, params=params)


# ---------------------------------------------------------------------------
# Parity with the NumPy reference.


def test_matches_float64_reference(checkpoint):
  ids, mask = _inputs()
  types_ = (ids % 2) if checkpoint.hc.type_vocab_size else None
  model = deberta.DebertaV2Model(checkpoint.config)
  hidden = jax.jit(lambda p, i, m, t: model.apply({'params': p}, i, m, t))(
    checkpoint.params, ids, mask, types_
  )
  want = _np_deberta(checkpoint.weights, checkpoint.hc, ids, mask, types_)
  assert hidden.shape == (3, SEQ, 32) and hidden.dtype == jnp.float32
  # Every position, padded ones included (HF zeroes their embeddings and
  # lets them attend uniformly).
  np.testing.assert_allclose(hidden, want, atol=1e-4, rtol=0)


def test_config_from_hf_reads_every_option(checkpoint):
  config, hc = checkpoint.config, checkpoint.hc
  assert config.pos_att_type == tuple(hc.pos_att_type)
  assert config.share_att_key == hc.share_att_key
  assert config.position_buckets == hc.position_buckets
  assert config.max_relative == 16
  assert config.scale_factor == 1 + len(hc.pos_att_type)
  assert config.norm_rel_ebd == hc.norm_rel_ebd
  assert config.position_biased_input == hc.position_biased_input


def test_log_buckets_match_the_scalar_formula():
  rel = np.arange(-600, 601)
  for buckets, max_pos in ((8, 16), (256, 512), (6, 10)):
    got = deberta.make_log_bucket_position(rel, buckets, max_pos)
    want = [_ref_bucket(int(r), buckets, max_pos) for r in rel]
    np.testing.assert_array_equal(got, want)
  got = deberta.build_relative_position(3, 3)
  np.testing.assert_array_equal(got, [[0, -1, -2], [1, 0, -1], [2, 1, 0]])
  # DeBERTa-v3: 256 buckets over 512 positions; distances up to 128 kept.
  assert deberta.make_log_bucket_position(
    np.array([128, 129, 511, -511]), 256, 512
  ).tolist() == [128, 129, 255, -255]


def test_params_have_documented_names(checkpoint):
  flat = _flat(checkpoint.params)
  hc = checkpoint.hc
  assert flat['encoder/layer_1/attention/self/query_proj/kernel'].shape == (32, 32)
  assert flat['encoder/layer_0/intermediate/dense/kernel'].shape == (32, 48)
  assert flat['encoder/layer_0/output/dense/kernel'].shape == (48, 32)
  assert flat['encoder/layer_0/attention/output/LayerNorm/scale'].shape == (32,)
  assert flat['encoder/layer_0/output/LayerNorm/bias'].shape == (32,)
  assert flat['embeddings/LayerNorm/scale'].shape == (32,)
  span = hc.position_buckets if hc.position_buckets > 0 else 16
  assert flat['encoder/rel_embeddings/embedding'].shape == (2 * span, 32)
  assert ('encoder/LayerNorm/scale' in flat) == (hc.norm_rel_ebd == 'layer_norm')
  separate = not hc.share_att_key
  pos_key = 'encoder/layer_0/attention/self/pos_key_proj/kernel'
  pos_query = 'encoder/layer_0/attention/self/pos_query_proj/kernel'
  assert (pos_key in flat) == (separate and 'c2p' in hc.pos_att_type)
  assert (pos_query in flat) == (separate and 'p2c' in hc.pos_att_type)
  assert (
    'embeddings/position_embeddings/embedding' in flat
  ) == hc.position_biased_input
  # One Flax leaf per PyTorch tensor, kernels transposed.
  assert len(flat) == len(checkpoint.weights)
  np.testing.assert_array_equal(
    flat['encoder/layer_1/attention/self/value_proj/kernel'],
    checkpoint.weights['encoder.layer.1.attention.self.value_proj.weight'].T,
  )
  model_shapes = jax.eval_shape(
    deberta.DebertaV2Model(checkpoint.config).init,
    jax.random.key(0),
    jnp.zeros((1, 4), jnp.int32),
  )['params']
  assert {k: v.shape for k, v in _flat(model_shapes).items()} == {
    k: v.shape for k, v in flat.items()
  }


def test_matches_huggingface_pytorch(tmp_path):
  torch = pytest.importorskip('torch')
  for variant in ('v3_shared_keys', 'v3_separate_keys'):
    hc = _hf_config(variant)
    torch.manual_seed(0)
    hf_model = transformers.DebertaV2Model(hc).eval()
    with torch.no_grad():
      for p in hf_model.parameters():
        p.add_(0.1 * torch.randn_like(p))
    hf_model.save_pretrained(tmp_path / variant)  # model.safetensors
    config, params = deberta.load_hf(tmp_path / variant)
    ids, mask = _inputs()
    with torch.no_grad():
      want = hf_model(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
      ).last_hidden_state.numpy()
    got = deberta.DebertaV2Model(config).apply({'params': params}, ids, mask)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------
# Behaviour.


def test_padding_does_not_change_real_tokens(v3):
  ids, mask = _inputs()
  model = deberta.DebertaV2Model(v3.config)
  forward = jax.jit(lambda p, i, m: model.apply({'params': p}, i, m))
  hidden = forward(v3.params, ids, mask)
  n = int(mask[1].sum())
  alone = forward(v3.params, ids[1:2, :n], np.ones((1, n), np.int32))
  np.testing.assert_allclose(alone[0], hidden[1, :n], atol=1e-5)


@pytest.mark.slow
def test_sequence_classifier_matches_reference(v3):
  ids, mask = _inputs()
  model = deberta.DebertaV2ForSequenceClassification(v3.config, num_labels=3)
  init = jax.jit(model.init)(jax.random.key(0), ids, mask)['params']
  assert set(init) == {'deberta', 'pooler', 'classifier'}
  assert _flat(init['pooler']).keys() == {'dense/kernel', 'dense/bias'}
  params = dict(init, deberta=v3.params)
  apply = jax.jit(
    lambda p, rngs=None: model.apply(
      {'params': p}, ids, mask, deterministic=rngs is None, rngs=rngs
    )
  )
  logits = apply(params)
  hidden = _np_deberta(v3.weights, v3.hc, ids, mask)
  pooler, head = params['pooler']['dense'], params['classifier']
  pooled = _gelu(
    hidden[:, 0] @ np.asarray(pooler['kernel'], np.float64) + pooler['bias']
  )
  want = pooled @ np.asarray(head['kernel'], np.float64) + head['bias']
  assert logits.shape == (3, 3)
  np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)
  # Dropout only when not deterministic.
  train = lambda seed: apply(params, {'dropout': jax.random.key(seed)})
  assert np.abs(train(0) - logits).max() > 1e-4
  np.testing.assert_array_equal(train(0), train(0))


def test_every_documented_hook_point_is_reached(v3):
  model = deberta.DebertaV2ForSequenceClassification(v3.config, num_labels=2)
  ids, mask = _inputs(batch=2, seq=5)
  points = pj.hook_points(model, ids, mask)
  shapes = {
    name: jax.tree.map(lambda x: x.shape, point.value) for name, point in points.items()
  }
  assert shapes == {
    'deberta/embeddings/input_embeddings': ((2, 5, 32), (2, 5)),
    **{
      f'deberta/encoder/layer_{i}/{point}': shape
      for i in range(2)
      for point, shape in (
        (
          'attention/attention_kv',
          ((2, 5, 4, 8), (2, 5, 4, 8), (2, 1, 1, 5), (2, 5, 32)),
        ),
        ('attention/attention_output', (2, 5, 32)),
        ('attention/attention_block', ((2, 5, 32), (2, 5, 32))),
        ('ffn_intermediate', (2, 5, 48)),
        ('ffn_output', (2, 5, 32)),
        ('ffn_block', ((2, 5, 32), (2, 5, 32))),
      )
    },
  }
  assert all(point.stack == () for point in points.values())


def _adapted(model, rules, params, ids, mask):
  """``(run, theta, buffers)``: ``model`` with ``rules``' activation adapters."""
  tree = pj.by_rules(rules)
  theta, buffers = tree.init(jax.random.key(0), params, pj.hook_points(model, ids))
  run = pj.adapted(tree, lambda w, i, m: model.apply({'params': w}, i, m))
  return run, theta, buffers


def test_every_hook_point_applies_its_adapter(v3):
  # The points of the HF submodules (attention/output, intermediate, output)
  # are named after, and run from, their parents: an adapter scaling the
  # value by 3 at one of them changes the output.
  model = deberta.DebertaV2Model(v3.config)
  ids, mask = _inputs(batch=2, seq=5)
  scale = pj.ActivationAdapter(
    init=lambda key, value: (jnp.asarray(3.0), None),
    apply=lambda value, s, buffers: value * s,
  )
  # At a block point (x, h): scales h, the output the model continues with.
  scale_output = pj.ActivationAdapter(
    init=lambda key, value: (jnp.asarray(3.0), None),
    apply=lambda value, s, buffers: (value[0], value[1] * s),
  )
  plain = model.apply({'params': v3.params}, ids, mask)
  for point, adapter in (
    ('attention/attention_output', scale),
    ('attention/attention_block', scale_output),
    ('ffn_intermediate', scale),
    ('ffn_output', scale),
    ('ffn_block', scale_output),
  ):
    name = f'encoder/layer_1/{point}'
    run, theta, buffers = _adapted(model, [(name, adapter)], v3.params, ids, mask)
    assert list(_flat(theta)) == [name]
    assert np.abs(run(v3.params, theta, buffers, ids, mask) - plain).max() > 1e-3


def _prefix_adapter(pk, pv):
  """Prepends per-head prefix keys/values ``(h, p, d_h)`` at attention_kv."""

  def apply(value, kv, buffers):
    k, v, bias, x = value
    b, p = k.shape[0], kv.shape[2]
    expand = lambda t: jnp.broadcast_to(jnp.swapaxes(t, 0, 1), (b, p, *k.shape[2:]))
    return (
      jnp.concatenate([expand(kv[0]), k], 1),
      jnp.concatenate([expand(kv[1]), v], 1),
      jnp.concatenate([jnp.zeros((b, 1, 1, p), bias.dtype), bias], -1),
      x,
    )

  return pj.ActivationAdapter(
    init=lambda key, value: (jnp.stack([pk, pv]), None), apply=apply
  )


@pytest.mark.slow
def test_prefix_keys_get_the_content_score_only(v3):
  ids, mask = _inputs()
  rng = np.random.default_rng(3)
  pk, pv = (rng.normal(size=(4, 2, 8)).astype(np.float32) for _ in range(2))
  model = deberta.DebertaV2Model(v3.config)
  run, theta, buffers = _adapted(
    model, [(r'.*/attention_kv', _prefix_adapter(pk, pv))], v3.params, ids, mask
  )
  hidden = run(v3.params, theta, buffers, ids, mask)
  want = _np_deberta(v3.weights, v3.hc, ids, mask, prefix_kv=(pk, pv))
  np.testing.assert_allclose(hidden, want, atol=1e-4, rtol=0)


def test_prompt_tuning_prepends_and_drops_positions(v3):
  ids, mask = _inputs()
  model = deberta.DebertaV2Model(v3.config)
  d = v3.config.hidden_size

  def prepend(value, prompt, buffers):
    x, m = value
    rows = jnp.broadcast_to(prompt, (x.shape[0], *prompt.shape))
    ones = jnp.ones((x.shape[0], prompt.shape[0]), m.dtype)
    return jnp.concatenate([rows, x], 1), jnp.concatenate([ones, m], 1)

  prompt = jnp.asarray(np.random.default_rng(0).normal(size=(3, d)), jnp.float32)
  adapter = pj.ActivationAdapter(init=lambda key, value: (prompt, None), apply=prepend)
  run, theta, buffers = _adapted(
    model, [('embeddings/input_embeddings', adapter)], v3.params, ids, mask
  )

  def loss(theta):
    out = run(v3.params, theta, buffers, ids, mask)
    return jnp.sum(out * mask[..., None]), out

  (_, out), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(theta)
  assert out.shape == (3, SEQ, d)
  plain = jax.jit(lambda p: model.apply({'params': p}, ids, mask))(v3.params)
  assert np.abs(out - plain).max() > 1e-3
  grad = grad['embeddings']['input_embeddings']
  assert grad.shape == (3, d)
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


def test_adapter_removing_keys_is_rejected(v3):
  model = deberta.DebertaV2Model(v3.config)
  ids, mask = _inputs(batch=1, seq=4)
  drop = pj.ActivationAdapter(
    init=lambda key, value: (jnp.zeros(()), None),
    apply=lambda value, p, buffers: value._replace(
      keys=value.keys[:, 1:], values=value.values[:, 1:]
    ),
  )
  run, theta, buffers = _adapted(
    model, [(r'.*/attention_kv', drop)], v3.params, ids, mask
  )
  with pytest.raises(ValueError, match='returned 3 keys for a sequence of 4'):
    jax.eval_shape(run, v3.params, theta, buffers, ids, mask)


# ---------------------------------------------------------------------------
# Loading and errors.


def test_prefixed_names_heads_and_ignored_tensors_load(tmp_path):
  hc = _hf_config()
  weights = _random_torch_weights(hc)
  prefixed = {f'deberta.{k}': v for k, v in weights.items()}
  prefixed['deberta.embeddings.position_embeddings.weight'] = np.zeros(
    (24, 32), np.float32
  )
  prefixed['deberta.embeddings.position_ids'] = np.arange(24)[None]
  prefixed['lm_predictions.lm_head.dense.weight'] = np.zeros((32, 32), np.float32)
  prefixed['mask_predictions.classifier.weight'] = np.zeros((1, 32), np.float32)
  prefixed['pooler.dense.weight'] = np.zeros((32, 32), np.float32)
  _, bare = deberta.load_hf(_write(tmp_path / 'a', hc, weights))
  _, params = deberta.load_hf(_write(tmp_path / 'b', hc, prefixed))
  jax.tree.map(np.testing.assert_array_equal, params, bare)


def test_missing_tensor_is_named(tmp_path):
  hc = _hf_config()
  weights = _random_torch_weights(hc)
  del weights['encoder.rel_embeddings.weight']
  with pytest.raises(
    ValueError,
    match=r"missing 1 tensor\(s\), e\.g\. \['encoder\.rel_embeddings\.weight'\]",
  ):
    deberta.load_hf(_write(tmp_path, hc, weights))


def test_unexpected_tensor_is_named(tmp_path):
  hc = _hf_config('v3_shared_keys')
  weights = _random_torch_weights(_hf_config('v3_separate_keys'))
  with pytest.raises(
    ValueError,
    match=r"unexpected tensor\(s\), e\.g\. \['encoder\.layer\.0\.attention\.self\.pos_",
  ):
    deberta.load_hf(_write(tmp_path, hc, weights))


def test_shape_mismatch_is_named(tmp_path):
  hc = _hf_config()
  weights = _random_torch_weights(hc)
  weights['encoder.layer.1.intermediate.dense.weight'] = np.zeros((40, 32), np.float32)
  with pytest.raises(ValueError, match='encoder/layer_1/intermediate/dense/kernel'):
    deberta.load_hf(_write(tmp_path, hc, weights))


def test_missing_files_are_named(tmp_path):
  with pytest.raises(ValueError, match=r"No config\.json in '.*'"):
    deberta.load_hf(tmp_path)
  _hf_config().save_pretrained(tmp_path)
  with pytest.raises(ValueError, match=r'No model\.safetensors.*only safetensors'):
    deberta.load_hf(tmp_path)


@pytest.mark.parametrize(
  'overrides, message',
  [
    (dict(conv_kernel_size=3), 'conv_kernel_size=3.*convolution layer'),
    (dict(hidden_act='relu'), "hidden_act='relu'.*supports only"),
    (dict(pooler_hidden_act='tanh'), "pooler_hidden_act='tanh'"),
    (dict(norm_rel_ebd='rms_norm'), "norm_rel_ebd entry 'rms_norm'"),
    (dict(pos_att_type='p2c|p2p'), "pos_att_type entry 'p2p'"),
    (dict(attention_head_size=16), 'attention_head_size=16'),
  ],
)
def test_unsupported_hf_config_is_rejected(overrides, message):
  with pytest.raises(ValueError, match=message) as info:
    deberta.DebertaV2Config.from_hf(_hf_config(**overrides))
  assert '\n' not in str(info.value)


def test_deberta_v1_config_is_rejected():
  v1 = types.SimpleNamespace(
    model_type='deberta', hidden_size=32, num_attention_heads=4
  )
  with pytest.raises(ValueError, match="model_type='deberta'"):
    deberta.DebertaV2Config.from_hf(v1)


def test_too_long_input_is_rejected_only_with_absolute_positions():
  for variant, limited in (
    ('v3_shared_keys', False),
    ('c2p_absolute_types_no_rel_norm', True),
  ):
    model = deberta.DebertaV2Model(deberta.DebertaV2Config.from_hf(_hf_config(variant)))
    ids = jnp.zeros((1, 25), jnp.int32)
    if limited:
      with pytest.raises(ValueError, match='exceeds max_position_embeddings=24'):
        jax.eval_shape(model.init, jax.random.key(0), ids)
    else:
      jax.eval_shape(model.init, jax.random.key(0), ids)


def test_bad_config_values_are_rejected():
  base = dict(
    vocab_size=10, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=8
  )
  with pytest.raises(ValueError, match='not divisible by num_heads=5'):
    deberta.DebertaV2Config(**(base | dict(num_heads=5)))
  with pytest.raises(ValueError, match='pooler_hidden_size=16 must equal'):
    deberta.DebertaV2Config(**base, pooler_hidden_size=16)
  with pytest.raises(ValueError, match=r'input_ids must be \(batch, seq\)'):
    deberta.DebertaV2Model(deberta.DebertaV2Config(**base)).init(
      jax.random.key(0), jnp.zeros((2, 3, 4), jnp.int32)
    )


@pytest.mark.slow
def test_factored_lora_matches_weight_space_with_shared_keys():
  # query_proj/key_proj also project the relative embeddings (share_att_key):
  # both uses must stay factored (any fallback warning fails the suite).
  config = deberta.DebertaV2Config.from_hf(_hf_config('v3_shared_keys'))
  model = deberta.DebertaV2Model(config)
  ids, mask = _inputs(seq=10)
  frozen = jax.jit(model.init)(jax.random.key(0), ids)['params']
  tree = pj.by_rules(
    [(r'.*/(query_proj|key_proj|value_proj)/kernel', 'lora(rank=2, b_init="normal")')]
  )
  params, buffers = tree.init(jax.random.key(1), frozen)
  fn = lambda w: model.apply({'params': w}, ids, mask)
  fast = jax.jit(pj.adapted(tree, fn, factored=True))(frozen, params, buffers)
  slow = jax.jit(lambda p, b: fn(tree.apply(frozen, p, b)))(params, buffers)
  np.testing.assert_allclose(fast, slow, atol=1e-5)
  assert np.abs(slow - jax.jit(fn)(frozen)).max() > 1e-3
