"""The decoder experiment: SmolLM2 answering fresh/rotten (task ``lm_choice``).

The loss mask and the two-choice scoring are checked on a tiny random Llama
against a direct computation on each unpadded sequence; the config and a
3-step run use the real offline SmolLM2 GGUF.
"""

import json

import jax
import numpy as np
import pytest

import peft_jax as pj
from experiments import train
from experiments.configs import common, smollm2_rotten_tomatoes
from experiments.tasks import lm_choice
from peft_jax.models import gguf_loading, llama

CONFIG = 'experiments/configs/smollm2_rotten_tomatoes.py'
TINY = llama.LlamaConfig(
  vocab_size=31,
  hidden_size=16,
  intermediate_size=24,
  num_layers=2,
  num_heads=2,
  num_kv_heads=1,
  tie_word_embeddings=True,
)
PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 4], [1, 3, 3, 10, 11, 12]]
CHOICES = [[20, 21, 2], [22, 2]]  # like rotten<|im_end|> and fresh<|im_end|>
LABELS = np.array([1, 0, 0])
PAD = 0


def smollm2_or_skip():
  try:
    return gguf_loading.smollm2_path()
  except ModuleNotFoundError as e:
    pytest.skip(str(e))


@pytest.fixture(scope='module')
def tiny():
  model = llama.LlamaForCausalLM(TINY)
  params = model.init(jax.random.key(0), np.zeros((1, 1), np.int32))['params']
  return model, params


def log_probs(model, params, ids):
  """float64 next-token log-probabilities of one unpadded sequence."""
  logits = np.asarray(model.apply({'params': params}, np.array([ids])), np.float64)[0]
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def continuation_log_prob(model, params, prompt, answer):
  """``sum_j log p(answer_j | prompt, answer_<j)`` by one plain forward."""
  logp = log_probs(model, params, prompt + answer)
  return sum(logp[len(prompt) + j - 1, token] for j, token in enumerate(answer))


# ---------------------------------------------------------------------------
# Loss mask and scoring on hand-made inputs.


def test_training_arrays_mask_the_prompt_and_padding():
  arrays = lm_choice.training_arrays(PROMPTS, LABELS, CHOICES, 10, PAD)
  np.testing.assert_array_equal(
    arrays['input_ids'],
    [
      [1, 5, 6, 7, 8, 22, 2, 0, 0, 0],
      [1, 9, 4, 20, 21, 2, 0, 0, 0, 0],
      [1, 3, 3, 10, 11, 12, 20, 21, 2, 0],
    ],
  )
  np.testing.assert_array_equal(
    arrays['loss_mask'],
    [
      [0, 0, 0, 0, 0, 1, 1, 0, 0, 0],
      [0, 0, 0, 1, 1, 1, 0, 0, 0, 0],
      [0, 0, 0, 0, 0, 0, 1, 1, 1, 0],
    ],
  )
  np.testing.assert_array_equal(arrays['attention_mask'].sum(1), [7, 6, 9])
  np.testing.assert_array_equal(arrays['answer_start'], [5, 3, 6])
  with pytest.raises(pj.PeftError, match='example 2 has 9 tokens > max_length=8'):
    lm_choice.training_arrays(PROMPTS, LABELS, CHOICES, 8, PAD)


def test_answer_only_loss_equals_direct_computation(tiny):
  model, params = tiny
  # max_length 9: the longest row ends exactly at the edge.
  batch = lm_choice.training_arrays(PROMPTS, LABELS, CHOICES, 9, PAD)
  loss_fn = lm_choice.make_loss_fn(model, answer_width=3)
  loss, metrics = jax.jit(loss_fn)(params, batch, None)

  nll, count = 0.0, 0
  for prompt, label in zip(PROMPTS, LABELS, strict=True):
    answer = CHOICES[label]
    nll -= continuation_log_prob(model, params, prompt, answer)
    count += len(answer)
  np.testing.assert_allclose(float(loss), nll / count, rtol=1e-5)
  assert 0 <= float(metrics['answer_accuracy']) <= 1

  # Other padding tokens, or a longer max_length, change nothing.
  padded = lm_choice.training_arrays(PROMPTS, LABELS, CHOICES, 12, 30)
  np.testing.assert_allclose(float(loss_fn(params, padded, None)[0]), float(loss))


def test_apply_at_equals_the_full_logits_at_those_positions(tiny):
  model, params = tiny
  ids = np.array([[1, 5, 6, 7], [1, 9, 4, 3]])
  index = np.array([[3, 0], [1, 2]])
  full = model.apply({'params': params}, ids)
  np.testing.assert_allclose(
    lm_choice.apply_at(model, params, ids, index),
    np.take_along_axis(np.asarray(full), index[..., None], axis=1),
    rtol=1e-6,
    atol=1e-6,
  )


def test_two_choice_scores_equal_direct_computation(tiny):
  model, params = tiny
  arrays = lm_choice.prompt_arrays(PROMPTS, 7, PAD)
  choice_ids, choice_mask = lm_choice.choice_arrays(CHOICES, PAD)
  np.testing.assert_array_equal(choice_ids, [[20, 21, 2], [22, 2, 0]])
  scores = jax.jit(lm_choice.choice_scores, static_argnums=0)(
    model,
    params,
    arrays['prompt_ids'],
    arrays['prompt_length'],
    choice_ids,
    choice_mask,
  )
  want = [
    [continuation_log_prob(model, params, prompt, choice) for choice in CHOICES]
    for prompt in PROMPTS
  ]
  assert scores.shape == (3, 2)
  np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Prompts, config and a run on the real SmolLM2.


def test_prompts_follow_the_chat_template_and_truncate_the_text():
  path = smollm2_or_skip()
  info = gguf_loading.read_tokenizer_info(path)
  tokenizer = gguf_loading.read_tokenizer(path)
  config = common.load_config(CONFIG)
  system, user = config.model.system, config.model.user
  render = lambda text: lm_choice.render_prompt(
    info.chat_template, system, user.format(text=text)
  )
  encode = lambda words: tokenizer.encode(render(' '.join(words))).ids
  short, long = 'Well-meaning but inert.', ' '.join(['A truly wonderful film.'] * 20)
  prompts = lm_choice.encode_prompts(
    tokenizer, info.chat_template, system, user, [short, long], 60
  )
  assert prompts[0] == tokenizer.encode(render(short)).ids
  assert render(short).startswith('<|im_start|>system\nAnswer with one word.')
  # The long text keeps its most leading words that fit in 60 tokens.
  words = long.split()
  kept = next(k for k in range(len(words), 0, -1) if prompts[1] == encode(words[:k]))
  assert len(encode(words[: kept + 1])) > 60 >= len(prompts[1]) > 50
  # The answer tokens are what the template's assistant turn would hold.
  for word in ('rotten', 'fresh'):
    choice = [*tokenizer.encode(word).ids, info.eos_id]
    assert (
      prompts[0] + choice == tokenizer.encode(render(short) + word + '<|im_end|>').ids
    )
  with pytest.raises(pj.PeftError, match='the prompt template alone takes'):
    lm_choice.encode_prompts(tokenizer, info.chat_template, system, user, [short], 20)


def test_config_builds_and_its_rules_match_smollm2():
  model_config = gguf_loading.read_config(smollm2_or_skip())
  abstract = llama.abstract_params(model_config)
  for method in smollm2_rotten_tomatoes.METHODS:
    config = common.load_config(f'{CONFIG}:method={method}')
    assert config.task == 'lm_choice' and config.factored
    adapter = pj.by_rules(config.adapters)
    theta = jax.eval_shape(adapter.init, jax.random.key(0), abstract)  # matches
    assert len(theta) == model_config.num_layers, method
  config = common.load_config(CONFIG)
  assert config.method == 'lora' and config.adapters[0][1] == 'lora(rank=8, alpha=16)'
  theta = jax.eval_shape(pj.by_rules(config.adapters).init, jax.random.key(0), abstract)
  names = [
    '/'.join(str(k.key) for k in path)
    for path, _ in jax.tree_util.tree_flatten_with_path(theta)[0]
  ]
  assert len(names) == 30 * 7 * 2  # a and b of q/k/v/o/gate/up/down in 30 layers
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(theta)) == 2_442_240
  local = common.load_config(f'{CONFIG}:runlocal')
  assert (local.steps, local.data.eval_limit) == (3, 8)
  with pytest.raises(ValueError, match="method='nope'"):
    common.load_config(f'{CONFIG}:method=nope')


def test_runlocal_run_writes_before_and_after_accuracies(tmp_path, capsys):
  smollm2_or_skip()
  config = common.load_config(f'{CONFIG}:runlocal')
  row = train.train_and_evaluate(config, str(tmp_path))
  assert json.loads((tmp_path / 'results.json').read_text()) == row
  for split in ('validation', 'test'):
    for when in ('before', 'after'):
      assert 0 <= row[f'{when}_{split}_accuracy'] <= 1
  assert row['trainable_params'] == 2_442_240 and row['method'] == 'lora'
  lines = [
    json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()
  ]
  losses = [m['loss'] for m in lines if 'loss' in m]
  assert len(losses) == 3 and all(np.isfinite(losses))
  out = capsys.readouterr().out
  assert out.count('greedy generations:') == 2 and 'test[0] (rotten)' in out
