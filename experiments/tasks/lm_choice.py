"""Classification as an instruction for a causal LM: answer with one word.

A chat model (SmolLM2-135M-Instruct from its offline GGUF, dequantized to
float32, frozen) gets each example as a ChatML prompt: a short system message
and a user turn holding the text and a question; the assistant answer is the
label's word (``rotten`` or ``fresh`` for Rotten Tomatoes) followed by the
end-of-turn token ``<|im_end|>``.

* Training: causal-LM cross-entropy on the answer tokens only (the prompt
  and the right padding are masked out), on fixed-length right-padded
  batches (one compile), batch ``t`` a pure function of ``t``.
* Evaluation: multiple-choice scoring. Each candidate answer's summed
  log-probability given the prompt (``choice_scores``: the prompt is run once
  into a KV cache, then every candidate continues from it); the prediction is
  the best-scoring candidate. Accuracy on validation and test (the first
  ``config.data.eval_limit`` of each when set, ``tasks.accuracies``), through
  ``peft_jax.adapted(..., factored=True)`` like training.
* Generations: greedy answers (``llama.generate`` through
  ``peft_jax.adapted``) to a few fixed test prompts, printed at every
  evaluation (before and after training), so the run log shows what the
  model says; the metrics hold accuracies only (the trainer's metrics are
  floats).

Activation adapters run at their hook points in training, scoring and
generation alike: ``houlsby`` at ``attention_output``/``ffn_output``, prefix
tuning at ``attention_kv`` and prompt tuning at ``input_embeddings`` (their
keys stand before the KV cache slots; the model drops the prompt positions
before its final norm, so the loss still runs the LM head at the answer
positions only), LLaMA-Adapter at ``adaption_prompt``.
"""

import functools
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import peft_jax as pj
from experiments import tasks
from experiments.configs import common
from peft_jax import PeftError
from peft_jax.data import batching, rotten_tomatoes
from peft_jax.models import gguf_loading, llama

CHECKPOINTS = {'smollm2': gguf_loading.smollm2_path}
DATASETS = {'rotten_tomatoes': rotten_tomatoes}
Array = jax.Array | np.ndarray
Arrays = dict[str, np.ndarray]


def render_prompt(chat_template: str, system: str, user: str) -> str:
  """The chat prompt up to and including the assistant turn's header."""
  messages = [
    {'role': 'system', 'content': system},
    {'role': 'user', 'content': user},
  ]
  return gguf_loading.apply_chat_template(chat_template, messages)


def encode_prompts(
  tokenizer, chat_template: str, system: str, user_format: str, texts, budget: int
) -> list[list[int]]:
  """Token ids of each text's prompt, at most ``budget`` tokens each.

  ``user_format.format(text=...)`` is the user turn. A prompt that is too
  long keeps the most leading words of its text that fit (the template and
  the question are always kept whole).

  Raises:
    PeftError: if even an empty text does not fit in ``budget``.
  """
  render = lambda text: render_prompt(
    chat_template, system, user_format.format(text=text)
  )
  overhead = len(tokenizer.encode(render('')).ids)
  if overhead >= budget:
    raise PeftError(
      f'the prompt template alone takes {overhead} tokens, more than the '
      f'{budget} left for it; raise model.max_length or shorten the messages'
    )
  encode = lambda words: tokenizer.encode(render(' '.join(words))).ids
  prompts = []
  for text, encoding in zip(
    texts, tokenizer.encode_batch([render(t) for t in texts]), strict=True
  ):
    ids, words = encoding.ids, text.split()
    if len(ids) > budget:  # Bisect: the most leading words that fit.
      fits, too_many = 0, len(words)
      while too_many - fits > 1:
        middle = (fits + too_many) // 2
        fits, too_many = (
          (middle, too_many)
          if len(encode(words[:middle])) <= budget
          else (fits, middle)
        )
      ids = encode(words[:fits])
    prompts.append(ids)
  return prompts


def training_arrays(
  prompts: Sequence[list[int]],
  labels: np.ndarray,
  choices: Sequence[list[int]],
  max_length: int,
  pad_id: int,
) -> Arrays:
  """Right-padded ``prompt + answer`` rows and the answer-only loss mask.

  Returns:
    ``input_ids``, ``attention_mask`` (1: real token) and ``loss_mask``
    (1 where the token is part of the answer, i.e. a target), each
    ``(n, max_length)`` int32, and ``answer_start`` ``(n,)`` (the prompt
    lengths).
  """
  n = len(prompts)
  input_ids = np.full((n, max_length), pad_id, np.int32)
  attention_mask = np.zeros((n, max_length), np.int32)
  loss_mask = np.zeros((n, max_length), np.int32)
  answer_start = np.zeros((n,), np.int32)
  for i, (prompt, label) in enumerate(zip(prompts, labels, strict=True)):
    row = [*prompt, *choices[label]]
    if len(row) > max_length:
      raise PeftError(f'example {i} has {len(row)} tokens > max_length={max_length}')
    input_ids[i, : len(row)] = row
    attention_mask[i, : len(row)] = 1
    loss_mask[i, len(prompt) : len(row)] = 1
    answer_start[i] = len(prompt)
  return {
    'input_ids': input_ids,
    'attention_mask': attention_mask,
    'loss_mask': loss_mask,
    'answer_start': answer_start,
  }


def prompt_arrays(prompts: Sequence[list[int]], length: int, pad_id: int) -> Arrays:
  """Right-padded prompts ``(n, length)`` and their lengths ``(n,)``."""
  ids = np.full((len(prompts), length), pad_id, np.int32)
  for i, prompt in enumerate(prompts):
    ids[i, : len(prompt)] = prompt
  return {'prompt_ids': ids, 'prompt_length': np.array([len(p) for p in prompts])}


def choice_arrays(choices: Sequence[list[int]], pad_id: int) -> tuple[Array, Array]:
  """``(n_choices, c)`` right-padded candidate ids and their 1/0 mask."""
  width = max(len(c) for c in choices)
  ids = np.full((len(choices), width), pad_id, np.int32)
  mask = np.zeros((len(choices), width), np.float32)
  for k, choice in enumerate(choices):
    ids[k, : len(choice)], mask[k, : len(choice)] = choice, 1.0
  return ids, mask


def token_log_probs(logits: Array, targets: Array) -> Array:
  """``log softmax(logits)[..., target]`` without a full log-softmax array."""
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def apply_at(model: llama.LlamaForCausalLM, params, input_ids, index, **kwargs):
  """``model.apply`` with the LM head run only at positions ``index``.

  The final RMSNorm's output ``(b, s, d)`` is cut to the rows ``index:
  (b, k)`` before the (tied, ``(d, vocab)``) output projection, so the
  logits are ``(b, k, vocab)``: equal to ``model.apply(...)[b, index]``,
  without the ~20% of SmolLM2's FLOPs that the head costs at every other
  position. ``kwargs`` go to the model (a cache among them).
  """
  index = jnp.asarray(index)

  def interceptor(next_fun, args, call_kwargs, context):
    out = next_fun(*args, **call_kwargs)
    if tuple(context.module.path) == ('norm',) and context.method_name == '__call__':
      return jnp.take_along_axis(out, index[..., None], axis=1)
    return out

  with nn.intercept_methods(interceptor):
    return model.apply({'params': params}, input_ids, **kwargs)


def answer_loss(logits: Array, targets: Array, mask: Array) -> Array:
  """Mean cross-entropy of ``targets`` over the entries where ``mask`` is 1."""
  mask = mask.astype(jnp.float32)
  return -jnp.sum(token_log_probs(logits, targets) * mask) / jnp.maximum(
    jnp.sum(mask), 1.0
  )


def make_loss_fn(model: llama.LlamaForCausalLM, answer_width: int):
  """``loss_fn(params, batch, rng)``: answer-only causal-LM loss.

  Token ``t`` is predicted by the logits at ``t - 1``; only tokens with
  ``loss_mask`` 1 (the answer, ``answer_width`` tokens at most, starting at
  ``answer_start``) count, so the head runs at ``answer_width`` positions
  per row (``apply_at``).
  """

  def loss_fn(params, batch, rng):
    del rng  # No dropout in the decoder.
    ids = batch['input_ids']
    length = ids.shape[1]
    wanted = batch['answer_start'][:, None] + jnp.arange(answer_width)  # targets
    inside = wanted < length
    wanted = jnp.minimum(wanted, length - 1)
    targets = jnp.take_along_axis(ids, wanted, axis=1)
    mask = jnp.take_along_axis(batch['loss_mask'], wanted, axis=1) * inside
    logits = apply_at(
      model, params, ids, wanted - 1, attention_mask=batch['attention_mask']
    )
    hit = (jnp.argmax(logits, -1) == targets) | (mask == 0)
    metrics = {'answer_accuracy': jnp.mean(jnp.all(hit, axis=1))}
    return answer_loss(logits, targets, mask), metrics

  return loss_fn


def choice_scores(
  model: llama.LlamaForCausalLM,
  params,
  prompt_ids: Array,
  prompt_length: Array,
  choice_ids: Array,
  choice_mask: Array,
) -> Array:
  """Summed log-probability of each candidate answer given each prompt.

  The right-padded prompts run once into a KV cache of ``prompt + c``
  slots (the head only at each prompt's last token); then all candidates
  run at once from that cache at slots ``prompt..prompt+c-1``, with RoPE
  positions continuing each real prompt and the prompt's padding slots
  masked out.

  Args:
    model: the decoder.
    params: its (merged) parameters.
    prompt_ids: ``(b, p)`` right-padded prompt ids.
    prompt_length: ``(b,)`` real lengths (>= 1).
    choice_ids: ``(n, c)`` right-padded candidate ids.
    choice_mask: ``(n, c)``, 1 for the candidate's real tokens.

  Returns:
    ``(b, n)`` float32 ``sum_j log p(choice_j | prompt, choice_<j)``.
  """
  b, p = prompt_ids.shape
  n, c = choice_ids.shape
  slots = jnp.arange(p + c)
  keys = (slots[None] < prompt_length[:, None]) | (slots[None] >= p)  # (b, p+c)
  cache = llama.init_cache(model.config, b, p + c)
  last, cache = apply_at(
    model,
    params,
    prompt_ids,
    prompt_length[:, None] - 1,
    attention_mask=keys,
    cache=cache,
  )
  last = last[:, 0]  # (b, vocab): predicts each candidate's first token
  first = last[:, choice_ids[:, 0]] - jax.nn.logsumexp(last, axis=-1, keepdims=True)

  # Every candidate after every prompt: batch row k * b + i is (choice k, prompt i).
  tile = lambda x, axis=0: jnp.concatenate([x] * n, axis=axis)
  cache = {
    'k': tile(cache['k'], axis=1),
    'v': tile(cache['v'], axis=1),
    'end': jnp.int32(p),
  }
  ids = jnp.repeat(jnp.asarray(choice_ids), b, axis=0)  # (n*b, c)
  positions = tile(prompt_length)[:, None] + jnp.arange(c)
  rest, _ = model.apply(
    {'params': params},
    ids,
    positions=positions,
    attention_mask=tile(keys),
    cache=cache,
  )
  rest = token_log_probs(rest[:, :-1], ids[:, 1:]).reshape(n, b, c - 1)
  rest = jnp.einsum('nbc,nc->bn', rest, jnp.asarray(choice_mask)[:, 1:])
  return first + rest


class Data(NamedTuple):
  """The task's examples, encoded for the model.

  Attributes:
    splits: the ``Split``s (texts, labels) by name.
    prompts: each split's prompt token ids (``encode_prompts``).
    train: ``training_arrays`` of the train split.
    evals: ``prompt_arrays`` and ``label`` of validation and test.
    choice_ids: ``(n_choices, c)`` answer ids (``choice_arrays``).
    choice_mask: ``(n_choices, c)`` their 1/0 mask.
    answers: the answer word of each label (``dataset.LABELS``).
  """

  splits: dict
  prompts: dict[str, list[list[int]]]
  train: Arrays
  evals: dict[str, Arrays]
  choice_ids: np.ndarray
  choice_mask: np.ndarray
  answers: tuple[str, ...]


def encode_data(config, dataset, tokenizer, info) -> Data:
  """Prompts, training rows and evaluation arrays of every split.

  ``info`` is the GGUF's ``TokenizerInfo`` (chat template, end-of-turn and
  padding ids); each answer is the label's word and the end-of-turn token.
  """
  pad_id = info.pad_id if info.pad_id is not None else info.eos_id
  choices = [[*tokenizer.encode(word).ids, info.eos_id] for word in dataset.LABELS]
  choice_ids, choice_mask = choice_arrays(choices, pad_id)
  budget = config.model.max_length - choice_ids.shape[1]
  splits = dataset.splits(config.data.n_validation, config.data.n_test)
  encode = functools.partial(
    encode_prompts,
    tokenizer,
    info.chat_template,
    config.model.system,
    config.model.user,
    budget=budget,
  )
  prompts = {name: encode(split.texts) for name, split in splits.items()}
  train = training_arrays(
    prompts['train'], splits['train'].labels, choices, config.model.max_length, pad_id
  )
  evals = {
    name: {
      **prompt_arrays(prompts[name], budget, pad_id),
      'label': splits[name].labels.astype(np.int32),
    }
    for name in ('validation', 'test')
  }
  return Data(splits, prompts, train, evals, choice_ids, choice_mask, dataset.LABELS)


def make_show_generations(config, model_config, tokenizer, eos_id, data):
  """``show(tree, frozen, params, buffers)``: prints greedy answers to the first test
  prompts, generated through ``peft_jax.adapted`` (weight-space methods
  applied, activation adapters at their hook points) by the scanned-layer
  model (one compile for all layers)."""
  samples = range(min(config.generate.num_examples, len(data.prompts['test'])))
  gen_model = llama.LlamaForCausalLM(model_config.replace(scan_layers=True))

  def generate(weights):
    stacked = llama.stack_layers(weights)
    return [
      llama.generate(
        gen_model,
        stacked,
        np.array([data.prompts['test'][i]]),
        config.generate.max_new_tokens,
        eos_id=eos_id,
      )
      for i in samples
    ]

  def show(tree, frozen, params, buffers):
    if not samples:
      return
    print('greedy generations:')
    outs = pj.adapted(tree, generate)(frozen, params, buffers)
    for i, out in zip(samples, outs, strict=True):
      answer = tokenizer.decode(np.asarray(out[0]).tolist(), skip_special_tokens=True)
      label = data.answers[data.splits['test'].labels[i]]
      text = data.splits['test'].texts[i]
      print(f'  test[{i}] ({label}) {text[:70]!r} -> {answer!r}')

  return show


@functools.partial(jax.jit, static_argnums=(0, 1))
def correct_count(
  model: llama.LlamaForCausalLM,
  tree: pj.TreeAdapter,
  frozen: pj.Params,
  params: pj.AdapterParams,
  buffers: pj.Buffers,
  batch: dict,
  choice_ids: Array,
  choice_mask: Array,
) -> jax.Array:
  """How many of ``batch``'s real examples (``weight`` 1) score their
  ``label``'s answer highest (``choice_scores`` through
  ``peft_jax.adapted(..., factored=True)``, so methods with no weight-space
  form and activation adapters work). Module-level, the model and the tree
  static: the tasks a group builds for its seeds share one compiled program.
  """

  def scores(weights, batch):
    return choice_scores(
      model,
      weights,
      batch['prompt_ids'],
      batch['prompt_length'],
      choice_ids,
      choice_mask,
    )

  adapted_scores = pj.adapted(tree, scores, factored=True)
  best = jnp.argmax(adapted_scores(frozen, params, buffers, batch), -1)
  return jnp.sum((best == batch['label']) * batch['weight'])


def make_evaluate(config, model, data: Data, show):
  """``evaluate(tree, frozen, params, buffers)``: validation and test
  accuracy of the best-scoring answer (``correct_count``), then ``show``
  the generations."""

  def evaluate(tree, frozen, params, buffers):
    choices = data.choice_ids, data.choice_mask
    metrics = tasks.accuracies(
      lambda batch: correct_count(
        model, tree, frozen, params, buffers, batch, *choices
      ),
      data.evals,
      config.eval_batch_size,
      config.data.eval_limit,
    )
    show(tree, frozen, params, buffers)
    return metrics

  return evaluate


def make_task(config, model_config, frozen, tokenizer, info, source: str) -> tasks.Task:
  """The task for a loaded decoder (``model_config``, ``frozen``) and its
  tokenizer; ``source`` names the checkpoint in the task's description."""
  dataset = common.lookup(DATASETS, 'dataset', config.data.name)
  data = encode_data(config, dataset, tokenizer, info)
  model = llama.LlamaForCausalLM(model_config)
  sample = data.train['input_ids'][:1], data.train['attention_mask'][:1]
  show = make_show_generations(config, model_config, tokenizer, info.eos_id, data)
  sizes = {k: len(v.texts) for k, v in data.splits.items()}
  return tasks.Task(
    frozen=frozen,
    hooks=pj.hook_points(model, sample[0], attention_mask=sample[1]),
    loss_fn=make_loss_fn(model, data.choice_ids.shape[1]),
    train_batch=batching.train_batches(
      data.train, config.batch_size, config.seed
    ).__getitem__,
    evaluate=make_evaluate(config, model, data, show),
    adapter_metadata={
      'task': 'lm_choice',
      'base_model': config.model.checkpoint,
      'tokenizer': config.model.checkpoint,
      'labels': list(data.answers),
      'max_length': config.model.max_length,
      'prompt': {'system': config.model.system, 'user': config.model.user},
    },
    param_axes=llama.PARAM_AXES,
    describe=(
      f'{source} answering {"/".join(data.answers)} on {config.data.name} '
      f'{sizes}, max_length={config.model.max_length}'
    ),
  )


def build(config) -> tasks.Task:
  """Loads the frozen decoder and its tokenizer; see ``make_task``."""
  path = common.lookup(CHECKPOINTS, 'checkpoint', config.model.checkpoint)()
  frozen_format = config.model.get('frozen', 'float32')
  keep = frozen_format == 'gguf'
  model_config, frozen, tokenizer = gguf_loading.load_gguf(path, keep_quantized=keep)
  frozen = tasks.stored_as(frozen, frozen_format)
  info = gguf_loading.read_tokenizer_info(path)
  source = f'{config.model.checkpoint} ({path})'
  return make_task(config, model_config, frozen, tokenizer, info, source)
