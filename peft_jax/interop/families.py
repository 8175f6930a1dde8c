"""Which module table (``hf_modules`` beside each family's loader) a model
uses, and loading a base model of a supported family (and its tokenizer)
from its folder."""

import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import transformers

from peft_jax._src.base import Params, PeftError
from peft_jax._src.hooks import HookPoint, hook_points
from peft_jax.models import bert, checkpoints, deberta, gguf_loading, llama
from peft_jax.models.checkpoints import Module

SHIPPED = {'smollm2': gguf_loading.smollm2_path, 'minilm': bert.minilm_dir}
# Any of these files makes a checkpoint folder hold a tokenizer.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'vocab.txt')


def hf_modules(model: Any) -> dict[str, Module]:
  """The transformers module names of ``model`` (one of our Flax models),
  with our parameter paths: the names PEFT adapters use.

  Args:
    model: ``LlamaForCausalLM``, ``LlamaForSequenceClassification``,
      ``BertModel``, a BERT task model
      (sequence/token classification, multiple choice), ``DebertaV2Model``
      or ``DebertaV2ForSequenceClassification``.

  Returns:
    ``{module name: {param: Tensor}}``.

  Raises:
    PeftError: for a model class without a table.
  """
  if isinstance(model, llama.LlamaForCausalLM):
    return llama.hf_modules(model.config)
  if isinstance(model, llama.LlamaForSequenceClassification):
    return llama.hf_modules(model.config, model.num_labels)
  if isinstance(model, bert.BertModel):
    return bert.hf_modules(model.config)
  heads = (
    bert.BertForSequenceClassification,
    bert.BertForTokenClassification,
    bert.BertForMultipleChoice,
  )
  if isinstance(model, heads):
    two_layer = model.config.roberta and isinstance(
      model, bert.BertForSequenceClassification
    )
    return bert.hf_modules(model.config, head=True, two_layer_head=two_layer)
  if isinstance(model, deberta.DebertaV2Model):
    return deberta.hf_modules(model.config)
  if isinstance(model, deberta.DebertaV2ForSequenceClassification):
    return deberta.hf_modules(model.config, head=True)
  raise PeftError(
    f'No Hugging Face module table for {type(model).__name__}; expected '
    'LlamaForCausalLM, LlamaForSequenceClassification, BertModel, a BERT task '
    'model, DebertaV2Model or '
    'DebertaV2ForSequenceClassification.'
  )


def load_base(model_dir: str | os.PathLike) -> tuple[Any, Params]:
  """One of our models and its weights from a Hugging Face checkpoint folder
  (or a llama ``.gguf`` file, dequantized: ``LlamaForCausalLM``).

  ``model_type`` picks the family: ``llama``/``mistral``/``qwen2`` give
  ``LlamaForSequenceClassification`` when the checkpoint stores ``score``,
  else ``LlamaForCausalLM``; ``bert``/``roberta`` give the sequence (or, when
  ``architectures`` says so, token) classifier when the checkpoint stores a
  ``classifier``, else ``BertModel``; ``deberta-v2`` gives
  ``DebertaV2ForSequenceClassification`` or ``DebertaV2Model`` likewise.

  Args:
    model_dir: a directory with ``config.json`` and safetensors weights, a
      ``.gguf`` file, or the name of a shipped model: ``'smollm2'``
      (SmolLM2-135M-Instruct), ``'minilm'`` (all-MiniLM-L6-v2).

  Returns:
    ``(model, params)`` (unrolled layout).

  Raises:
    PeftError: for a missing file or an unsupported ``model_type``.
  """
  model_dir = resolve_base(model_dir)
  if model_dir.endswith('.gguf'):
    config, params, _ = gguf_loading.load_gguf(model_dir)
    return llama.LlamaForCausalLM(config), params
  hf_config = checkpoints.read_hf_config(model_dir)
  model_type = getattr(hf_config, 'model_type', None)
  if model_type in ('llama', 'mistral', 'qwen2'):
    if 'score.weight' in checkpoints.tensor_names(model_dir):
      config, params = llama.load_hf_classifier(model_dir)
      labels = params['score']['kernel'].shape[1]
      return llama.LlamaForSequenceClassification(config, labels), params
    config, params = llama.load_hf(model_dir)
    return llama.LlamaForCausalLM(config), params
  if model_type in ('bert', 'roberta', 'xlm-roberta'):
    if not _has_classifier(model_dir):
      config, params = bert.load_hf(model_dir)
      return bert.BertModel(config), params
    config, params = bert.load_hf_classifier(model_dir)
    labels = params['classifier']['bias'].shape[0]
    if any('TokenClassification' in a for a in hf_config.architectures or ()):
      return bert.BertForTokenClassification(config, labels), params
    return bert.BertForSequenceClassification(config, labels, pooling='cls'), params
  if model_type == 'deberta-v2':
    if not _has_classifier(model_dir):
      config, params = deberta.load_hf(model_dir)
      return deberta.DebertaV2Model(config), params
    config, params = deberta.load_hf_classifier(model_dir)
    labels = params['classifier']['bias'].shape[0]
    return deberta.DebertaV2ForSequenceClassification(config, labels), params
  raise PeftError(
    f'{model_dir}: model_type {model_type!r} has no Hugging Face module table '
    "yet; expected one of 'llama', 'mistral', 'qwen2', 'bert', 'roberta', "
    "'deberta-v2'."
  )


def _has_classifier(model_dir: str | os.PathLike) -> bool:
  """Whether the checkpoint stores a task head (``classifier.*``: BERT's and
  DeBERTa's ``classifier``, RoBERTa's ``classifier.dense``/``out_proj``)."""
  return any(n.startswith('classifier.') for n in checkpoints.tensor_names(model_dir))


def resolve_base(model_dir: str | os.PathLike) -> str:
  """The path of a base model reference: a shipped name (``SHIPPED``:
  ``'smollm2'``, ``'minilm'``) becomes its installed path; a path stays."""
  shipped = SHIPPED.get(str(model_dir))
  return shipped() if shipped else str(model_dir)


def load_tokenizer(model_dir: str | os.PathLike) -> Any | None:
  """The tokenizer of a base model reference (as for ``load_base``).

  Returns:
    A ``.gguf`` file's rebuilt ``tokenizers.Tokenizer``, a folder's
    transformers tokenizer, or ``None`` for a folder without tokenizer files
    (``TOKENIZER_FILES``).
  """
  path = resolve_base(model_dir)
  if path.endswith('.gguf'):
    return gguf_loading.read_tokenizer(path)
  if not any((pathlib.Path(path) / name).is_file() for name in TOKENIZER_FILES):
    return None
  return transformers.AutoTokenizer.from_pretrained(path)


def example_ids(model: Any) -> jax.Array:
  """A short input of token ids for one of our models: one row of 8 (two
  choices of 8 for a multiple-choice model)."""
  shape = (1, 2, 8) if isinstance(model, bert.BertForMultipleChoice) else (1, 8)
  return jnp.zeros(shape, jnp.int32)


def example_hook_points(model: Any) -> dict[str, HookPoint]:
  """The hook points of one of our models on ``example_ids``, for adapters
  that act on activations."""
  return hook_points(model, example_ids(model))
