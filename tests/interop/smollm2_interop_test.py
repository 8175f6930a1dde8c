"""A real PEFT LoRA for the shipped SmolLM2-135M-Instruct, in JAX and back.

``tests/fixtures/hf_peft/smollm2_lora`` was written by real PEFT on
transformers' own dequantization of the same GGUF
(``make_hf_peft_adapters.py``): a rank-2 LoRA on ``q_proj``/``v_proj`` of
the top 8 layers (``layers_to_transform``), the adapted model's logits after
a prompt and its 8 greedy tokens. Slow: loads the 135M-parameter GGUF.
"""

import numpy as np
import pytest
import safetensors.numpy

import peft_jax as pj
from peft_jax import interop
from peft_jax.models import gguf_loading, llama
from tests.interop.hf_peft_test import FIXTURES

pytestmark = pytest.mark.slow
CASE = FIXTURES / 'smollm2_lora'


@pytest.fixture(scope='module')
def smollm2():
  config, frozen, _ = gguf_loading.load_gguf(gguf_loading.smollm2_path())
  model = llama.LlamaForCausalLM(config)
  with np.load(CASE / 'expected.npz') as data:
    expected = {k: data[k] for k in data.files}
  return model, frozen, expected


def test_peft_lora_on_smollm2_gives_peft_logits_and_generation(smollm2):
  model, frozen, expected = smollm2
  loaded = interop.load_hf_adapter(CASE / 'adapter', interop.hf_modules(model), frozen)
  # r=2 on q_proj (576 -> 576) and v_proj (576 -> 192) in 8 layers.
  assert pj.count(loaded.params) == 8 * 2 * ((576 + 576) + (576 + 192))
  merged = pj.merge(loaded.adapter, frozen, loaded.params, loaded.buffers)
  ids = expected['input_ids']
  logits = np.asarray(model.apply({'params': merged}, ids)[0, -1])
  want = expected['last_logits']
  np.testing.assert_allclose(logits, want, rtol=0, atol=1e-5 * np.abs(want).max())
  base = np.asarray(model.apply({'params': frozen}, ids)[0, -1])
  assert np.abs(base - want).max() > 1.0  # The adapter moves the logits.
  new = llama.generate(model, merged, ids, max_new_tokens=8)
  np.testing.assert_array_equal(new, expected['generated'][:, ids.shape[1] :])


def test_smollm2_adapter_exports_to_the_same_peft_tensors(smollm2, tmp_path):
  model, frozen, _ = smollm2
  modules = interop.hf_modules(model)
  loaded = interop.load_hf_adapter(CASE / 'adapter', modules, frozen)
  interop.save_hf_adapter(
    tmp_path, loaded.adapter, frozen, loaded.params, loaded.buffers, modules
  )
  written = safetensors.numpy.load_file(tmp_path / 'adapter_model.safetensors')
  original = safetensors.numpy.load_file(CASE / 'adapter' / 'adapter_model.safetensors')
  assert sorted(written) == sorted(original)
  for name, value in original.items():
    np.testing.assert_array_equal(written[name], value, err_msg=name)
