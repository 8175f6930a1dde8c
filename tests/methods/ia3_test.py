"""(IA)³ in weight space, both forms, against float64 NumPy.

Output form (default): ``w' = w · diag(l_out)``, ``y = (x @ w) ⊙ l_out``.
Feed-forward form (HF PEFT's ``feedforward_modules``): ``w' = diag(l_in) · w``,
``y = (x ⊙ l_in) @ w``; HF merges it as ``W * ia3_l`` with ``W = wᵀ:
(out_features, in_features)`` and ``ia3_l: (1, in_features)``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import peft_jax as pj
from peft_jax.methods.ia3 import Ia3InputParams, Ia3Params
from peft_jax.models import bert
from tests import references

D_IN, D_OUT = 7, 5


def random_case(seed):
  """``(w (d_in, d_out), x (3, d_in), l_in (d_in,), l_out (d_out,))``, float64."""
  rng = np.random.default_rng(seed)
  w, x = rng.normal(size=(D_IN, D_OUT)), rng.normal(size=(3, D_IN))
  return w, x, rng.uniform(0.5, 1.5, D_IN), rng.uniform(0.5, 1.5, D_OUT)


def close(got, want):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-6)


def test_output_form_is_unchanged():
  w, x, _, l_out = random_case(0)
  adapter = pj.ia3()
  params, buffers = adapter.init(jax.random.key(0), jnp.float32(w))
  assert isinstance(params, Ia3Params) and buffers is None
  np.testing.assert_array_equal(params.l_out, np.ones(D_OUT))
  assert adapter.num_params((D_IN, D_OUT)) == pj.count(params) == D_OUT
  params = Ia3Params(jnp.float32(l_out))
  merged = adapter.apply(jnp.float32(w), params, None)
  close(merged, w @ np.diag(l_out))
  close(
    adapter.linear.factored(jnp.float32(x), jnp.float32(w), params, None),
    (x @ w) * l_out,
  )
  close(adapter.unapply(merged, params, None), w)


def test_feedforward_form_scales_the_input():
  w, x, l_in, _ = random_case(1)
  adapter = pj.ia3(feedforward=True)
  params, buffers = adapter.init(jax.random.key(0), jnp.float32(w))
  assert isinstance(params, Ia3InputParams) and buffers is None
  np.testing.assert_array_equal(params.l_in, np.ones(D_IN))
  assert adapter.num_params((D_IN, D_OUT)) == pj.count(params) == D_IN
  params = Ia3InputParams(jnp.float32(l_in))
  merged = adapter.apply(jnp.float32(w), params, None)
  close(merged, np.diag(l_in) @ w)
  close(merged, (w.T * l_in[None, :]).T)  # HF: W * ia3_l, W = wᵀ, (1, d_in)
  factored = adapter.linear.factored(jnp.float32(x), jnp.float32(w), params, None)
  close(factored, (x * l_in) @ w)
  close(adapter.unapply(merged, params, None), w)


def test_feedforward_form_keeps_the_kernel_dtype():
  w, _, l_in, _ = random_case(2)
  adapter = pj.ia3(feedforward=True, param_dtype='bfloat16')
  params, _ = adapter.init(jax.random.key(0), jnp.bfloat16(w))
  assert params.l_in.dtype == jnp.bfloat16
  merged = adapter.apply(jnp.bfloat16(w), Ia3InputParams(jnp.bfloat16(l_in)), None)
  assert merged.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.float64(merged), np.diag(l_in) @ w, rtol=2e-2, atol=2e-2
  )


def test_spec_strings_round_trip():
  adapter = pj.get('ia3(feedforward=True)')
  assert adapter.name == "ia3(feedforward=True, param_dtype='float32')"
  assert pj.get(adapter.name) is adapter is pj.ia3(feedforward=True)
  assert pj.get('ia3()').name == "ia3(feedforward=False, param_dtype='float32')"
  assert pj.get('ia3()') is not adapter


def test_feedforward_form_through_by_rules_merges_and_unmerges():
  w, x, l_in, _ = random_case(3)
  frozen = {'dense': {'kernel': jnp.float32(w)}}
  tree = pj.by_rules([('dense/kernel', 'ia3(feedforward=True)')])
  _, buffers = tree.init(jax.random.key(0), frozen)
  params = {'dense': {'kernel': Ia3InputParams(jnp.float32(l_in))}}
  merged = pj.merge(tree, frozen, params, buffers)
  close(merged['dense']['kernel'], np.diag(l_in) @ w)
  close(pj.unmerge(tree, merged, params, buffers)['dense']['kernel'], w)
  dense = lambda weights, x: x @ weights['dense']['kernel']
  y = pj.adapted(tree, dense, factored=True)(frozen, params, buffers, jnp.float32(x))
  close(y, (x * l_in) @ w)


@pytest.mark.parametrize(
  'spec,message',
  [
    ('ia3(feedforward=1)', r'ia3: feedforward=1 must be True or False'),
    ("ia3(feedforward='yes')", r"ia3: feedforward='yes' must be True or False"),
    ("ia3(param_dtype='int32')", r"ia3: param_dtype='int32' is not a floating"),
    (
      "ia3(feedforward=True, param_dtype='int8')",
      r"ia3: param_dtype='int8' is not a floating",
    ),
  ],
)
def test_bad_arguments_are_one_line_errors(spec, message):
  with pytest.raises(pj.PeftError, match=message) as error:
    pj.get(spec)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('feedforward', [False, True])
def test_non_matrix_leaf_is_a_one_line_error(feedforward):
  adapter = pj.ia3(feedforward=feedforward)
  with pytest.raises(pj.PeftError, match=r'ia3 expects a 2-D kernel') as error:
    adapter.init(jax.random.key(0), jnp.ones((3,)))
  assert '\n' not in str(error.value)


# ---------------------------------------------------------------------------
# Parity with Hugging Face PEFT: tests/fixtures/ia3_hf.npz, written by
# tests/fixtures/make_ia3_fixture.py with torch, transformers and peft (their
# versions are in the file), every ``ia3_l`` moved away from 1.
#
# The mapping from PEFT's saved names (``get_peft_model_state_dict``) to our
# parameter tree: ``base_model.model.<module>.ia3_l`` names the module whose
# ``kernel`` we scale (``HF_IA3_MODULES``); an output-form scale ``ia3_l:
# (out, 1)`` is ``Ia3Params(l_out=ia3_l[:, 0])``, a feed-forward one ``(1,
# in)`` is ``Ia3InputParams(l_in=ia3_l[0])``. No transposes: a scale is a
# vector.
#
# Tolerance 1e-5: float32 round-off between torch and XLA through 2 layers
# (measured ≲ 4e-6 on outputs of order 1); one scale moved by 1e-2 gives
# ≳ 1e-3.

# PEFT's module names (under its ``base_model.model.`` prefix) -> our modules,
# whose ``kernel`` the scale adapts.
HF_IA3_MODULES = {
  'llama': {
    'model.layers.{i}.self_attn.k_proj': 'layers_{i}/self_attn/k_proj',
    'model.layers.{i}.self_attn.v_proj': 'layers_{i}/self_attn/v_proj',
    'model.layers.{i}.mlp.down_proj': 'layers_{i}/mlp/down_proj',
  },
  'bert': {
    'bert.encoder.layer.{i}.attention.self.key': 'encoder/layer_{i}/attention/key',
    'bert.encoder.layer.{i}.attention.self.value': 'encoder/layer_{i}/attention/value',
    'bert.encoder.layer.{i}.output.dense': 'encoder/layer_{i}/output',
  },
}


def hf_ia3_params(arrays, part: str, layers: int) -> dict:
  """Our weight-space (IA)³ tree from PEFT's ``ia3_l`` tensors (see above):
  ``(n, 1)`` -> ``Ia3Params``, ``(1, n)`` -> ``Ia3InputParams``; every
  ``ia3_l`` of the fixture part is used."""
  flat, used = {}, set()
  for i in range(layers):
    for theirs, ours in HF_IA3_MODULES[part].items():
      name = f'{part}/base_model.model.{theirs.format(i=i)}.ia3_l'
      scale = arrays[name]
      used.add(name)
      kernel = ours.format(i=i) + '/kernel'
      if scale.shape[1] == 1:
        flat[kernel] = Ia3Params(jnp.asarray(scale[:, 0]))
      else:
        flat[kernel] = Ia3InputParams(jnp.asarray(scale[0]))
  assert used == {k for k in arrays if k.startswith(f'{part}/') and k.endswith('ia3_l')}
  return traverse_util.unflatten_dict(flat, sep='/')


@pytest.mark.parametrize('factored', [False, True])
def test_llama_logits_match_hf_peft_ia3(factored):
  """PEFT's (IA)³ on a tiny GQA Llama without biases, ``k_proj``, ``v_proj``
  scaled at their output and ``down_proj`` at its input
  (``feedforward_modules``): ``ia3()`` on the ``k_proj``/``v_proj`` kernels
  and ``ia3(feedforward=True)`` on ``down_proj``'s give HF's logits (row 1
  padded), merged and factored."""
  arrays = references.hf_fixture('ia3')
  model, frozen = references.hf_llama(arrays, 'llama')
  params = hf_ia3_params(arrays, 'llama', model.config.num_layers)
  assert isinstance(params['layers_1']['mlp']['down_proj']['kernel'], Ia3InputParams)
  tree = pj.by_rules(
    [
      (r'layers_\d+/self_attn/(k|v)_proj/kernel', 'ia3()'),
      (r'layers_\d+/mlp/down_proj/kernel', 'ia3(feedforward=True)'),
    ]
  )
  ids = arrays['llama/input_ids'].astype(np.int32)
  mask = arrays['llama/attention_mask'].astype(np.int32)
  logits = lambda w, ids, mask: model.apply({'params': w}, ids, attention_mask=mask)
  got = jax.jit(pj.adapted(tree, logits, factored=factored))(
    frozen, params, None, ids, mask
  )
  np.testing.assert_allclose(got, arrays['llama/logits'], rtol=1e-5, atol=1e-5)


def test_bert_matches_hf_peft_ia3_once_key_and_value_biases_are_scaled():
  """PEFT's (IA)³ on a tiny BERT, whose ``key``/``value`` have biases: HF's
  output form scales ``x Wᵀ + b`` (the bias too), ``ia3()`` scales the
  kernel only (``ia3.py``'s docstring). So ``ia3()`` on ``key``/``value``
  and ``ia3(feedforward=True)`` on the FFN's ``output`` give HF's last hidden
  states once the frozen biases are replaced by ``b ⊙ l`` (the merge HF's
  output form amounts to), and differ without that."""
  arrays = references.hf_fixture('ia3')
  classifier, frozen = references.hf_bert_classifier(arrays, 'bert')
  model, frozen = bert.BertModel(classifier.config), frozen['bert']
  params = hf_ia3_params(arrays, 'bert', classifier.config.num_layers)
  tree = pj.by_rules(
    [
      (r'encoder/layer_\d+/attention/(key|value)/kernel', 'ia3()'),
      (r'encoder/layer_\d+/output/kernel', 'ia3(feedforward=True)'),
    ]
  )
  scaled = traverse_util.flatten_dict(frozen, sep='/')
  for name, scale in traverse_util.flatten_dict(params, sep='/').items():
    if isinstance(scale, Ia3Params):  # key and value
      bias = name.removesuffix('kernel') + 'bias'
      scaled[bias] = scaled[bias] * scale.l_out
  scaled = traverse_util.unflatten_dict(scaled, sep='/')
  ids = arrays['bert/input_ids'].astype(np.int32)
  mask = arrays['bert/attention_mask'].astype(np.int32)
  hidden = jax.jit(
    pj.adapted(tree, lambda w, ids, mask: model.apply({'params': w}, ids, mask))
  )
  want = arrays['bert/hidden']
  np.testing.assert_allclose(
    hidden(scaled, params, None, ids, mask), want, rtol=1e-5, atol=1e-5
  )
  assert np.abs(hidden(frozen, params, None, ids, mask) - want).max() > 1e-2
