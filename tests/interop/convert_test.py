"""``python -m peft_jax.convert``: PEFT folder -> peft_jax file -> PEFT folder."""

import numpy as np
import pytest
import safetensors.numpy

import peft_jax as pj
from peft_jax import convert, interop
from peft_jax.models import bert, deberta, llama
from tests.interop.hf_peft_test import FIXTURES


def run(capsys, *argv) -> tuple[int, str, str]:
  code = convert.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


@pytest.mark.parametrize('case', ['llama_dora', 'bert_lora_cls'])
def test_round_trip_keeps_peft_tensors(case, tmp_path, capsys):
  base = FIXTURES / case.split('_')[0]
  ours = tmp_path / 'sub' / 'adapter.safetensors'
  code, out, _ = run(
    capsys, '--from-hf', FIXTURES / case / 'adapter', ours, '--model', base
  )
  assert code == 0 and out.startswith(f'wrote {ours}')
  params, _, metadata = pj.load_adapter(str(ours))
  assert metadata['adapters'] and metadata['hf_peft_config']['peft_type'] == 'LORA'
  assert pj.count(params) > 0
  code, out, _ = run(capsys, '--to-hf', ours, tmp_path / 'hf', '--model', base)
  assert code == 0
  written = safetensors.numpy.load_file(tmp_path / 'hf' / 'adapter_model.safetensors')
  original = safetensors.numpy.load_file(
    FIXTURES / case / 'adapter' / 'adapter_model.safetensors'
  )
  assert sorted(written) == sorted(original)
  for name, value in original.items():
    np.testing.assert_array_equal(written[name], value, err_msg=name)


def test_existing_outputs_are_kept_and_errors_are_one_line(tmp_path, capsys):
  case = FIXTURES / 'llama_lora'
  ours = tmp_path / 'adapter.safetensors'
  ours.write_bytes(b'keep me')
  code, _, err = run(
    capsys, '--from-hf', case / 'adapter', ours, '--model', FIXTURES / 'llama'
  )
  assert code == 2 and 'exists; pass --overwrite' in err
  assert ours.read_bytes() == b'keep me'
  assert err.count('\n') == 1 and 'Traceback' not in err
  other = tmp_path / 'other.safetensors'
  code, _, err = run(
    capsys, '--from-hf', case / 'adapter', other, '--model', FIXTURES / 'bert'
  )
  assert code == 2 and 'has no counterpart in this model' in err
  assert not other.exists()
  missing = tmp_path / 'nope'
  code, _, err = run(capsys, '--to-hf', missing, tmp_path / 'x', '--model', 'y')
  assert code == 2 and 'nope does not exist' in err


@pytest.mark.parametrize(
  ('base', 'kind'),
  [
    ('llama', llama.LlamaForCausalLM),
    ('bert', bert.BertForSequenceClassification),
    ('roberta', bert.BertForSequenceClassification),  # classifier.dense/out_proj
    ('deberta', deberta.DebertaV2ForSequenceClassification),
    ('llama_cls', llama.LlamaForSequenceClassification),  # score, no lm_head
    ('qwen2', llama.LlamaForCausalLM),  # q/k/v biases
  ],
)
def test_load_base_picks_the_task_model_the_checkpoint_holds(base, kind):
  model, params = interop.load_base(FIXTURES / base)
  assert type(model) is kind
  head = {'llama': 'lm_head', 'qwen2': 'lm_head', 'llama_cls': 'score'}.get(
    base, 'classifier'
  )
  assert head in params
  if base == 'llama_cls':
    assert 'lm_head' not in params and model.num_labels == 3
