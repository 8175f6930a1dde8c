"""LN-tuning: the 1-D parameters of normalisation layers become trainable."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax._src import paths
from peft_jax.methods import ln_tuning
from peft_jax.models import bert

VECTOR = jnp.ones(4)


@pytest.mark.parametrize(
  'name',
  [
    'encoder/layer_0/attention/layer_norm/scale',  # BERT (peft_jax.models.bert)
    'encoder/layer_0/output_layer_norm/bias',
    'embeddings/layer_norm/scale',
    'bert/encoder/layer/0/output/LayerNorm/weight',  # HF PyTorch names
    'Block_0/LayerNorm_0/scale',  # Flax auto-names
    'layers_3/RMSNorm_1/scale',
    'h/0/ln_1/scale',  # GPT-2
    'transformer/ln_f/bias',
    'model/layers/0/input_layernorm/weight',  # LLaMA
    'model/layers/0/post_attention_layernorm/weight',
    'model/norm/weight',
    'layers/0/attention_norm/weight',  # Meta LLaMA
    'encoder/final_layer_norm/weight',  # T5
  ],
)
def test_is_layer_norm_matches_norm_modules(name):
  assert ln_tuning.is_layer_norm(name, VECTOR)


@pytest.mark.parametrize(
  'name,leaf',
  [
    ('encoder/layer_0/attention/query/bias', VECTOR),
    ('encoder/layer_0/intermediate/bias', VECTOR),
    ('pooler/dense/bias', VECTOR),
    ('encoder/layer_0/attention/layer_norm/scale', jnp.ones((4, 4))),  # not 1-D
    ('Block_0/BatchNorm_0/scale', VECTOR),  # not a LayerNorm
    ('Block_0/GroupNorm_0/bias', VECTOR),
    ('normal_head/bias', VECTOR),  # 'normal' is not 'norm'
    ('mlp/linear/bias', VECTOR),  # 'ln' only as a whole word
    ('block/norm', VECTOR),  # the parameter's own name is not a module
  ],
)
def test_is_layer_norm_rejects_other_leaves(name, leaf):
  assert not ln_tuning.is_layer_norm(name, leaf)


def test_selects_exactly_the_layer_norms_of_the_bert_model():
  config = bert.BertConfig(
    vocab_size=11, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=16
  )
  ids = jnp.zeros((1, 3), jnp.int32)
  params = jax.eval_shape(bert.BertModel(config).init, jax.random.key(0), ids)['params']
  chosen = [
    n for n, leaf in paths.named_leaves(params) if ln_tuning.is_layer_norm(n, leaf)
  ]
  prefixes = ['embeddings/layer_norm'] + [
    f'encoder/layer_{i}/{m}'
    for i in range(2)
    for m in ('attention/layer_norm', 'output_layer_norm')
  ]
  assert sorted(chosen) == sorted(
    f'{p}/{leaf}' for p in prefixes for leaf in ('scale', 'bias')
  )
  adapter = pj.by_rules([(ln_tuning.is_layer_norm, 'ln_tuning()')])
  trained, buffers = jax.eval_shape(adapter.init, jax.random.key(0), params)
  assert sorted(paths.flatten(trained)) == sorted(chosen) and buffers == {}
  assert pj.count(trained) == 5 * 2 * 8


def test_trains_a_float32_copy_that_replaces_the_leaf():
  gamma = jnp.asarray([1.0, 0.5, 2.0], jnp.bfloat16)
  adapter = ln_tuning.ln_tuning()
  params, buffers = adapter.init(jax.random.key(0), gamma)
  assert buffers is None
  assert params.dtype == jnp.float32 and adapter.num_params(gamma.shape) == 3
  np.testing.assert_array_equal(params, np.float32(gamma))
  out = adapter.apply(gamma, params * 2, buffers)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.float32(out), 2 * np.float32(gamma))
  assert adapter.mergeable and adapter.unapply is None


@pytest.mark.parametrize(
  'kwargs,leaf_shape,message',
  [
    ({}, (2, 2), r'ln_tuning expects a 1-D leaf \(a norm scale or bias\); got shape'),
    ({'param_dtype': 'int8'}, (2,), "param_dtype='int8' is not a floating dtype"),
  ],
)
def test_bad_input_is_a_clear_error(kwargs, leaf_shape, message):
  with pytest.raises(pj.PeftError, match=message):
    ln_tuning.ln_tuning(**kwargs).init(jax.random.key(0), jnp.ones(leaf_shape))
