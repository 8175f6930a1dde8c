"""Llama parameter layouts: Hugging Face checkpoints and scanned layers.

``load_hf`` (and ``load_hf_classifier`` for sequence classifiers) reads a
checkpoint directory through ``hf_layout``, the table of
``peft_jax.models.checkpoints``; ``stack_layers`` / ``unstack_layers``
convert between the unrolled (``layers_{i}``) and ``nn.scan`` (``layers``)
layouts.
"""

import os
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src.base import PeftError
from peft_jax.models import checkpoints
from peft_jax.models.llama.model import (
  LlamaConfig,
  LlamaForCausalLM,
  LlamaForSequenceClassification,
)

Params = dict[str, Any]

_LAYER_RE = re.compile(r'layers_(\d+)')


def _layer_names(params: Params) -> list[str]:
  """``layers_{i}`` keys of ``params`` in layer order, checked contiguous."""
  names = sorted(
    (k for k in params if _LAYER_RE.fullmatch(k)), key=lambda k: int(k[7:])
  )
  if [int(n[7:]) for n in names] != list(range(len(names))):
    raise PeftError(f'Layer keys are not layers_0..layers_{len(names) - 1}: {names}.')
  return names


def stack_layers(params: Params) -> Params:
  """Unrolled ``layers_{i}`` subtrees -> one ``layers`` subtree (scan layout).

  Works on any tree keyed like the model's params (frozen weights, gradients,
  or sparse adapter trees whose layers all hold the same leaves).

  Args:
    params: a tree with top-level keys ``layers_0..layers_{L-1}``.

  Returns:
    The same tree with those keys replaced by ``layers``, each leaf stacked
    along a new leading axis of size ``L``.

  Raises:
    PeftError: if there are no ``layers_{i}`` keys, a ``layers`` key already
      exists, or the layers' structures differ.
  """
  names = _layer_names(params)
  if not names or 'layers' in params:
    raise PeftError(
      'stack_layers expects unrolled params with layers_0.. keys and no '
      f"'layers' key; got top-level keys {sorted(params)}."
    )
  subtrees = [params[n] for n in names]
  try:
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *subtrees)
  except ValueError as e:
    raise PeftError(
      f'Layers have different parameter trees: {e}'.splitlines()[0]
    ) from None
  out = {k: v for k, v in params.items() if k not in names}
  out['layers'] = stacked
  return out


def unstack_layers(params: Params) -> Params:
  """The ``layers`` subtree (scan layout) -> ``layers_{i}`` subtrees.

  Args:
    params: a tree with a top-level ``layers`` key whose leaves have a
      leading ``num_layers`` axis.

  Returns:
    The unrolled tree, the inverse of ``stack_layers``.

  Raises:
    PeftError: if there is no ``layers`` key or its leaves disagree on the
      number of layers.
  """
  if 'layers' not in params or _layer_names(params):
    raise PeftError(
      "unstack_layers expects scanned params with a 'layers' key and no "
      f'layers_{{i}} keys; got top-level keys {sorted(params)}.'
    )
  leaves = jax.tree.leaves(params['layers'])
  sizes = {np.shape(x)[0] for x in leaves}
  if len(sizes) != 1:
    raise PeftError(f"Leaves of 'layers' disagree on the layer count: {sorted(sizes)}.")
  (num_layers,) = sizes
  out = {k: v for k, v in params.items() if k != 'layers'}
  for i in range(num_layers):
    out[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], params['layers'])
  return out


def abstract_params(config: LlamaConfig, num_labels: int | None = None) -> Params:
  """The ``params`` tree of ``LlamaForCausalLM(config)`` (or, with
  ``num_labels``, ``LlamaForSequenceClassification``) as shape structs."""
  model = (
    LlamaForCausalLM(config)
    if num_labels is None
    else LlamaForSequenceClassification(config, num_labels)
  )
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))[
    'params'
  ]


def hf_layout(config: LlamaConfig, num_labels: int | None = None) -> checkpoints.Layout:
  """The conversion table of a Hugging Face Llama/Mistral/Qwen2 checkpoint.

  Names may carry the ``model.`` prefix of ``LlamaForCausalLM`` or not
  (``LlamaModel``); ``rotary_emb.inv_freq`` buffers are ignored, and so is
  ``lm_head.weight`` when the embeddings are tied.

  Args:
    config: the model's hyper-parameters.
    num_labels: None for the causal LM; the classes of a
      ``LlamaForSequenceClassification`` (``score`` instead of ``lm_head``).

  Returns:
    The layout of the unrolled ``params`` (``layers_{i}``, whatever
    ``config.scan_layers``; kernels ``(d_in, d_out)``,
    ``config.param_dtype``); convert with ``checkpoints.convert``, then
    ``stack_layers`` for ``scan_layers``.
  """
  ignore = [r'layers\.\d+\.self_attn\.rotary_emb\.inv_freq']
  if config.tie_word_embeddings and num_labels is None:
    ignore.append(r'lm_head\.weight')
  return checkpoints.Layout(
    tensors=tuple(_hf_tensors(config, num_labels)),
    abstract=abstract_params(config.replace(scan_layers=False), num_labels),
    dtype=config.param_dtype,
    prefixes=('model.',),
    ignore=tuple(ignore),
    hint='check num_hidden_layers, attention_bias and tie_word_embeddings',
  )


def hf_modules(
  config: LlamaConfig, num_labels: int | None = None
) -> dict[str, checkpoints.Module]:
  """The modules of a transformers ``LlamaForCausalLM`` (with ``num_labels``,
  ``LlamaForSequenceClassification``) by their full names
  (``model.layers.0.self_attn.q_proj``, ``lm_head`` or ``score``), with our
  parameter paths (unrolled layout): the names PEFT adapters use."""
  return checkpoints.modules(
    _hf_tensors(config, num_labels),
    lambda name: name if name in HEADS else f'model.{name}',
  )


HEADS = ('lm_head', 'score')  # the modules outside transformers' ``model.``


def _hf_tensors(
  config: LlamaConfig, num_labels: int | None = None
) -> Iterator[checkpoints.Tensor]:
  """The rows of ``hf_layout`` (torch names without ``model.``)."""
  dense, norm = checkpoints.dense, checkpoints.norm
  yield from checkpoints.embedding('embed_tokens', 'embed_tokens')
  for i in range(config.num_layers):
    t, f = f'layers.{i}.', f'layers_{i}/'
    for proj in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):
      bias = config.attention_out_bias if proj == 'o_proj' else config.attention_bias
      yield from dense(t + f'self_attn.{proj}', f + f'self_attn/{proj}', bias=bias)
    for proj in ('gate_proj', 'up_proj', 'down_proj'):
      yield from dense(t + f'mlp.{proj}', f + f'mlp/{proj}', bias=False)
    for name in ('input_layernorm', 'post_attention_layernorm'):
      yield from norm(t + name, f + name, bias=False)
  yield from norm('norm', 'norm', bias=False)
  if num_labels is not None:
    yield from dense('score', 'score', bias=False)
  elif not config.tie_word_embeddings:
    yield from dense('lm_head', 'lm_head', bias=False)


def load_hf(
  model_dir: str | os.PathLike, **runtime_options: Any
) -> tuple[LlamaConfig, Params]:
  """Loads a Hugging Face Llama/Mistral/Qwen2 checkpoint directory.

  Args:
    model_dir: a directory with ``config.json`` and ``model.safetensors`` or
      a sharded ``model.safetensors.index.json``.
    **runtime_options: any of ``RUNTIME_OPTIONS`` (``dtype``,
      ``param_dtype``, ``scan_layers``, ``remat``, ``attention_impl``).

  Returns:
    ``(config, params)``; apply as
    ``LlamaForCausalLM(config).apply({'params': params}, input_ids)``
    (params stacked when ``scan_layers``).

  Raises:
    PeftError: if config.json or the weights are absent, the config is
      unsupported, or the tensors do not match the config (the message names
      the tensors).
  """
  hf_config = checkpoints.read_hf_config(model_dir)
  config = LlamaConfig.from_hf(hf_config, **runtime_options)
  params = checkpoints.load_safetensors(model_dir, hf_layout(config))
  return config, stack_layers(params) if config.scan_layers else params


def load_hf_classifier(
  model_dir: str | os.PathLike, **runtime_options: Any
) -> tuple[LlamaConfig, Params]:
  """Loads a Hugging Face ``LlamaForSequenceClassification`` checkpoint
  (also Mistral's and Qwen2's).

  Args:
    model_dir: a checkpoint directory with ``score.weight``.
    **runtime_options: as ``load_hf``.

  Returns:
    ``(config, params)`` of ``LlamaForSequenceClassification(config,
    num_labels)``, ``num_labels = params['score']['kernel'].shape[1]``.

  Raises:
    PeftError: as ``load_hf``, or if the checkpoint has no ``score.weight``.
  """
  hf_config = checkpoints.read_hf_config(model_dir)
  config = LlamaConfig.from_hf(hf_config, **runtime_options)
  tensors = checkpoints.read_safetensors(model_dir)
  if 'score.weight' not in tensors:
    raise PeftError(
      f'{model_dir}: no score.weight; expected a sequence classification '
      'checkpoint (load_hf reads the causal LM).'
    )
  num_labels = tensors['score.weight'].shape[0]
  params = checkpoints.convert(tensors, hf_layout(config, num_labels))
  return config, stack_layers(params) if config.scan_layers else params
