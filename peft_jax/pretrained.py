"""A base model with an adapter in one call: Hugging Face PEFT's
``get_peft_model`` and ``PeftModel.from_pretrained``.

``from_pretrained(base, rules)`` loads a base model (``interop.load_base``:
a Hugging Face folder, a llama ``.gguf`` file, or ``'smollm2'``/``'minilm'``)
and attaches a new adapter; ``from_pretrained(base, adapter=path)`` attaches
a saved one: a peft_jax adapter file (``save_adapter`` with its rules) or a
Hugging Face PEFT folder. The ``PeftModel`` it returns holds the model, its
frozen weights, the tree adapter with its parameters and buffers, the
tokenizer and the metadata an adapter file records. Its methods are pure
functions of these fields, which nothing changes.
"""

import dataclasses
import functools
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from peft_jax import interop
from peft_jax._src import paths
from peft_jax._src.base import AdapterParams, Buffers, Params, PeftError, TreeAdapter
from peft_jax._src.checkpoint import load_adapter_file, read_metadata, save_adapter
from peft_jax._src.factored import adapted
from peft_jax._src.quantization import quantize as quantize_weights
from peft_jax._src.rules import Rule, serialize_rules
from peft_jax._src.tree import by_rules
from peft_jax._src.tree import merge as merge_weights
from peft_jax.models import bert, deberta, llama

# Models whose output is one row of logits per sequence: ``predict`` serves them.
CLASSIFIERS = (
  bert.BertForSequenceClassification,
  deberta.DebertaV2ForSequenceClassification,
  llama.LlamaForSequenceClassification,
)


@dataclasses.dataclass(frozen=True, eq=False)
class PeftModel:
  """A base model with an adapter (``from_pretrained``).

  Attributes:
    model: the Flax module (``LlamaForCausalLM``,
      ``BertForSequenceClassification``, ``BertModel``, ...).
    frozen: its pretrained weights (with a new head's, where one was added).
    adapter: the tree adapter (``by_rules``).
    params: the adapter's trainable parameters.
    buffers: its buffers.
    tokenizer: the base model's tokenizer, or ``None`` where its checkpoint
      has none.
    metadata: what ``save`` records (see ``peft_jax.save_adapter``): the rules
      (``adapters``), ``base_model`` and, where they apply, ``head``,
      ``labels``, ``tokenizer``; ``merged`` after ``merge=True``.
  """

  model: Any
  frozen: Params
  adapter: TreeAdapter
  params: AdapterParams
  buffers: Buffers
  tokenizer: Any
  metadata: dict[str, Any]

  def apply(self, input_ids: Any, attention_mask: Any = None) -> jax.Array:
    """Runs the adapted model (factored path, ``adapted(..., factored=True)``).

    Args:
      input_ids: ``(batch, seq)`` int token ids.
      attention_mask: ``(batch, seq)``, 1 for real tokens; all ones if None.

    Returns:
      The model's output: a classifier's ``(batch, num_labels)`` logits, a
      causal LM's ``(batch, seq, vocab)`` logits, an encoder's hidden states;
      a multiple-choice model takes ``(batch, num_choices, seq)`` ids and
      mask and gives ``(batch, num_choices)`` logits.
    """
    mask = None if attention_mask is None else np.asarray(attention_mask, np.int32)
    args = (self.frozen, self.params, self.buffers)
    return _forward(
      self.model, self.adapter, *args, np.asarray(input_ids, np.int32), mask
    )

  def generate(
    self,
    prompt: str | Any,
    max_new_tokens: int = 32,
    *,
    temperature: float = 0.0,
    rng: jax.Array | None = None,
    eos_id: int | None = None,
  ) -> str | jax.Array:
    """Continues a prompt with the adapted decoder (``llama.generate``).

    Args:
      prompt: text, encoded with the tokenizer as it is (no chat template),
        or ``(batch, prompt_len)`` token ids.
      max_new_tokens: tokens to generate.
      temperature: 0 for greedy decoding, > 0 to sample (needs ``rng``).
      rng: a PRNG key for sampling.
      eos_id: a token id that ends a sequence.

    Returns:
      The generated text for a text prompt, else ``(batch,
      max_new_tokens)`` int32 token ids.
    """
    if not isinstance(self.model, llama.LlamaForCausalLM):
      raise PeftError(
        f'generate needs a causal LM (LlamaForCausalLM); this model is '
        f'{type(self.model).__name__}: use apply or predict'
      )
    text = isinstance(prompt, str)
    ids = np.array([self._encode(prompt)]) if text else prompt
    options = dict(temperature=temperature, rng=rng, eos_id=eos_id)
    run = lambda w: llama.generate(self.model, w, ids, max_new_tokens, **options)
    out = adapted(self.adapter, run)(self.frozen, self.params, self.buffers)
    if not text:
      return out
    return self.tokenizer.decode(np.asarray(out[0]).tolist(), skip_special_tokens=True)

  def predict(self, texts: Sequence[str]) -> list[str] | list[int]:
    """The adapted classifier's class of each text.

    Texts are tokenized with padding, and truncated to the metadata's
    ``max_length`` (else the tokenizer's limit).

    Returns:
      The class names (``metadata['labels']``, in logit order) or, without
      them, the class ids.
    """
    if not isinstance(self.model, CLASSIFIERS):
      raise PeftError(
        f'predict needs a sequence classifier; this model is '
        f'{type(self.model).__name__} (pass labels= to from_pretrained to add a '
        'head to an encoder, or use generate)'
      )
    if self.tokenizer is None:
      raise PeftError('this model has no tokenizer; call apply with token ids')
    batch = self.tokenizer(
      list(texts),
      padding=True,
      truncation=True,
      max_length=self.metadata.get('max_length'),
      return_tensors='np',
    )
    logits = self.apply(batch['input_ids'], batch['attention_mask'])
    classes = np.argmax(np.asarray(logits), axis=-1).tolist()
    labels = self.metadata.get('labels')
    return [labels[i] for i in classes] if labels else classes

  def merge(self) -> Params:
    """The merged weights (``pj.merge``): plain weights for ``model`` (with
    ``quantize``, the kernels the adapter leaves alone stay quantized)."""
    return merge_weights(self.adapter, self.frozen, self.params, self.buffers)

  def save(self, path: str | os.PathLike) -> None:
    """Writes the adapter file (``save_adapter``) with ``metadata``;
    ``from_pretrained(base, adapter=path)`` loads it back."""
    if self.metadata.get('merged'):
      raise PeftError(
        'this model has its adapter merged into its weights (merge=True), so '
        'there is no adapter to save; save it before merging'
      )
    save_adapter(str(path), self.params, self.buffers, self.metadata)

  def _encode(self, text: str) -> list[int]:
    if self.tokenizer is None:
      raise PeftError('this model has no tokenizer; pass token ids')
    encoded = self.tokenizer.encode(text)
    return list(getattr(encoded, 'ids', encoded))  # tokenizers' Encoding or ids


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(model, adapter, frozen, params, buffers, input_ids, attention_mask):
  """``PeftModel.apply``, compiled once per model, adapter and input shape."""
  run = lambda w, ids, mask: model.apply({'params': w}, ids, attention_mask=mask)
  fn = adapted(adapter, run, factored=True)
  return fn(frozen, params, buffers, input_ids, attention_mask)


def from_pretrained(
  base: str | os.PathLike,
  rules: Sequence[Rule] | None = None,
  adapter: str | os.PathLike | None = None,
  *,
  labels: Sequence[str] | None = None,
  pooling: str = 'mean',
  seed: int = 0,
  quantize: str | None = None,
  merge: bool = False,
) -> PeftModel:
  """Loads a base model and attaches a new adapter (``rules``) or a saved one.

  Args:
    base: a Hugging Face checkpoint folder, a llama ``.gguf`` file, or
      ``'smollm2'``/``'minilm'`` (``interop.load_base``).
    rules: a new adapter's ``(selector, spec)`` rules (``by_rules``),
      initialised from ``seed``; a file must be able to record them
      (``serialize_rules``), so that ``save`` works.
    adapter: a saved adapter instead: a peft_jax adapter file (its metadata's
      ``head`` and ``labels`` apply) or a Hugging Face PEFT folder
      (``adapter_config.json`` + ``adapter_model.safetensors``).
    labels: class names in logit order, for ``predict``. On an encoder
      without a task head (``BertModel``, e.g. ``'minilm'``, or
      ``DebertaV2Model``) a new
      sequence-classification head with ``len(labels)`` outputs joins the
      frozen weights, initialised from ``seed``: train it with a rule such as
      ``('classifier/.*', 'full()')``, as PEFT's ``modules_to_save``.
    pooling: a new BERT head's pooling, ``'mean'`` or ``'cls'`` (DeBERTa's
      head pools by its context pooler).
    seed: the new head's init key is ``jax.random.key(seed)``, the new
      adapter's the first of its split: what the trainer draws for
      ``config.seed``.
    quantize: store the frozen kernels quantized before the adapter is
      attached (``pj.quantize(frozen, quantize)``: ``'int8'``, ``'int4'``,
      ``'nf4'``; QLoRA), recorded in the metadata; ``None`` takes what a
      saved adapter file records (none for a new adapter).
    merge: fold the adapter into ``frozen`` (``pj.merge``); the model then
      runs plain weights and has no adapter left to save.

  Returns:
    A ``PeftModel``.

  Raises:
    PeftError: for a missing or unsupported base or adapter, neither or both
      of ``rules`` and ``adapter``, rules that match nothing (or that a file
      cannot record), an adapter that does not fit the base, or labels that do
      not fit its head.
  """
  if (rules is None) == (adapter is None):
    raise PeftError(
      'from_pretrained takes rules (a new adapter) or adapter (a saved one: an '
      'adapter file or a Hugging Face PEFT folder), not both or neither'
    )
  # Before loading anything: rules that a file cannot record would fail at save.
  record = {'adapters': serialize_rules(rules)} if rules is not None else {}
  saved = _saved_metadata(adapter)
  if labels is not None and 'labels' in saved:
    raise PeftError(f'{adapter} records its labels {saved["labels"]}; drop labels=')
  labels = list(labels) if labels is not None else saved.get('labels')
  model, frozen = interop.load_base(base)
  head = saved.get('head')
  encoder_only = isinstance(model, bert.BertModel | deberta.DebertaV2Model)
  if head is None and labels is not None and encoder_only:
    head = {
      'kind': 'sequence_classification',
      'num_labels': len(labels),
      'pooling': pooling,
      'seed': seed,
    }
  if head is not None:
    model, frozen = _with_head(base, model, frozen, head)
  if labels is not None and 'labels' not in saved:
    _check_labels(base, model, labels)
  quantize = quantize if quantize is not None else saved.get('quantize')
  if quantize is not None:
    frozen = quantize_weights(frozen, quantize)
  tree, params, buffers, brought = _attach(model, frozen, rules, adapter, seed)
  metadata = {
    **record,
    **brought,
    'base_model': str(base),
    **({'head': head} if head is not None else {}),
    **({'labels': labels} if labels is not None else {}),
    **({'quantize': quantize} if quantize is not None else {}),
  }
  tokenizer = interop.load_tokenizer(metadata.get('tokenizer', base))
  if merge:
    frozen = merge_weights(tree, frozen, params, buffers)
    tree, params, buffers = by_rules([]), {}, {}
    metadata['merged'] = True
  return PeftModel(model, frozen, tree, params, buffers, tokenizer, metadata)


def _attach(
  model: Any, frozen: Params, rules, adapter, seed: int
) -> tuple[TreeAdapter, AdapterParams, Buffers, dict[str, Any]]:
  """``(tree, params, buffers, metadata)``: a new adapter from ``rules``
  (no metadata), or a saved one with the metadata it brings."""
  hooks = interop.example_hook_points(model)
  if rules is not None:
    tree = by_rules(rules)
    init_key, _ = jax.random.split(jax.random.key(seed))
    return tree, *tree.init(init_key, frozen, hooks), {}
  if pathlib.Path(adapter).is_dir():
    hf = interop.load_hf_adapter(adapter, interop.hf_modules(model), frozen, hooks)
    metadata = {'adapters': serialize_rules(hf.rules), 'hf_peft_config': hf.config}
    return hf.adapter, hf.params, hf.buffers, metadata
  return tuple(load_adapter_file(str(adapter), frozen, hooks))


def _saved_metadata(adapter: str | os.PathLike | None) -> dict[str, Any]:
  """A peft_jax adapter file's metadata; ``{}`` for a PEFT folder or none."""
  if adapter is None or pathlib.Path(adapter).is_dir():
    return {}
  if not pathlib.Path(adapter).exists():
    raise PeftError(
      f'{adapter} does not exist; expected a peft_jax adapter file or a '
      'Hugging Face PEFT folder'
    )
  return read_metadata(str(adapter))


# Head kinds a trainer's adapter file can record (``head['kind']``).
HEAD_KINDS = ('sequence_classification', 'multiple_choice')


def _task_model(model: Any, head: dict[str, Any]) -> tuple[Any, str] | None:
  """``(task model, the key of its encoder's weights)`` with ``head`` on an
  encoder without one; ``None`` where the pair is not supported."""
  if isinstance(model, bert.BertModel):
    if head['kind'] == 'multiple_choice':
      return bert.BertForMultipleChoice(model.config), 'bert'
    pooling = head.get('pooling', 'mean')
    classifier = bert.BertForSequenceClassification
    return classifier(model.config, head['num_labels'], pooling=pooling), 'bert'
  if isinstance(model, deberta.DebertaV2Model) and head['kind'] != 'multiple_choice':
    classifier = deberta.DebertaV2ForSequenceClassification
    return classifier(model.config, head['num_labels']), 'deberta'
  return None


def _with_head(base, model: Any, frozen: Params, head: dict[str, Any]):
  """``(model, frozen)`` with a new task head, built as the trainer's tasks
  build it: the task model initialised from ``jax.random.key(head['seed'])``,
  the pretrained encoder's weights over it. Sequence classification on
  BERT/RoBERTa (with its ``pooling``) or DeBERTa (context pooler and
  classifier, as ``experiments.tasks.glue`` builds them); multiple choice on
  BERT/RoBERTa (``BertForMultipleChoice``).
  """
  kind = head.get('kind')
  if kind not in HEAD_KINDS:
    raise PeftError(
      f'head kind {kind!r} is not supported here; expected one of {HEAD_KINDS}'
    )
  built = _task_model(model, head)
  if built is None:
    raise PeftError(
      f'a new {kind} head needs a BERT/RoBERTa encoder (or DeBERTa, for '
      f'sequence classification); {base} loads {type(model).__name__}'
    )
  task_model, key = built
  sample = (interop.example_ids(task_model),)
  return task_model, with_new_leaves(task_model, frozen, key, head['seed'], sample)


def with_new_leaves(
  task_model: Any, encoder: Params, key: str, seed: int, sample: tuple
) -> Params:
  """``task_model``'s frozen tree: the pretrained ``encoder`` as subtree
  ``key``, and every leaf it lacks (a new head; a pooler where the checkpoint
  has none) from ``task_model.init(jax.random.key(seed), *sample)['params']``.

  The init is compiled and returns only the new leaves, so XLA draws no
  random copy of the encoder (MiniLM: 0.7 s, not 10). The trainer's tasks
  and ``from_pretrained`` both build heads here, so a run's head is rebuilt
  from its seed bit for bit.
  """
  pretrained = paths.flatten({key: encoder})

  def new_leaves(rng):
    init = task_model.init(rng, *sample)['params']
    return {k: v for k, v in paths.flatten(init).items() if k not in pretrained}

  new = jax.jit(new_leaves)(jax.random.key(seed))
  return paths.nest({**pretrained, **new})


def _check_labels(base, model: Any, labels: list) -> None:
  """Raises unless ``model`` is a classifier with ``len(labels)`` outputs."""
  if not isinstance(model, CLASSIFIERS):
    raise PeftError(
      f'labels name the outputs of a sequence classifier; {base} loads '
      f'{type(model).__name__}'
    )
  if model.num_labels != len(labels):
    raise PeftError(
      f'{len(labels)} labels {labels} for a head with {model.num_labels} outputs'
    )
