"""The decoder experiment: SmolLM2 answering fresh/rotten (task ``lm_choice``).

The loss mask, the two-choice scoring and the greedy generations are checked
on a tiny random Llama (plain, and with Houlsby adapters at its hook points)
against a direct computation on each unpadded sequence; the config uses the
real offline SmolLM2 GGUF, and the slow tests run it for 3 steps.
"""

import functools
import json

import gguf
import jax
import ml_collections
import numpy as np
import pytest

import peft_jax as pj
from experiments import train
from experiments.configs import common, smollm2_rotten_tomatoes
from experiments.tasks import lm_choice
from peft_jax.data import rotten_tomatoes
from peft_jax.models import gguf_loading, llama
from tests.references import compiled_programs

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


@functools.cache
def smollm2_reader() -> gguf.GGUFReader:
  """The SmolLM2 GGUF, parsed once (seconds: ~50k tokenizer entries) for
  every test that reads its config or tokenizer."""
  return gguf.GGUFReader(smollm2_or_skip())


@pytest.fixture(scope='module')
def tiny():
  model = llama.LlamaForCausalLM(TINY)
  init = jax.jit(model.init)
  params = init(jax.random.key(0), np.zeros((1, 1), np.int32))['params']
  return model, params


@pytest.fixture(scope='module')
def houlsby(tiny):
  """Houlsby adapters after every attention and MLP block of the tiny Llama,
  initialised large enough to change its outputs: ``(tree, params, buffers)``."""
  model, frozen = tiny
  hooks = pj.hook_points(model, np.zeros((1, 4), np.int32))
  spec = 'houlsby(reduction_factor=4, init_std=0.5)'
  tree = pj.by_rules([(smollm2_rotten_tomatoes.SUB_LAYER_OUTPUTS, spec)])
  params, buffers = tree.init(jax.random.key(2), frozen, hooks)
  return tree, params, buffers


@pytest.fixture(scope='module')
def prompted(tiny):
  """A soft prompt of 3 random vectors before the tiny Llama's embeddings,
  drawn large enough to change its outputs: ``(tree, params, buffers)``."""
  model, frozen = tiny
  hooks = pj.hook_points(model, np.zeros((1, 4), np.int32))
  tree = pj.by_rules([('input_embeddings', "prompt_tuning(length=3, init='normal')")])
  params, buffers = tree.init(jax.random.key(3), frozen, hooks)
  return tree, params, buffers


@pytest.fixture(params=['houlsby', 'prompted'])
def activation_adapter(request):
  """Each of the two adapters: one keeps the length, one prepends positions."""
  return request.getfixturevalue(request.param)


@functools.cache
def compiled_forward(model, tree=None):
  """``(frozen, params, buffers, ids) -> logits`` of ``model`` (with the
  adapters of ``tree``), jitted once for all tests: one compile per shape."""
  apply = lambda weights, ids: model.apply({'params': weights}, ids)
  if tree is None:
    return jax.jit(lambda frozen, params, buffers, ids: apply(frozen, ids))
  return jax.jit(pj.adapted(tree, apply))


def plain_forward(model, params):
  """``ids -> logits`` of one unpadded sequence, the model as it is."""
  run = compiled_forward(model)
  return lambda ids: run(params, None, None, np.array([ids]))[0]


def adapted_forward(model, frozen, tree, params, buffers):
  """``ids -> logits`` of one unpadded sequence, with the adapters."""
  run = compiled_forward(model, tree)
  return lambda ids: run(frozen, params, buffers, np.array([ids]))[0]


def log_probs(forward, ids):
  """float64 next-token log-probabilities of one unpadded sequence."""
  logits = np.asarray(forward(ids), np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def continuation_log_prob(forward, prompt, answer):
  """``sum_j log p(answer_j | prompt, answer_<j)`` by one plain forward."""
  logp = log_probs(forward, prompt + answer)
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
  loss_fn = jax.jit(lm_choice.make_loss_fn(model, answer_width=3))
  loss, metrics = loss_fn(params, batch, None)

  nll, count = 0.0, 0
  for prompt, label in zip(PROMPTS, LABELS, strict=True):
    answer = CHOICES[label]
    nll -= continuation_log_prob(plain_forward(model, params), prompt, answer)
    count += len(answer)
  np.testing.assert_allclose(float(loss), nll / count, rtol=1e-5)
  assert 0 <= float(metrics['answer_accuracy']) <= 1

  # Other padding tokens, or a longer max_length, change nothing.
  padded = lm_choice.training_arrays(PROMPTS, LABELS, CHOICES, 12, 30)
  np.testing.assert_allclose(float(loss_fn(params, padded, None)[0]), float(loss))


def test_answer_only_loss_with_a_soft_prompt_equals_direct_computation(tiny, prompted):
  # The model drops the prompt positions before its final norm, so the loss
  # reads the logits of the answer positions as without a prompt.
  model, frozen = tiny
  tree, params, buffers = prompted
  batch = lm_choice.training_arrays(PROMPTS, LABELS, CHOICES, 9, PAD)
  loss_fn = lm_choice.make_loss_fn(model, answer_width=3)
  loss, _ = jax.jit(pj.adapted(tree, loss_fn))(frozen, params, buffers, batch, None)
  forward = adapted_forward(model, frozen, tree, params, buffers)
  nll = -sum(
    continuation_log_prob(forward, prompt, CHOICES[label])
    for prompt, label in zip(PROMPTS, LABELS, strict=True)
  )
  count = sum(len(CHOICES[label]) for label in LABELS)
  np.testing.assert_allclose(float(loss), nll / count, rtol=1e-5)
  plain, _ = jax.jit(loss_fn)(frozen, batch, None)
  assert abs(float(plain) - float(loss)) > 1e-2  # the prompt acts


def test_apply_at_equals_the_full_logits_at_those_positions(tiny):
  model, params = tiny
  ids = np.array([[1, 5, 6, 7], [1, 9, 4, 3]])
  index = np.array([[3, 0], [1, 2]])
  full = compiled_forward(model)(params, None, None, ids)
  apply_at = jax.jit(functools.partial(lm_choice.apply_at, model))
  np.testing.assert_allclose(
    apply_at(params, ids, index),
    np.take_along_axis(np.asarray(full), index[..., None], axis=1),
    rtol=1e-6,
    atol=1e-6,
  )


def two_choice_scores(model, tree=None):
  """``(frozen, params, buffers) -> (3, 2)`` scores of PROMPTS, CHOICES (jitted)."""
  arrays = lm_choice.prompt_arrays(PROMPTS, 7, PAD)
  choice_ids, choice_mask = lm_choice.choice_arrays(CHOICES, PAD)
  np.testing.assert_array_equal(choice_ids, [[20, 21, 2], [22, 2, 0]])
  scores = lambda weights: lm_choice.choice_scores(
    model,
    weights,
    arrays['prompt_ids'],
    arrays['prompt_length'],
    choice_ids,
    choice_mask,
  )
  if tree is None:
    return jax.jit(lambda frozen, params, buffers: scores(frozen))
  return jax.jit(pj.adapted(tree, scores, factored=True))


def direct_scores(forward):
  return [
    [continuation_log_prob(forward, prompt, choice) for choice in CHOICES]
    for prompt in PROMPTS
  ]


def test_two_choice_scores_equal_direct_computation(tiny):
  model, params = tiny
  scores = two_choice_scores(model)(params, None, None)
  assert scores.shape == (3, 2)
  np.testing.assert_allclose(
    scores, direct_scores(plain_forward(model, params)), rtol=1e-5, atol=1e-5
  )


def test_adapted_scores_through_the_cache_equal_direct_computation(
  tiny, activation_adapter
):
  # The adapters act at every hook point, in the cached prompt pass and in
  # the candidates' pass alike; a soft prompt stands before the cache slots.
  model, frozen = tiny
  tree, params, buffers = activation_adapter
  scores = two_choice_scores(model, tree)(frozen, params, buffers)
  want = direct_scores(adapted_forward(model, frozen, tree, params, buffers))
  np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)
  plain = direct_scores(plain_forward(model, frozen))
  assert np.max(np.abs(np.asarray(want) - plain)) > 1e-2  # the adapters act


def test_the_tasks_of_a_group_share_one_compiled_evaluation(tiny, houlsby):
  """Two tasks (two seeds' labels) evaluate by one compiled program, and
  each counts the prompts whose best-scoring answer is its label, padding
  (``eval_batch_size`` 2 over 3 prompts) left out."""
  model, frozen = tiny
  tree, params, buffers = houlsby
  best = np.argmax(
    direct_scores(adapted_forward(model, frozen, tree, params, buffers)), -1
  )
  config = ml_collections.ConfigDict(
    {'eval_batch_size': 2, 'data': {'eval_limit': None}}
  )
  choice_ids, choice_mask = lm_choice.choice_arrays(CHOICES, PAD)
  lm_choice.correct_count.clear_cache()
  with compiled_programs() as compiled:
    for labels in (best, 1 - best, LABELS):
      split = {**lm_choice.prompt_arrays(PROMPTS, 7, PAD), 'label': labels}
      data = lm_choice.Data(
        splits={},
        prompts={},
        train={},
        evals={'validation': split, 'test': split},
        choice_ids=choice_ids,
        choice_mask=choice_mask,
        answers=('fresh', 'rotten'),
      )
      evaluate = lm_choice.make_evaluate(config, model, data, lambda *args: None)
      metrics = evaluate(tree, frozen, params, buffers)
      assert metrics['test_examples'] == 3
      assert metrics['test_accuracy'] == pytest.approx(np.mean(best == labels))
  assert compiled.count('jit(correct_count)') == 1, compiled


class DigitTokenizer:
  """Decodes ids as space-separated numbers (the tiny model has no vocabulary)."""

  def decode(self, ids, skip_special_tokens):
    del skip_special_tokens
    return ' '.join(map(str, ids))


def greedy(forward, prompt, steps, eos_id):
  """Greedy continuation by full forwards; after ``eos_id``, ``eos_id``."""
  ids, out = list(prompt), []
  for _ in range(steps):
    token = out[-1] if out and out[-1] == eos_id else int(np.argmax(forward(ids)[-1]))
    ids.append(token)
    out.append(token)
  return ' '.join(map(str, out))


@pytest.mark.parametrize('adapted', [False, True], ids=['plain', 'houlsby'])
def test_generations_are_the_greedy_answers(tiny, houlsby, capsys, adapted):
  # The scanned-layer generator stacks the layers' weights and hook
  # parameters; the reference runs the unrolled model once per token.
  model, frozen = tiny
  tree, params, buffers = houlsby
  if not adapted:
    tree = pj.by_rules([])
    params, buffers = tree.init(jax.random.key(0), frozen)
  labels = np.array([1, 0])
  data = lm_choice.Data(
    splits={'test': rotten_tomatoes.Split(['good', 'bad'], labels)},
    prompts={'test': PROMPTS[:2]},
    train={},
    evals={},
    choice_ids=np.zeros((2, 3), np.int32),
    choice_mask=np.ones((2, 3), np.float32),
    answers=('rotten', 'fresh'),
  )
  config = ml_collections.ConfigDict(
    {'generate': {'num_examples': 2, 'max_new_tokens': 4}}
  )
  show = lm_choice.make_show_generations(config, TINY, DigitTokenizer(), 2, data)
  show(tree, frozen, params, buffers)
  if adapted:
    forward = adapted_forward(model, frozen, tree, params, buffers)
  else:
    forward = plain_forward(model, frozen)
  out = capsys.readouterr().out.splitlines()
  assert out == [
    'greedy generations:',
    f"  test[0] (fresh) 'good' -> '{greedy(forward, PROMPTS[0], 4, 2)}'",
    f"  test[1] (rotten) 'bad' -> '{greedy(forward, PROMPTS[1], 4, 2)}'",
  ]


# ---------------------------------------------------------------------------
# Prompts, config and a run on the real SmolLM2.


@pytest.mark.slow  # the real SmolLM2 tokenizer / weights
def test_prompts_follow_the_chat_template_and_truncate_the_text():
  info = gguf_loading.read_tokenizer_info(smollm2_reader())
  tokenizer = gguf_loading.read_tokenizer(smollm2_reader())
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


@functools.cache
def smollm2_shapes():
  """SmolLM2's config, parameter shapes and hook points, abstractly."""
  model_config = gguf_loading.read_config(smollm2_reader())
  model = llama.LlamaForCausalLM(model_config)
  hooks = pj.hook_points(model, np.zeros((1, 8), np.int32))
  return model_config, llama.abstract_params(model_config), hooks


def abstract_init(rules, frozen, hooks):
  """``by_rules(rules).init`` on abstract shapes: no FLOPs, every rule checked."""
  init = functools.partial(pj.by_rules(rules).init, hooks=hooks)
  return jax.eval_shape(init, jax.random.key(0), frozen)


@pytest.mark.slow  # the real SmolLM2 tokenizer / weights
def test_config_builds_and_its_rules_match_smollm2():
  model_config, abstract, hooks = smollm2_shapes()
  layers = model_config.num_layers
  for method in smollm2_rotten_tomatoes.METHODS:
    config = common.load_config(f'{CONFIG}:method={method}')
    assert config.task == 'lm_choice' and config.factored
    params, _ = abstract_init(config.adapters, abstract, hooks)  # every rule matches
    if method == 'prompt_tuning':  # before the layers
      assert set(params) == {'input_embeddings'}
      assert params['input_embeddings'].prompt.shape == (10, model_config.hidden_size)
    else:
      assert {f'layers_{i}' for i in range(layers)} <= set(params), method
  config = common.load_config(CONFIG)
  assert config.method == 'lora' and config.adapters == [
    (smollm2_rotten_tomatoes.SEVEN, 'lora(rank=8, alpha=16)')
  ]
  params, buffers = abstract_init(config.adapters, abstract, hooks)
  assert len(jax.tree.leaves(params)) == 30 * 7 * 2  # a, b of q/k/v/o/gate/up/down
  assert pj.count(params) == 2_442_240 and not jax.tree.leaves(buffers)
  local = common.load_config(f'{CONFIG}:runlocal')
  assert (local.steps, local.data.eval_limit) == (3, 8)
  with pytest.raises(ValueError, match="method='nope'"):
    common.load_config(f'{CONFIG}:method=nope')


def houlsby_trainable(d: int, layers: int) -> int:
  """Two bottlenecks a layer (``r = d / 16``), two RMSNorms a layer and the
  final one."""
  r = d // 16
  return 2 * layers * (2 * d * r + r + d) + (2 * layers + 1) * d


def test_houlsby_config_sits_at_smollm2_hook_points():
  model_config, abstract, hooks = smollm2_shapes()
  d, layers = model_config.hidden_size, model_config.num_layers
  config = common.load_config(f'{CONFIG}:method=houlsby')
  params, _ = abstract_init(config.adapters, abstract, hooks)
  r = d // 16
  for i in (0, layers - 1):
    layer = params[f'layers_{i}']
    for point in (layer['self_attn']['attention_output'], layer['mlp']['ffn_output']):
      assert (point.down.shape, point.up.shape) == ((d, r), (r, d))
    for norm in ('input_layernorm', 'post_attention_layernorm'):
      assert layer[norm]['scale'].shape == (d,)
  assert params['norm']['scale'].shape == (d,)
  assert pj.count(params) == houlsby_trainable(d, layers) == 2_560_176


@pytest.mark.slow
@pytest.mark.parametrize(
  'method', ['lora', 'houlsby', 'prefix_tuning', 'adaption_prompt', 'prompt_tuning']
)
def test_runlocal_run_writes_before_and_after_accuracies(tmp_path, capsys, method):
  smollm2_or_skip()
  config = common.load_config(f'{CONFIG}:runlocal,method={method}')
  # One device: on 8 simulated devices sharing 2 cores a mesh multiplies the
  # time (308 s for LoRA on data=2,tensor=4, 2026-12-01); the model's meshes
  # are tested on a tiny Llama (models/partitioning_test).
  row = train.train_and_evaluate(config, str(tmp_path), {'data': 1})
  assert row['mesh'] == 'data=1,fsdp=1,tensor=1'
  assert json.loads((tmp_path / 'results.json').read_text()) == row
  for split in ('validation', 'test'):
    for when in ('before', 'after'):
      assert 0 <= row[f'{when}_{split}_accuracy'] <= 1
  kv = 3 * 64  # key/value heads × head_dim
  trainable = {
    'lora': 2_442_240,
    'houlsby': houlsby_trainable(576, 30),
    # Per layer W_2, b_2 (2·kv·(512 + 1)); once the shared E, W_1, b_1.
    'prefix_tuning': 30 * 2 * kv * 513 + (10 * kv + kv * 512 + 512),
    'adaption_prompt': 30 * (10 * 576 + 1),  # a prompt and a gate per layer
    'prompt_tuning': 10 * 576,
  }
  assert row['trainable_params'] == trainable[method] and row['method'] == method
  lines = [
    json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()
  ]
  losses = [m['loss'] for m in lines if 'loss' in m]
  assert len(losses) == 3 and all(np.isfinite(losses))
  out = capsys.readouterr().out
  assert out.count('greedy generations:') == 2 and 'test[0] (rotten)' in out
