"""Hugging Face's Trainer decay groups (``pj.hf_decay_mask``): decided by
the names along each parameter's path, and AdamW with that mask leaves
biases and normalisation parameters undecayed, one adapter or many."""

import jax
import numpy as np
import optax
import pytest

import peft_jax as pj
from peft_jax._src import paths

# A BERT-like and a Llama-like frozen tree, with the Trainer's decision for
# each leaf written by hand from its rule ("bias" in the name, or a
# parameter of a LayerNorm/RMSNorm module: no decay).
FROZEN = {
  'bert': {
    'encoder': {
      'layer_0': {
        'attention': {
          'query': {'kernel': (4, 4), 'bias': (4,)},
          'output': {'LayerNorm': {'scale': (4,), 'bias': (4,)}},
        },
      },
    },
  },
  'llama': {
    'layers_0': {
      'input_layernorm': {'scale': (4,)},
      'mlp': {'up_proj': {'kernel': (4, 6)}},
    },
    'norm': {'scale': (4,)},
  },
  'classifier': {'kernel': (4, 2), 'bias': (2,)},
}
RULES = [
  ('.*(query|up_proj)/kernel', 'lora(rank=2, b_init="normal")'),
  ('.*(bias|scale)|classifier/kernel', 'full()'),
]
DECAYED = {  # leaf path (LoRA's factors under the kernel) -> the Trainer decays it
  'bert/encoder/layer_0/attention/query/kernel/a': True,
  'bert/encoder/layer_0/attention/query/kernel/b': True,
  'bert/encoder/layer_0/attention/query/bias': False,
  'bert/encoder/layer_0/attention/output/LayerNorm/scale': False,
  'bert/encoder/layer_0/attention/output/LayerNorm/bias': False,
  'llama/layers_0/input_layernorm/scale': False,
  'llama/layers_0/mlp/up_proj/kernel/a': True,
  'llama/layers_0/mlp/up_proj/kernel/b': True,
  'llama/norm/scale': False,
  'classifier/kernel': True,
  'classifier/bias': False,
}
LR, DECAY = 0.1, 0.5


def frozen_tree():
  rng = np.random.default_rng(0)
  return jax.tree.map(
    lambda shape: rng.normal(size=shape).astype(np.float32),
    FROZEN,
    is_leaf=lambda x: isinstance(x, tuple),
  )


@pytest.fixture(scope='module')
def adapter_and_params():
  adapter = pj.by_rules(RULES)
  params, _ = adapter.init(jax.random.key(1), frozen_tree())
  return adapter, params


def test_the_mask_follows_the_trainers_rule_leaf_by_leaf(adapter_and_params):
  _, params = adapter_and_params
  assert paths.flatten(pj.hf_decay_mask(params)) == DECAYED


def expected_after_one_zero_gradient_step(params):
  """θ − η·λ·θ where the Trainer decays, θ elsewhere (a zero gradient makes
  Adam's own update 0)."""
  return {
    name: np.asarray(leaf) * (1 - LR * DECAY) if DECAYED[name] else np.asarray(leaf)
    for name, leaf in paths.flatten(params).items()
  }


@pytest.mark.parametrize(
  'optimizer',
  [
    optax.adamw(LR, weight_decay=DECAY, mask=pj.hf_decay_mask),
    pj.adamw_per_adapter(LR, DECAY, mask=pj.hf_decay_mask),
  ],
  ids=['optax.adamw', 'adamw_per_adapter'],
)
def test_adamw_with_the_mask_decays_only_the_masked_leaves(
  adapter_and_params, optimizer
):
  _, params = adapter_and_params
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = optimizer.update(zeros, optimizer.init(params), params)
  got = paths.flatten(optax.apply_updates(params, updates))
  want = expected_after_one_zero_gradient_step(params)
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, err_msg=name)
