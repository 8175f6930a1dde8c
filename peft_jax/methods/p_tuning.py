"""P-tuning (Liu et al., 2021, "GPT Understands, Too"): a soft prompt made
by a trained prompt encoder, as Hugging Face PEFT's ``PromptEncoder``."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from peft_jax._src import checks, soft_prompts
from peft_jax._src.base import ActivationAdapter, Array, PeftError
from peft_jax._src.registry import register

ENCODERS = ('mlp', 'lstm')


class DenseParams(NamedTuple):
  """One linear layer ``x @ kernel + bias``, ``kernel: (d_in, d_out)``
  (torch's ``weight`` transposed), ``bias: (d_out,)``."""

  kernel: Array
  bias: Array


class LstmDirection(NamedTuple):
  """One direction of one LSTM layer, gate blocks in torch's order i, f, g, o.

  ``w_ih: (d_in, 4h)``, ``w_hh: (h, 4h)``, ``b_ih, b_hh: (4h,)``; columns
  ``[0, h)`` are the input gate, ``[h, 2h)`` the forget gate, ``[2h, 3h)``
  the cell candidate, ``[3h, 4h)`` the output gate. Torch's ``nn.LSTM``
  names for layer ``k`` (suffix ``_reverse`` for the backward direction):
  ``weight_ih_l{k} = w_ihᵀ``, ``weight_hh_l{k} = w_hhᵀ``,
  ``bias_ih_l{k} = b_ih``, ``bias_hh_l{k} = b_hh``.
  """

  w_ih: Array
  w_hh: Array
  b_ih: Array
  b_hh: Array


class LstmLayer(NamedTuple):
  """One bidirectional layer: torch's ``…_l{k}`` and ``…_l{k}_reverse``."""

  forward: LstmDirection
  backward: LstmDirection


class PTuningParams(NamedTuple):
  """The prompt encoder, as HF PEFT's ``PromptEncoder`` state dict.

  Attributes:
    embedding: ``E: (l, d)``, ``embedding.weight``.
    lstm: the bidirectional LSTM layers, ``lstm_head`` (``()`` for the MLP
      encoder).
    head: the linear layers of ``mlp_head``, a ReLU between consecutive ones:
      MLP ``(d → h, h → h, h → d)`` = ``mlp_head.0, .2, .4``; LSTM
      ``(2h → 2h, 2h → d)`` = ``mlp_head.0, .2``.
  """

  embedding: Array
  lstm: tuple[LstmLayer, ...]
  head: tuple[DenseParams, ...]


def lstm_step(p: LstmDirection, carry, gates_x):
  """One LSTM step: ``z = x w_ih + b_ih + h w_hh + b_hh`` split into
  ``i, f, g, o``; ``c' = σ(f)·c + σ(i)·tanh(g)``, ``h' = σ(o)·tanh(c')``.
  ``gates_x = x w_ih + b_ih + b_hh: (4h,)`` is computed outside the scan."""
  h, c = carry
  i, f, g, o = jnp.split(gates_x + h @ p.w_hh, 4)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  h = jax.nn.sigmoid(o) * jnp.tanh(c)
  return (h, c), h


def lstm_direction(p: LstmDirection, xs: Array, reverse: bool) -> Array:
  """The hidden states ``(l, h)`` of one direction over ``xs: (l, d_in)``
  from ``h = c = 0``; ``reverse`` runs from the last position to the first
  and keeps each state at its position (torch's ``_reverse`` direction)."""
  zeros = jnp.zeros(p.w_hh.shape[0], xs.dtype)
  gates_x = xs @ p.w_ih + p.b_ih + p.b_hh
  step = functools.partial(lstm_step, p)
  return jax.lax.scan(step, (zeros, zeros), gates_x, reverse=reverse)[1]


def bidirectional(layer: LstmLayer, xs: Array) -> Array:
  """``[forward, backward]`` states per position: ``(l, d_in) -> (l, 2h)``."""
  return jnp.concatenate(
    [
      lstm_direction(layer.forward, xs, False),
      lstm_direction(layer.backward, xs, True),
    ],
    axis=-1,
  )


def mlp(head: tuple[DenseParams, ...], x: Array) -> Array:
  """``x W_1 + b_1``, with ``relu`` before each following layer."""
  x = x @ head[0].kernel + head[0].bias
  for dense in head[1:]:
    x = jax.nn.relu(x) @ dense.kernel + dense.bias
  return x


def encode(params: PTuningParams) -> Array:
  """The virtual-token embeddings ``P: (l, d)``: ``mlp(head, lstm(E))``.

  ``PromptParams(encode(params))`` with ``prompt_tuning(length=l)`` is the
  same model: after training the encoder can be dropped (what HF PEFT saves
  for P-tuning).
  """
  x = params.embedding
  for layer in params.lstm:
    x = bidirectional(layer, x)
  return mlp(params.head, x)


def _uniform(key, shape, bound, dtype) -> Array:
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _dense(key, d_in: int, d_out: int, dtype) -> DenseParams:
  """torch ``nn.Linear``: weight and bias ``U(±1/√d_in)``."""
  key_w, key_b = jax.random.split(key)
  bound = d_in**-0.5
  return DenseParams(
    _uniform(key_w, (d_in, d_out), bound, dtype),
    _uniform(key_b, (d_out,), bound, dtype),
  )


def _direction(key, d_in: int, hidden: int, dtype) -> LstmDirection:
  """torch ``nn.LSTM``: every weight and bias ``U(±1/√h)``."""
  shapes = [(d_in, 4 * hidden), (hidden, 4 * hidden), (4 * hidden,), (4 * hidden,)]
  keys = jax.random.split(key, len(shapes))
  return LstmDirection(
    *(_uniform(k, s, hidden**-0.5, dtype) for k, s in zip(keys, shapes, strict=True))
  )


def _lstm_inputs(d: int, hidden: int, layers: int) -> list[int]:
  """``d_in`` of each of ``layers`` LSTM layers: ``d``, then ``2h``."""
  return [d, *[2 * hidden] * (layers - 1)][:layers]


def _head_sizes(encoder: str, d: int, hidden: int) -> list[tuple[int, int]]:
  """``(d_in, d_out)`` of each linear layer of ``mlp_head``."""
  if encoder == 'mlp':
    return [(d, hidden), (hidden, hidden), (hidden, d)]
  return [(2 * hidden, 2 * hidden), (2 * hidden, d)]


@register('p_tuning')
def p_tuning(
  length: int = 20,
  *,
  encoder: str = 'mlp',
  hidden: int | None = None,
  lstm_layers: int = 2,
  param_dtype: str = 'float32',
) -> ActivationAdapter:
  """Prepends ``l`` virtual-token embeddings made by a trained prompt encoder.

  At an ``input_embeddings`` hook point with value ``(x, mask)``,
  ``x: (b, s, d)``, ``mask: (b, s)`` (or ``None``):
  ``x' = concat(P, x)``, ``mask' = concat(1_l, mask)`` along the sequence,
  as ``prompt_tuning``, with ``P = encoder(E): (l, d)`` computed once per
  call from trained inputs ``E: (l, d)`` and broadcast over the batch.
  Exactly Hugging Face PEFT's ``PromptEncoder`` (``peft/tuners/p_tuning``):

  * ``encoder='mlp'`` (HF's default and recommendation):
    ``P = relu(relu(E W_1 + b_1) W_2 + b_2) W_3 + b_3`` with ``W_1: (d, h)``,
    ``W_2: (h, h)``, ``W_3: (h, d)``. Trainable count
    ``l·d + (d·h + h) + (h·h + h) + (h·d + d)``.
  * ``encoder='lstm'``: ``lstm_layers`` (HF's ``encoder_num_layers``,
    default 2) bidirectional LSTM layers, hidden size ``h`` per direction,
    the first from ``d``, the others from ``2h``; each position's
    ``[forward, backward]`` states ``H: (l, 2h)`` then
    ``P = relu(H W_1 + b_1) W_2 + b_2``, ``W_1: (2h, 2h)``, ``W_2: (2h, d)``.
    Each LSTM direction runs ``z = x w_ih + b_ih + h w_hh + b_hh``
    (gates ``i, f, g, o``), ``c' = σ(f)·c + σ(i)·tanh(g)``,
    ``h' = σ(o)·tanh(c')`` from zeros, the backward one from the last
    position. Trainable count ``l·d + Σ_k 2·(4h·(d_k + h) + 8h) +
    (2h·2h + 2h) + (2h·d + d)``, ``d_0 = d``, ``d_k = 2h``.

  ``h = hidden``, default ``d`` (HF sets ``encoder_hidden_size =
  token_dim`` when unset). Init as torch's defaults: ``E ~ N(0, 1)``
  (``nn.Embedding``); linear weights and biases ``U(±1/√fan_in)``
  (``nn.Linear``); LSTM weights and biases ``U(±1/√h)`` (``nn.LSTM``).
  HF's ``encoder_dropout`` (default 0, between LSTM layers) is not
  supported. Parameters: ``PTuningParams`` (its docstring maps them to HF's
  state dict). Not mergeable: there is no weight-space form; ``encode``
  gives the flat prompt for ``prompt_tuning`` after training.

  Args:
    length: l > 0, the number of virtual tokens.
    encoder: ``'mlp'`` or ``'lstm'``.
    hidden: h > 0, the encoder's hidden size, or None for ``d``.
    lstm_layers: the number of LSTM layers (``encoder='lstm'`` only).
    param_dtype: dtype of the parameters; the output keeps the embeddings'
      dtype.

  Returns:
    The P-tuning ``ActivationAdapter``.
  """
  name = 'p_tuning'
  length = checks.positive_int(name, 'length', length)
  checks.choice(name, 'encoder', encoder, ENCODERS)
  if hidden is not None:
    hidden = checks.positive_int(name, 'hidden', hidden)
  layers = checks.positive_int(name, 'lstm_layers', lstm_layers)
  if encoder == 'mlp' and layers != 2:
    raise PeftError(
      f"{name}: lstm_layers={layers} applies only to encoder='lstm'; the MLP "
      'encoder has a fixed three linear layers'
    )
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)
  n_lstm = layers if encoder == 'lstm' else 0

  def sizes(value) -> tuple[int, int]:
    """``(d, h)`` at the point."""
    d = soft_prompts.embeddings_and_mask(name, value)[0].shape[-1]
    return d, hidden or d

  def init_fn(key, value):
    d, h = sizes(value)
    head_sizes = _head_sizes(encoder, d, h)
    key_e, key_lstm, key_head = jax.random.split(key, 3)
    lstm = tuple(
      LstmLayer(
        *(
          _direction(k, d_in, h, dtype)
          for k in jax.random.split(jax.random.fold_in(key_lstm, i))
        )
      )
      for i, d_in in enumerate(_lstm_inputs(d, h, n_lstm))
    )
    head_keys = jax.random.split(key_head, len(head_sizes))
    head = tuple(
      _dense(k, *io, dtype) for k, io in zip(head_keys, head_sizes, strict=True)
    )
    return PTuningParams(jax.random.normal(key_e, (length, d), dtype), lstm, head), None

  def apply(value, params, buffers):
    del buffers
    return soft_prompts.prepend(
      soft_prompts.embeddings_and_mask(name, value), encode(params)
    )

  def num_params(value):
    d, h = sizes(value)
    lstm = sum(2 * (4 * h * (d_in + h) + 8 * h) for d_in in _lstm_inputs(d, h, n_lstm))
    head = sum(i * o + o for i, o in _head_sizes(encoder, d, h))
    return length * d + lstm + head

  return ActivationAdapter(init=init_fn, apply=apply, num_params=num_params)
