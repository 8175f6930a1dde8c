"""A BERT encoder in float64 NumPy, written from the BERT paper and Hugging
Face's ``BertModel`` (post-LN layers, exact GELU), independent of
``peft_jax.models.bert``. Activation-side methods are given as plain
functions of the layer's arrays, so tests state their formula here."""

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from scipy.special import erf


class Edits(NamedTuple):
  """What an activation method does in layer ``i`` (None: nothing).

  prefix: ``i -> (P_k, P_v)``, each ``(l, h, d_h)``, prepended to the keys
    and values, visible to every query; or ``i -> f(x) -> (P_k, P_v)`` each
    ``(b, l, h, d_h)``, per example from the attention's input ``x``.
  ffn: ``i -> f(x, h) -> h'``: the FFN output ``h`` (before the residual)
    given the FFN input ``x``.
  projection: ``(i, name) -> f(x, y) -> y'`` for the ``query``/``key``/
    ``value`` projection ``y = x W + b`` of layer ``i`` (or None to keep it).
  """

  prefix: Callable[[int], object] | None = None
  ffn: Callable[[int], Callable[[np.ndarray, np.ndarray], np.ndarray]] | None = None
  projection: Callable[[int, str], Callable] | None = None


def _f64(tree):
  if isinstance(tree, dict):
    return {k: _f64(v) for k, v in tree.items()}
  return np.asarray(tree, np.float64)


def layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p['scale'] + p['bias']


def dense(x, p):
  return x @ p['kernel'] + p['bias']


def gelu(x):
  return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def attention(x, p, keep, heads, prefix, projection=None):
  """Self-attention of ``x: (b, s, d)`` with an optional ``(P_k, P_v)`` and
  projection edits ``name -> f(x, y) -> y'``."""
  b, s, d = x.shape
  dh = d // heads
  split = lambda y: y.reshape(b, -1, heads, dh)

  def project(name):
    y = dense(x, p[name])
    edit = projection(name) if projection else None
    return split(y if edit is None else edit(x, y))

  q, k, v = (project(n) for n in ('query', 'key', 'value'))
  visible = keep
  if prefix is not None:
    if callable(prefix):
      pk, pv = prefix(x)
    else:
      pk, pv = (np.broadcast_to(t, (b, *t.shape)) for t in prefix)
    k, v = np.concatenate([pk, k], 1), np.concatenate([pv, v], 1)
    visible = np.concatenate([np.ones((b, pk.shape[1]), bool), keep], 1)
  scores = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(dh)
  scores = np.where(visible[:, None, None, :], scores, -np.inf)
  context = np.einsum('bhqk,bkhd->bqhd', softmax(scores), v).reshape(b, s, d)
  return dense(context, p['output'])


def encoder(frozen_bert, ids, mask, config, edits: Edits | None = None) -> np.ndarray:
  """Last hidden states ``(b, s, d)`` of BERT (positions 0.., token type 0)."""
  edits = edits or Edits()
  w = _f64(frozen_bert)
  eps = config.layer_norm_eps
  emb = w['embeddings']
  s = ids.shape[1]
  x = (
    emb['word_embeddings']['embedding'][np.asarray(ids)]
    + emb['position_embeddings']['embedding'][np.arange(s)]
    + emb['token_type_embeddings']['embedding'][0]
  )
  x = layer_norm(x, emb['layer_norm'], eps)
  keep = np.asarray(mask) > 0
  for i in range(config.num_layers):
    p = w['encoder'][f'layer_{i}']
    prefix = edits.prefix(i) if edits.prefix else None
    projection = (
      (lambda name, i=i: edits.projection(i, name)) if edits.projection else None
    )
    y = attention(x, p['attention'], keep, config.num_heads, prefix, projection)
    x = layer_norm(x + y, p['attention']['layer_norm'], eps)
    h = dense(gelu(dense(x, p['intermediate'])), p['output'])
    if edits.ffn:
      h = edits.ffn(i)(x, h)
    x = layer_norm(x + h, p['output_layer_norm'], eps)
  return x
