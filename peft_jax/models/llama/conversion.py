"""Llama parameter layouts: Hugging Face checkpoints and scanned layers.

``load_hf`` reads a checkpoint directory through ``hf_layout``, the table of
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
from peft_jax.models.llama.model import LlamaConfig, LlamaForCausalLM

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


def abstract_params(config: LlamaConfig) -> Params:
  """The ``params`` tree of ``LlamaForCausalLM(config)`` as shape structs."""
  return jax.eval_shape(
    LlamaForCausalLM(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
  )['params']


def hf_layout(config: LlamaConfig) -> checkpoints.Layout:
  """The conversion table of a Hugging Face Llama/Mistral/Qwen2 checkpoint.

  Names may carry the ``model.`` prefix of ``LlamaForCausalLM`` or not
  (``LlamaModel``); ``rotary_emb.inv_freq`` buffers are ignored, and so is
  ``lm_head.weight`` when the embeddings are tied.

  Args:
    config: the model's hyper-parameters.

  Returns:
    The layout of the unrolled ``params`` (``layers_{i}``, whatever
    ``config.scan_layers``; kernels ``(d_in, d_out)``,
    ``config.param_dtype``); convert with ``checkpoints.convert``, then
    ``stack_layers`` for ``scan_layers``.
  """
  ignore = [r'layers\.\d+\.self_attn\.rotary_emb\.inv_freq']
  if config.tie_word_embeddings:
    ignore.append(r'lm_head\.weight')
  return checkpoints.Layout(
    tensors=tuple(_hf_tensors(config)),
    abstract=abstract_params(config.replace(scan_layers=False)),
    dtype=config.param_dtype,
    prefixes=('model.',),
    ignore=tuple(ignore),
    hint='check num_hidden_layers, attention_bias and tie_word_embeddings',
  )


def hf_modules(config: LlamaConfig) -> dict[str, checkpoints.Module]:
  """The modules of a transformers ``LlamaForCausalLM`` by their full names
  (``model.layers.0.self_attn.q_proj``, ``lm_head``), with our parameter
  paths (unrolled layout): the names PEFT adapters use."""
  return checkpoints.modules(
    _hf_tensors(config), lambda name: name if name == 'lm_head' else f'model.{name}'
  )


def _hf_tensors(config: LlamaConfig) -> Iterator[checkpoints.Tensor]:
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
  if not config.tie_word_embeddings:
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
