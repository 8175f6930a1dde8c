"""A DeBERTa-v2/v3 encoder in Flax Linen that loads Hugging Face checkpoints.

The model is Hugging Face's ``DebertaV2Model`` (which DeBERTa-v3 also uses):
post-LayerNorm layers with disentangled self-attention. The attention score of
query ``i`` and key ``j`` is the sum of

* content-to-content ``q_i · k_j``,
* content-to-position (``'c2p'`` in ``pos_att_type``) ``q_i · Pk[c(i, j)]``,
* position-to-content (``'p2c'``) ``k_j · Pq[p(i, j)]``,

all divided by ``sqrt(d_head · scale_factor)`` with ``scale_factor = 1 +
len(pos_att_type)``. ``Pq``/``Pk`` are the relative embeddings (after the
relative LayerNorm when ``norm_rel_ebd='layer_norm'``) projected by
``query_proj``/``key_proj`` (``share_att_key=True``, v3) or by
``pos_query_proj``/``pos_key_proj``; ``c(i, j) = clip(δ(i, j) + span, 0,
2·span − 1)`` and ``p(i, j) = clip(−δ(j, i) + span, 0, 2·span − 1)``, where
``δ`` is the log-bucketed relative position ``i − j``
(``build_relative_position``) and ``span`` is ``position_buckets`` (or
``max_relative_positions`` without buckets). Absolute position embeddings are
added only when ``position_biased_input`` (False in v3); the embeddings are
LayerNorm-ed and multiplied by the attention mask. The FFN uses exact (erf)
GELU. Weights come from a Hugging Face directory (``config.json`` +
``model.safetensors`` with PyTorch names); transformers is used only for its
config and tokenizer.

Parameter names (``/``-joined key paths of the ``params`` collection of
``DebertaV2Model``), which target rules match against::

  embeddings/word_embeddings/embedding               (vocab, e)
  embeddings/position_embeddings/embedding           iff position_biased_input
  embeddings/token_type_embeddings/embedding         iff type_vocab_size > 0
  embeddings/embed_proj/kernel                       iff e = embedding_size != d
  embeddings/LayerNorm/{scale,bias}
  encoder/rel_embeddings/embedding                   (2·span, d) iff relative_attention
  encoder/LayerNorm/{scale,bias}                     iff norm_rel_ebd='layer_norm'
  encoder/layer_{i}/attention/self/{query_proj,key_proj,value_proj}/{kernel,bias}
  encoder/layer_{i}/attention/self/pos_key_proj/{kernel,bias}    (1)
  encoder/layer_{i}/attention/self/pos_query_proj/{kernel,bias}  (2)
  encoder/layer_{i}/attention/output/dense/{kernel,bias}
  encoder/layer_{i}/attention/output/LayerNorm/{scale,bias}
  encoder/layer_{i}/intermediate/dense/{kernel,bias}
  encoder/layer_{i}/output/dense/{kernel,bias}
  encoder/layer_{i}/output/LayerNorm/{scale,bias}

(1) iff not ``share_att_key`` and ``'c2p'``; (2) iff not ``share_att_key``
and ``'p2c'``. They are the PyTorch names with ``.`` → ``/``, ``layer.{i}``
→ ``layer_{i}`` and ``weight`` → ``kernel``/``embedding``/``scale``.
Kernels use the Flax layout ``(d_in, d_out)``, the transpose of a PyTorch
``Linear.weight``.
``DebertaV2ForSequenceClassification`` adds ``deberta/`` in front of these and
``pooler/dense/{kernel,bias}``, ``classifier/{kernel,bias}`` beside them.

Hook points (``peft_jax.hook_point``; the same names as BERT's)::

  deberta/embeddings/input_embeddings              (word embeddings, attention_mask)
  deberta/encoder/layer_{i}/attention/attention_kv     AttentionKV(k, v, bias, x)
  deberta/encoder/layer_{i}/attention/attention_output (b, s, d) before residual
  deberta/encoder/layer_{i}/attention/attention_block  (x, h), each (b, s, d)
  deberta/encoder/layer_{i}/ffn_intermediate       (b, s, d_ff) after GELU
  deberta/encoder/layer_{i}/ffn_output             (b, s, d) before residual
  deberta/encoder/layer_{i}/ffn_block              (x, h), each (b, s, d)

(without the ``deberta/`` prefix for a bare ``DebertaV2Model``). The
points of the Hugging Face submodules ``attention/self``,
``attention/output``, ``intermediate`` and ``output`` belong to their parent
module (``hook_point(self.parent, ...)``): that is where their names point
and where an adapter's parameters travel (key ``'@<point>'`` in the parent's
params). ``input_embeddings`` comes before absolute positions, token types and the
LayerNorm; prepended positions get token type 0, and the relative positions
cover them like any token. At ``attention_kv`` the keys and values are the
content projections ``key_proj(x)``, ``value_proj(x)`` per head
``(b, s, h, d_h)``, unscaled, and ``mask_bias`` is the ``(b, 1, 1, s)``
additive key-padding bias. The disentangled terms are computed after the
adapter, for the last ``s`` keys (the sequence's own; an adapter that changes
them changes the p2c term too); ``p`` keys an adapter prepends (prefix
tuning) carry no relative position, so their score is the content term alone.
Positions prepended at ``input_embeddings`` are dropped from the returned
hidden states. As BERT's, a ``*_block`` point passes the sub-layer's input
``x`` (for the FFN, the attention block's LayerNorm output) and its output
``h`` after the ``*_output`` point, before dropout and the residual; the
model continues with the returned ``h`` (for parallel adapters).

Padding follows Hugging Face: the embeddings of padded tokens are zeroed and
a padded query attends uniformly to all keys, so every output position, not
only the real ones, matches ``DebertaV2Model``.

Example::

  config, params = load_hf('path/to/deberta-v3-base')
  tokenizer = transformers.AutoTokenizer.from_pretrained('path/to/...')
  batch = tokenizer(['A man is eating food.'], return_tensors='np')
  hidden = DebertaV2Model(config).apply(
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

POS_ATT_TYPES = ('c2p', 'p2c')
REL_EMBEDDING_NORMS = ('none', 'layer_norm')


# Logical axes of the weights (``peft_jax.models.partitioning``); embedding
# tables other than the words', LayerNorms and d-sized biases are small and
# replicated.
PARAM_AXES = (
  (r'.*/word_embeddings/embedding', ('table', None)),
  (r'.*/self/(query|key|value|pos_query|pos_key)_proj/kernel', ('embed', 'heads')),
  (r'.*/self/(query|key|value|pos_query|pos_key)_proj/bias', ('heads',)),
  (r'.*/attention/output/dense/kernel', ('heads', 'embed')),
  (r'.*/intermediate/dense/kernel', ('embed', 'mlp')),
  (r'.*/intermediate/dense/bias', ('mlp',)),
  (r'.*/layer_\d+/output/dense/kernel', ('mlp', 'embed')),
  (r'.*(pooler/dense|classifier)/kernel', ('embed', None)),
)


@dataclasses.dataclass(frozen=True)
class DebertaV2Config:
  """Hyper-parameters of a DeBERTa-v2/v3 encoder.

  The defaults are DeBERTa-v3's (relative attention with 256 log buckets,
  both disentangled terms, shared keys, relative LayerNorm, no absolute
  positions, no token types).

  Attributes:
    vocab_size: number of token ids.
    hidden_size: width ``d`` of the hidden states.
    num_layers: number of encoder layers.
    num_heads: attention heads; must divide ``hidden_size``.
    intermediate_size: width of the feed-forward block.
    max_position_embeddings: rows of the absolute position table (the longest
      input when ``position_biased_input``); with ``max_relative_positions <
      1`` also the relative range.
    type_vocab_size: number of token-type ids; 0 means no token-type table.
    layer_norm_eps: epsilon of every LayerNorm.
    hidden_dropout: dropout rate on embeddings, relative embeddings and
      sub-layer outputs (and the classifier input unless ``cls_dropout``).
    attention_dropout: dropout rate on the attention probabilities.
    pad_token_id: id of the padding token (for batching code; the forward
      pass reads padding from ``attention_mask`` only).
    relative_attention: use relative positions (the disentangled terms).
    max_relative_positions: relative range; ``< 1`` means
      ``max_position_embeddings``.
    position_buckets: number of log buckets per direction; ``<= 0`` means no
      bucketing.
    pos_att_type: the disentangled terms, a subset of ``('c2p', 'p2c')``.
    share_att_key: project relative embeddings with ``query_proj`` /
      ``key_proj`` instead of separate ``pos_query_proj`` / ``pos_key_proj``.
    norm_rel_ebd: ``'layer_norm'`` applies ``encoder/LayerNorm`` to the
      relative embeddings; ``'none'`` does not.
    position_biased_input: add absolute position embeddings to the input.
    embedding_size: width of the embedding tables; None means
      ``hidden_size`` (otherwise ``embed_proj`` maps it to ``hidden_size``).
    pooler_dropout: dropout rate on token 0 before the context pooler.
    pooler_hidden_size: width of the context pooler; must equal
      ``hidden_size`` (as Hugging Face's classifier requires). None means
      ``hidden_size``.
    cls_dropout: dropout rate before the classifier; None means
      ``hidden_dropout``.
  """

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 0
  layer_norm_eps: float = 1e-7
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  pad_token_id: int = 0
  relative_attention: bool = True
  max_relative_positions: int = -1
  position_buckets: int = 256
  pos_att_type: tuple[str, ...] = ('p2c', 'c2p')
  share_att_key: bool = True
  norm_rel_ebd: str = 'layer_norm'
  position_biased_input: bool = False
  embedding_size: int | None = None
  pooler_dropout: float = 0.0
  pooler_hidden_size: int | None = None
  cls_dropout: float | None = None

  def __post_init__(self):
    object.__setattr__(self, 'pos_att_type', tuple(self.pos_att_type))
    if self.hidden_size % self.num_heads:
      raise PeftError(
        f'hidden_size={self.hidden_size} is not divisible by '
        f'num_heads={self.num_heads}.'
      )
    for kind in self.pos_att_type:
      if kind not in POS_ATT_TYPES:
        raise PeftError(
          f'Unsupported pos_att_type entry {kind!r}; expected a subset of '
          f'{POS_ATT_TYPES}.'
        )
    if self.norm_rel_ebd not in REL_EMBEDDING_NORMS:
      raise PeftError(
        f'Unsupported norm_rel_ebd={self.norm_rel_ebd!r}; expected one of '
        f'{REL_EMBEDDING_NORMS}.'
      )
    if self.pooler_hidden_size not in (None, self.hidden_size):
      raise PeftError(
        f'pooler_hidden_size={self.pooler_hidden_size} must equal '
        f'hidden_size={self.hidden_size} (the DeBERTa classifier reads it).'
      )

  @property
  def head_dim(self) -> int:
    """Width of one attention head, ``hidden_size // num_heads``."""
    return self.hidden_size // self.num_heads

  @property
  def scale_factor(self) -> int:
    """``1 + len(pos_att_type)``; scores are divided by ``sqrt(d_h · it)``."""
    return 1 + len(self.pos_att_type)

  @property
  def max_relative(self) -> int:
    """The relative range: ``max_relative_positions`` or, if < 1, the
    absolute one."""
    if self.max_relative_positions < 1:
      return self.max_position_embeddings
    return self.max_relative_positions

  @property
  def span(self) -> int:
    """Half the rows of the relative table: buckets, else the range."""
    return self.position_buckets if self.position_buckets > 0 else self.max_relative

  @classmethod
  def from_hf(cls, hf_config: Any) -> 'DebertaV2Config':
    """Builds a config from a transformers ``DebertaV2Config``-like object.

    Args:
      hf_config: an object with the attributes of
        ``transformers.DebertaV2Config`` (``num_hidden_layers``,
        ``pos_att_type``, ``position_buckets``, ...). Attributes Hugging Face
        reads with ``getattr`` defaults take the same defaults here.

    Returns:
      The equivalent ``DebertaV2Config``.

    Raises:
      PeftError: (a ``ValueError``) naming the first unsupported option:
        ``model_type`` other than ``'deberta-v2'``, the v2 convolution layer
        (``conv_kernel_size > 0``), ``hidden_act`` or ``pooler_hidden_act``
        other than ``'gelu'``, an ``attention_head_size`` other than
        ``hidden_size // num_attention_heads``, an unknown ``pos_att_type``
        or ``norm_rel_ebd``.
    """
    _check_hf_support(hf_config)
    pos_att_type = getattr(hf_config, 'pos_att_type', None) or ()
    if isinstance(pos_att_type, str):
      pos_att_type = [x.strip() for x in pos_att_type.lower().split('|')]
    embedding_size = getattr(hf_config, 'embedding_size', None)
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
      pad_token_id=getattr(hf_config, 'pad_token_id', 0) or 0,
      relative_attention=bool(getattr(hf_config, 'relative_attention', False)),
      max_relative_positions=getattr(hf_config, 'max_relative_positions', -1),
      position_buckets=getattr(hf_config, 'position_buckets', -1),
      pos_att_type=tuple(pos_att_type),
      share_att_key=bool(getattr(hf_config, 'share_att_key', False)),
      norm_rel_ebd=_hf_norm_rel_ebd(hf_config),
      position_biased_input=bool(getattr(hf_config, 'position_biased_input', True)),
      embedding_size=None
      if embedding_size == hf_config.hidden_size
      else embedding_size,
      pooler_dropout=getattr(hf_config, 'pooler_dropout', 0.0),
      pooler_hidden_size=getattr(hf_config, 'pooler_hidden_size', None),
      cls_dropout=getattr(hf_config, 'cls_dropout', None),
    )


def _check_hf_support(hf_config: Any) -> None:
  """Raises naming the first option of ``hf_config`` this model lacks."""
  model_type = getattr(hf_config, 'model_type', 'deberta-v2')
  if model_type != 'deberta-v2':
    raise PeftError(
      f'Unsupported model_type={model_type!r} in the Hugging Face config; '
      "peft_jax DeBERTa supports only model_type='deberta-v2' (v2 and v3)."
    )
  conv = getattr(hf_config, 'conv_kernel_size', 0) or 0
  if conv > 0:
    raise PeftError(
      f'Unsupported conv_kernel_size={conv} in the Hugging Face config; '
      'peft_jax DeBERTa does not implement the DeBERTa-v2 convolution layer '
      '(conv_kernel_size=0, as in DeBERTa-v3).'
    )
  for field in ('hidden_act', 'pooler_hidden_act'):
    value = getattr(hf_config, field, 'gelu')
    if value != 'gelu':
      raise PeftError(
        f'Unsupported {field}={value!r} in the Hugging Face config; '
        f"peft_jax DeBERTa supports only {field}='gelu'."
      )
  head_dim = hf_config.hidden_size // hf_config.num_attention_heads
  head_size = getattr(hf_config, 'attention_head_size', head_dim)
  if head_size != head_dim:
    raise PeftError(
      f'Unsupported attention_head_size={head_size} in the Hugging Face '
      f'config; peft_jax DeBERTa supports only hidden_size // '
      f'num_attention_heads = {head_dim}.'
    )


def _hf_norm_rel_ebd(hf_config: Any) -> str:
  """``norm_rel_ebd`` of a Hugging Face config (``'a|b'`` entries) as ours."""
  norms = [
    x.strip() for x in str(getattr(hf_config, 'norm_rel_ebd', 'none')).split('|')
  ]
  for norm in norms:
    if norm not in REL_EMBEDDING_NORMS:
      raise PeftError(
        f'Unsupported norm_rel_ebd entry {norm!r} in the Hugging Face '
        f'config; expected one of {REL_EMBEDDING_NORMS}.'
      )
  return 'layer_norm' if 'layer_norm' in norms else 'none'


# ---------------------------------------------------------------------------
# Relative positions (static: computed in NumPy from the sequence length).


def make_log_bucket_position(
  relative_pos: np.ndarray, bucket_size: int, max_position: int
) -> np.ndarray:
  """Hugging Face's log buckets of relative positions.

  Distances below ``bucket_size // 2`` are kept; longer ones are mapped
  logarithmically so that ``max_position - 1`` lands on ``bucket_size - 1``.
  Computed in float32, as Hugging Face's PyTorch code.

  Args:
    relative_pos: int array of relative positions ``i - j``.
    bucket_size: ``position_buckets``.
    max_position: ``max_relative_positions``.

  Returns:
    int64 array of bucketed positions, the same shape.
  """
  relative_pos = np.asarray(relative_pos, np.int64)
  mid = bucket_size // 2
  near = (relative_pos < mid) & (relative_pos > -mid)
  abs_pos = np.where(near, mid - 1, np.abs(relative_pos))
  ratio = (abs_pos / mid).astype(np.float32)
  log_pos = (
    np.ceil(
      np.log(ratio) / np.log(np.float32((max_position - 1) / mid)) * np.float32(mid - 1)
    )
    + mid
  )
  bucketed = np.where(abs_pos <= mid, relative_pos, log_pos * np.sign(relative_pos))
  return bucketed.astype(np.int64)


def build_relative_position(
  query_size: int, key_size: int, bucket_size: int = -1, max_position: int = -1
) -> np.ndarray:
  """``(query_size, key_size)`` relative positions ``i - j``, bucketed.

  Args:
    query_size: number of queries.
    key_size: number of keys.
    bucket_size: ``position_buckets``; no bucketing unless both it and
      ``max_position`` are positive.
    max_position: ``max_relative_positions``.

  Returns:
    int64 array ``δ`` with ``δ[i, j]`` the (bucketed) position of ``i - j``.
  """
  rel = np.arange(query_size)[:, None] - np.arange(key_size)[None, :]
  if bucket_size > 0 and max_position > 0:
    rel = make_log_bucket_position(rel, bucket_size, max_position)
  return rel.astype(np.int64)


def _dense(features: int, name: str, use_bias: bool = True) -> nn.Dense:
  return layers.dense(features, name, use_bias=use_bias)


# ---------------------------------------------------------------------------
# Modules.


class DebertaV2Embeddings(nn.Module):
  """Word (+ position) (+ token-type) embeddings, LayerNorm, mask, dropout.

  Attributes:
    config: the model's hyper-parameters.
  """

  config: DebertaV2Config

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

    Hook point ``input_embeddings``: ``(word embeddings (batch, seq, e),
    attention_mask (batch, seq))``, before positions and token types are
    added; an adapter may prepend ``p`` positions (prompt tuning), which get
    token type 0 and absolute positions ``0..p-1``.

    Args:
      input_ids: ``(batch, seq)`` int token ids.
      token_type_ids: ``(batch, seq)`` int segment ids (unused when
        ``type_vocab_size == 0``).
      attention_mask: ``(batch, seq)``, 1 for real tokens.
      deterministic: disables dropout when True.

    Returns:
      ``(batch, seq + p, hidden)`` embeddings (zero at padding) and the
      ``(batch, seq + p)`` attention mask.
    """
    cfg = self.config
    width = cfg.embedding_size or cfg.hidden_size
    embed = lambda n, name: nn.Embed(n, width, name=name)
    x = embed(cfg.vocab_size, 'word_embeddings')(input_ids)
    x, attention_mask = hook_point(self, 'input_embeddings', (x, attention_mask))
    added = x.shape[1] - input_ids.shape[1]
    if cfg.position_biased_input:
      positions = jnp.arange(x.shape[1])[None, :]
      x += embed(cfg.max_position_embeddings, 'position_embeddings')(positions)
    if cfg.type_vocab_size > 0:
      token_type_ids = jnp.pad(token_type_ids, ((0, 0), (added, 0)))
      x += embed(cfg.type_vocab_size, 'token_type_embeddings')(token_type_ids)
    if width != cfg.hidden_size:
      x = _dense(cfg.hidden_size, 'embed_proj', use_bias=False)(x)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name='LayerNorm')(x)
    x = x * attention_mask[..., None].astype(x.dtype)
    x = constrain(x, 'batch', None, None)
    return nn.Dropout(cfg.hidden_dropout)(
      x, deterministic=deterministic
    ), attention_mask


class DisentangledSelfAttention(nn.Module):
  """Content-to-content plus c2p/p2c relative attention (HF's ``self``).

  Its hook point ``attention_kv`` belongs to the parent ``attention``
  module, as BERT's.

  Attributes:
    config: the model's hyper-parameters.
  """

  config: DebertaV2Config

  @nn.compact
  def __call__(
    self,
    x: Array,
    mask_bias: Array,
    query_keep: Array,
    rel_embeddings: Array | None,
    relative_pos: np.ndarray | None,
    *,
    deterministic: bool,
  ) -> Array:
    """Attends.

    Args:
      x: ``(batch, seq, hidden)`` input hidden states.
      mask_bias: ``(batch, 1, 1, seq)`` additive key bias (0 or a large
        negative value).
      query_keep: ``(batch, seq)`` bool, False at padded queries (which
        attend uniformly, as in Hugging Face).
      rel_embeddings: ``(2·span, hidden)`` (normalised) relative embeddings,
        or None without relative attention.
      relative_pos: ``(seq, seq)`` static bucketed ``i - j``, or None.
      deterministic: disables dropout when True.

    Returns:
      ``(batch, seq, hidden)`` attention context (before the output dense).
    """
    cfg = self.config
    b, s, _ = x.shape
    heads = lambda y: constrain(
      y.reshape(*y.shape[:-1], cfg.num_heads, cfg.head_dim),
      'batch',
      None,
      'heads',
      None,
    )
    query_proj = _dense(cfg.hidden_size, 'query_proj')
    key_proj = _dense(cfg.hidden_size, 'key_proj')
    q = heads(query_proj(x))
    k = heads(key_proj(x))
    v = heads(_dense(cfg.hidden_size, 'value_proj')(x))
    k, v, mask_bias, _ = hook_point(
      self.parent, 'attention_kv', AttentionKV(k, v, mask_bias, x)
    )
    prefix = k.shape[1] - s
    if prefix < 0:
      raise PeftError(
        f'The attention_kv adapter returned {k.shape[1]} keys for a sequence '
        f'of {s}; it may prepend keys but not remove them.'
      )
    scale = np.sqrt(cfg.head_dim * cfg.scale_factor)
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / scale
    if cfg.relative_attention and cfg.pos_att_type:
      rel = nn.Dropout(cfg.hidden_dropout)(rel_embeddings, deterministic=deterministic)
      pos_query, pos_key = self._project_positions(rel, query_proj, key_proj)
      rel_scores = _disentangled_scores(
        q, k[:, prefix:], pos_query, pos_key, relative_pos, cfg.span, scale
      )
      scores += jnp.pad(rel_scores, ((0, 0), (0, 0), (0, 0), (prefix, 0)))
    scores = jnp.where(
      query_keep[:, None, :, None], scores + mask_bias, jnp.finfo(scores.dtype).min
    )
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(cfg.attention_dropout)(probs, deterministic=deterministic)
    context = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    return context.reshape(b, s, cfg.num_heads * cfg.head_dim)

  def _project_positions(
    self, rel: Array, query_proj: nn.Dense, key_proj: nn.Dense
  ) -> tuple[Array | None, Array | None]:
    """``(Pq, Pk)``, each ``(2·span, h, d_h)`` or None without its term."""
    cfg = self.config
    heads = lambda y: y.reshape(*y.shape[:-1], cfg.num_heads, cfg.head_dim)
    pos_query = pos_key = None
    if 'c2p' in cfg.pos_att_type:
      if not cfg.share_att_key:
        key_proj = _dense(cfg.hidden_size, 'pos_key_proj')
      pos_key = heads(key_proj(rel))
    if 'p2c' in cfg.pos_att_type:
      if not cfg.share_att_key:
        query_proj = _dense(cfg.hidden_size, 'pos_query_proj')
      pos_query = heads(query_proj(rel))
    return pos_query, pos_key


def _disentangled_scores(
  q: Array,
  k: Array,
  pos_query: Array | None,
  pos_key: Array | None,
  relative_pos: np.ndarray,
  span: int,
  scale: float,
) -> Array:
  """The c2p plus p2c scores ``(b, h, s, s)``, each divided by ``scale``.

  Args:
    q: ``(b, s, h, d_h)`` queries.
    k: ``(b, s, h, d_h)`` the sequence's own keys.
    pos_query: ``Pq`` ``(2·span, h, d_h)``, or None without p2c.
    pos_key: ``Pk`` ``(2·span, h, d_h)``, or None without c2p.
    relative_pos: ``(s, s)`` static bucketed ``δ(i, j)``.
    span: half the rows of the relative table.
    scale: ``sqrt(d_h · scale_factor)``.

  Returns:
    ``q_i · Pk[c(i, j)] + k_j · Pq[p(i, j)]`` over ``scale``, ``[b, h, i, j]``.
  """
  b, s, h, _ = q.shape
  scores = jnp.zeros((b, h, s, s), q.dtype)
  if pos_key is not None:
    c2p = jnp.einsum('bqhd,rhd->bhqr', q, pos_key)
    index = np.clip(relative_pos + span, 0, 2 * span - 1)  # [i, j]
    scores += jnp.take_along_axis(c2p, index[None, None], axis=-1) / scale
  if pos_query is not None:
    p2c = jnp.einsum('bkhd,rhd->bhkr', k, pos_query)
    index = np.clip(-relative_pos + span, 0, 2 * span - 1)  # [j, i]
    p2c = jnp.take_along_axis(p2c, index[None, None], axis=-1)
    scores += jnp.swapaxes(p2c, -1, -2) / scale
  return scores


class DebertaV2SelfOutput(nn.Module):
  """Output dense, dropout, residual and LayerNorm of a sub-layer.

  Attributes:
    config: the model's hyper-parameters.
    sublayer: ``'attention'`` or ``'ffn'``; names the hook points
      ``<sublayer>_output`` and ``<sublayer>_block``, in the parent module.
  """

  config: DebertaV2Config
  sublayer: str

  @nn.compact
  def __call__(self, h: Array, residual: Array, *, deterministic: bool) -> Array:
    """Returns ``LayerNorm(residual + dropout(hook(dense(h))))``.

    ``residual`` is the sub-layer's input: the ``x`` of its ``_block`` point.
    """
    cfg = self.config
    y = _dense(cfg.hidden_size, 'dense')(h)
    y = hook_point(self.parent, f'{self.sublayer}_output', y)
    _, y = hook_point(self.parent, f'{self.sublayer}_block', (residual, y))
    y = nn.Dropout(cfg.hidden_dropout)(y, deterministic=deterministic)
    y = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name='LayerNorm')(residual + y)
    return constrain(y, 'batch', None, None)


class DebertaV2Intermediate(nn.Module):
  """``gelu(dense(x))`` with exact GELU; hook point ``ffn_intermediate``.

  The point belongs to the parent layer module, as BERT's.

  Attributes:
    config: the model's hyper-parameters.
  """

  config: DebertaV2Config

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Returns the ``(batch, seq, intermediate_size)`` activation."""
    h = _dense(self.config.intermediate_size, 'dense')(x)
    h = layers.gelu(constrain(h, 'batch', None, 'mlp'))
    return hook_point(self.parent, 'ffn_intermediate', h)


class DebertaV2Attention(nn.Module):
  """Disentangled self-attention (``self``) and its output block (``output``).

  Attributes:
    config: the model's hyper-parameters.
  """

  config: DebertaV2Config

  @nn.compact
  def __call__(
    self,
    x: Array,
    mask_bias: Array,
    query_keep: Array,
    rel_embeddings: Array | None,
    relative_pos: np.ndarray | None,
    *,
    deterministic: bool,
  ) -> Array:
    """Returns the ``(batch, seq, hidden)`` attention block output."""
    cfg = self.config
    context = DisentangledSelfAttention(cfg, name='self')(
      x,
      mask_bias,
      query_keep,
      rel_embeddings,
      relative_pos,
      deterministic=deterministic,
    )
    return DebertaV2SelfOutput(cfg, 'attention', name='output')(
      context, x, deterministic=deterministic
    )


class DebertaV2Layer(nn.Module):
  """One post-LN layer: disentangled attention, then the GELU FFN.

  Attributes:
    config: the model's hyper-parameters.
  """

  config: DebertaV2Config

  @nn.compact
  def __call__(
    self,
    x: Array,
    mask_bias: Array,
    query_keep: Array,
    rel_embeddings: Array | None,
    relative_pos: np.ndarray | None,
    *,
    deterministic: bool,
  ) -> Array:
    """Applies the layer (arguments as ``DisentangledSelfAttention``)."""
    cfg = self.config
    attention = DebertaV2Attention(cfg, name='attention')
    x = attention(
      x,
      mask_bias,
      query_keep,
      rel_embeddings,
      relative_pos,
      deterministic=deterministic,
    )
    h = DebertaV2Intermediate(cfg, name='intermediate')(x)
    return DebertaV2SelfOutput(cfg, 'ffn', name='output')(
      h, x, deterministic=deterministic
    )


class DebertaV2Encoder(nn.Module):
  """Relative embeddings (+ their LayerNorm) and the ``layer_{i}`` stack.

  Attributes:
    config: the model's hyper-parameters.
  """

  config: DebertaV2Config

  @nn.compact
  def __call__(self, x: Array, attention_mask: Array, *, deterministic: bool) -> Array:
    """Applies every layer in order.

    Args:
      x: ``(batch, seq, hidden)`` embeddings.
      attention_mask: ``(batch, seq)``, 1 for real tokens.
      deterministic: disables dropout when True.

    Returns:
      ``(batch, seq, hidden)`` last hidden states.
    """
    cfg = self.config
    rel_embeddings = relative_pos = None
    if cfg.relative_attention:
      table = nn.Embed(2 * cfg.span, cfg.hidden_size, name='rel_embeddings')
      rel_embeddings = table.embedding
      if cfg.norm_rel_ebd == 'layer_norm':
        rel_embeddings = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name='LayerNorm')(
          rel_embeddings
        )
      relative_pos = build_relative_position(
        x.shape[1], x.shape[1], cfg.position_buckets, cfg.max_relative
      )
    keep = attention_mask > 0
    mask_bias = jnp.where(keep[:, None, None, :], 0.0, jnp.finfo(jnp.float32).min)
    for i in range(cfg.num_layers):
      x = DebertaV2Layer(cfg, name=f'layer_{i}')(
        x,
        mask_bias.astype(jnp.float32),
        keep,
        rel_embeddings,
        relative_pos,
        deterministic=deterministic,
      )
    return x


class DebertaV2Model(nn.Module):
  """The DeBERTa-v2/v3 encoder: embeddings and encoder (no pooler).

  Attributes:
    config: the model's hyper-parameters.
  """

  config: DebertaV2Config

  @nn.compact
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
      input_ids: ``(batch, seq)`` int token ids (``seq <=
        max_position_embeddings`` when ``position_biased_input``).
      attention_mask: ``(batch, seq)``, 1 for real tokens and 0 for padding;
        all ones if None.
      token_type_ids: ``(batch, seq)`` int segment ids; all zeros if None.
      deterministic: disables dropout when True; when False, dropout draws
        from the ``'dropout'`` rng collection.

    Returns:
      ``(batch, seq, hidden)`` float32 last hidden states.
    """
    cfg = self.config
    _check_input_ids(input_ids, cfg)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x, attention_mask = DebertaV2Embeddings(cfg, name='embeddings')(
      input_ids, token_type_ids, attention_mask, deterministic=deterministic
    )
    hidden = DebertaV2Encoder(cfg, name='encoder')(
      x, attention_mask, deterministic=deterministic
    )
    return hidden[:, hidden.shape[1] - input_ids.shape[1] :]  # Drop prompts.


def _check_input_ids(input_ids: Array, config: DebertaV2Config) -> None:
  """Raises unless ``input_ids`` is ``(batch, seq)`` with known positions."""
  if input_ids.ndim != 2:
    raise PeftError(
      f'input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}.'
    )
  if config.position_biased_input and (
    input_ids.shape[1] > config.max_position_embeddings
  ):
    raise PeftError(
      f'Sequence length {input_ids.shape[1]} exceeds '
      f'max_position_embeddings={config.max_position_embeddings}; truncate '
      'the input (e.g. tokenizer(..., truncation=True)).'
    )


class ContextPooler(nn.Module):
  """HF's DeBERTa pooler: ``gelu(Dense(dropout(hidden[:, 0])))``.

  Attributes:
    config: the model's hyper-parameters.
  """

  config: DebertaV2Config

  @nn.compact
  def __call__(self, hidden: Array, *, deterministic: bool = True) -> Array:
    """Pools the first token.

    Args:
      hidden: ``(batch, seq, hidden)`` last hidden states.
      deterministic: disables dropout when True.

    Returns:
      ``(batch, pooler_hidden_size)`` pooled output.
    """
    cfg = self.config
    x = nn.Dropout(cfg.pooler_dropout)(hidden[:, 0], deterministic=deterministic)
    x = _dense(cfg.pooler_hidden_size or cfg.hidden_size, 'dense')(x)
    return nn.gelu(x, approximate=False)


class DebertaV2ForSequenceClassification(nn.Module):
  """DeBERTa with HF's context pooler and a dropout + Dense classifier.

  Parameters: ``{'deberta': <DebertaV2Model params>, 'pooler': {'dense':
  {kernel, bias}}, 'classifier': {kernel, bias}}``, as Hugging Face's
  ``deberta.*``, ``pooler.dense.*``, ``classifier.*``.

  Attributes:
    config: the encoder's hyper-parameters.
    num_labels: number of output logits.
  """

  config: DebertaV2Config
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
    cfg = self.config
    hidden = DebertaV2Model(cfg, name='deberta')(
      input_ids, attention_mask, token_type_ids, deterministic=deterministic
    )
    pooled = ContextPooler(cfg, name='pooler')(hidden, deterministic=deterministic)
    rate = cfg.hidden_dropout if cfg.cls_dropout is None else cfg.cls_dropout
    pooled = nn.Dropout(rate)(pooled, deterministic=deterministic)
    return layers.dense(self.num_labels, name='classifier')(pooled)


# ---------------------------------------------------------------------------
# Loading Hugging Face checkpoints.


def hf_layout(config: DebertaV2Config) -> checkpoints.Layout:
  """The conversion table of a Hugging Face DeBERTa-v2/v3 checkpoint.

  Tensor names may be bare (``encoder.layer.0.attention.self.query_proj.weight``)
  or carry a ``deberta.`` prefix. Our paths are the PyTorch names with ``.``
  → ``/``, ``layer.{i}`` → ``layer_{i}`` and ``weight`` →
  ``kernel``/``embedding``/``scale``. Ignored: ``embeddings.position_ids``,
  ``embeddings.position_embeddings.weight`` when ``position_biased_input``
  is False (as Hugging Face ignores it), and tensors outside
  ``embeddings``/``encoder`` (``lm_predictions``, ``mask_predictions``,
  ``pooler``, ``classifier``).

  Args:
    config: the model's hyper-parameters.

  Returns:
    The layout of ``DebertaV2Model(config)``'s params (float32, kernels
    ``(d_in, d_out)``); convert with ``checkpoints.convert``.
  """
  abstract = jax.eval_shape(
    DebertaV2Model(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
  )['params']
  ignore = [r'(?!(embeddings|encoder)\.).*', r'embeddings\.position_ids']
  if not config.position_biased_input:
    ignore.append(r'embeddings\.position_embeddings\.weight')
  return checkpoints.Layout(
    tensors=tuple(_hf_tensors(config)),
    abstract=abstract,
    prefixes=('deberta.',),
    ignore=tuple(ignore),
    hint=(
      'check num_hidden_layers, share_att_key, pos_att_type and norm_rel_ebd '
      'in config.json'
    ),
  )


def _path(torch_module: str) -> str:
  """``encoder.layer.3.attention.self.query_proj`` -> ``encoder/layer_3/...``."""
  return torch_module.replace('.layer.', '.layer_').replace('.', '/')


def _hf_tensors(config: DebertaV2Config) -> Iterator[checkpoints.Tensor]:
  """The rows of ``hf_layout``, per parameterised module."""
  embedding = lambda m: checkpoints.embedding(m, _path(m))
  dense = lambda m, bias=True: checkpoints.dense(m, _path(m), bias=bias)
  norm = lambda m: checkpoints.norm(m, _path(m))
  yield from embedding('embeddings.word_embeddings')
  if config.position_biased_input:
    yield from embedding('embeddings.position_embeddings')
  if config.type_vocab_size > 0:
    yield from embedding('embeddings.token_type_embeddings')
  if (config.embedding_size or config.hidden_size) != config.hidden_size:
    yield from dense('embeddings.embed_proj', bias=False)
  yield from norm('embeddings.LayerNorm')
  if config.relative_attention:
    yield from embedding('encoder.rel_embeddings')
    if config.norm_rel_ebd == 'layer_norm':
      yield from norm('encoder.LayerNorm')
  for i in range(config.num_layers):
    p = f'encoder.layer.{i}'
    for name in ('query_proj', 'key_proj', 'value_proj'):
      yield from dense(f'{p}.attention.self.{name}')
    if config.relative_attention and not config.share_att_key:
      if 'c2p' in config.pos_att_type:
        yield from dense(f'{p}.attention.self.pos_key_proj')
      if 'p2c' in config.pos_att_type:
        yield from dense(f'{p}.attention.self.pos_query_proj')
    yield from dense(f'{p}.attention.output.dense')
    yield from norm(f'{p}.attention.output.LayerNorm')
    yield from dense(f'{p}.intermediate.dense')
    yield from dense(f'{p}.output.dense')
    yield from norm(f'{p}.output.LayerNorm')


def load_hf(model_dir: str | os.PathLike) -> tuple[DebertaV2Config, Params]:
  """Loads a Hugging Face DeBERTa-v2/v3 checkpoint directory.

  Args:
    model_dir: a directory with ``config.json`` and ``model.safetensors``
      (or a sharded ``model.safetensors.index.json``).

  Returns:
    ``(config, params)``: the model config and the ``params`` tree of
    ``DebertaV2Model(config)`` (see ``hf_layout``); apply it as
    ``{'params': params}``.

  Raises:
    PeftError: if ``config.json`` or the weights are absent, the config is
      unsupported, or the tensors do not match the config (the message names
      the tensors).
  """
  config = DebertaV2Config.from_hf(checkpoints.read_hf_config(model_dir))
  return config, checkpoints.load_safetensors(model_dir, hf_layout(config))


def _head_rows() -> list[checkpoints.Tensor]:
  """The rows of the sequence classifier's head: context pooler + classifier."""
  return [
    *checkpoints.dense('pooler.dense', 'pooler/dense'),
    *checkpoints.dense('classifier', 'classifier'),
  ]


def hf_modules(
  config: DebertaV2Config, head: bool = False
) -> dict[str, checkpoints.Module]:
  """The modules of a transformers DeBERTa-v2/v3 model by their full names,
  with our parameter paths: the names PEFT adapters use.

  Args:
    config: the model's hyper-parameters.
    head: False for ``DebertaV2Model`` (``encoder.layer.0.attention.self.
      query_proj`` -> ``encoder/layer_0/attention/self/query_proj``); True
      for ``DebertaV2ForSequenceClassification``: ``deberta.`` names ->
      ``deberta/`` paths, plus ``pooler.dense`` and ``classifier``.

  Returns:
    ``{module name: {param: Tensor}}`` (see ``checkpoints.modules``).
  """
  if not head:
    return checkpoints.modules(_hf_tensors(config))
  return checkpoints.task_modules(
    _hf_tensors(config), 'deberta.', 'deberta', _head_rows()
  )


def load_hf_classifier(
  model_dir: str | os.PathLike,
) -> tuple[DebertaV2Config, Params]:
  """Loads a Hugging Face ``DebertaV2ForSequenceClassification`` checkpoint.

  Args:
    model_dir: a directory with ``config.json`` and the safetensors.

  Returns:
    ``(config, params)``: the tree of our ``DebertaV2ForSequenceClassification``
    (``deberta``, ``pooler/dense``, ``classifier``); ``num_labels`` is
    ``params['classifier']['bias'].shape[0]``.

  Raises:
    PeftError: if a file or the head is absent, the config is unsupported,
      or the tensors do not match (named in the message).
  """
  config = DebertaV2Config.from_hf(checkpoints.read_hf_config(model_dir))
  tensors = checkpoints.read_safetensors(model_dir)
  if 'classifier.weight' not in tensors:
    raise PeftError(
      f'{model_dir}: no classifier.weight; expected a DeBERTa sequence '
      'classification checkpoint (load_hf reads the encoder alone).'
    )
  num_labels = tensors['classifier.weight'].shape[0]
  pooled = config.pooler_hidden_size or config.hidden_size
  layout = checkpoints.task_layout(
    hf_layout(config),
    'deberta.',
    'deberta',
    _head_rows(),
    {
      'pooler': {'dense': checkpoints.dense_shapes(config.hidden_size, pooled)},
      'classifier': checkpoints.dense_shapes(pooled, num_labels),
    },
  )
  return config, checkpoints.convert(tensors, layout)
