"""Hook points: identity without a handler; handlers see and replace values."""

import jax
import jax.numpy as jnp
import numpy as np

import peft_jax as pj
from peft_jax.models import bert

CONFIG = bert.BertConfig(
  vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32
)


def setup():
  model = bert.BertForSequenceClassification(CONFIG, num_labels=2, pooling='cls')
  ids = jax.random.randint(jax.random.key(0), (2, 5), 1, 50)
  mask = jnp.ones_like(ids)
  params = model.init(jax.random.key(1), ids, mask)['params']
  return model, params, ids, mask


def test_without_a_handler_hooks_change_nothing():
  model, params, ids, mask = setup()
  plain = model.apply({'params': params}, ids, mask)
  with pj.hook_handler(lambda name, value: value):
    same = model.apply({'params': params}, ids, mask)
  np.testing.assert_array_equal(plain, same)


def test_every_documented_point_is_reached_with_its_shapes():
  model, params, ids, mask = setup()
  seen = {}

  def record(name, value):
    seen[name] = jax.tree.map(jnp.shape, value)
    return value

  with pj.hook_handler(record):
    model.apply({'params': params}, ids, mask)
  layer = 'bert/encoder/layer_1'
  assert seen['bert/embeddings/input_embeddings'] == ((2, 5, 16), (2, 5))
  assert seen[f'{layer}/attention/attention_kv'] == (
    (2, 5, 2, 8),
    (2, 5, 2, 8),
    (2, 1, 1, 5),
  )
  assert seen[f'{layer}/attention/attention_output'] == (2, 5, 16)
  assert seen[f'{layer}/ffn_intermediate'] == (2, 5, 32)
  assert seen[f'{layer}/ffn_output'] == (2, 5, 16)


def test_a_prompt_tuning_handler_prepends_trainable_vectors():
  model, params, ids, mask = setup()
  prompt = 0.1 * jax.random.normal(jax.random.key(2), (3, 16))

  def logits(prompt):
    def prepend(name, value):
      if not name.endswith('input_embeddings'):
        return value
      x, m = value
      p = jnp.broadcast_to(prompt, (x.shape[0], *prompt.shape))
      return jnp.concatenate([p, x], 1), jnp.concatenate(
        [jnp.ones((x.shape[0], 3), m.dtype), m], 1
      )

    with pj.hook_handler(prepend):
      return model.apply({'params': params}, ids, mask)

  out = jax.jit(logits)(prompt)
  assert out.shape == (2, 2)
  assert not np.allclose(out, model.apply({'params': params}, ids, mask))
  grad = jax.grad(lambda p: jnp.sum(logits(p)))(prompt)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_hook_point_outside_a_module_uses_the_given_path():
  seen = []
  with pj.hook_handler(lambda name, v: seen.append(name) or v * 2):
    assert pj.hook_point('my/block', 'ffn_output', 3) == 6
  assert seen == ['my/block/ffn_output']
