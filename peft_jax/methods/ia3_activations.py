"""(IA)³ on activations (Liu et al., 2022): scale keys, values and the FFN's
inner activation at hook points."""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src import checks
from peft_jax._src.base import ActivationAdapter, Array, PeftError
from peft_jax._src.hooks import AttentionKV
from peft_jax._src.registry import register


class Ia3KvParams(NamedTuple):
  """Key and value scales at ``attention_kv``: ``l_k, l_v: (h, d_h)``."""

  l_k: Array
  l_v: Array


class Ia3FfnParams(NamedTuple):
  """The FFN scale at ``ffn_intermediate``: ``l_ff: (d_ff,)``."""

  l_ff: Array


def _is_kv(value) -> bool:
  """Whether ``value`` is an ``AttentionKV`` with 4-D keys and values."""
  return (
    isinstance(value, AttentionKV)
    and len(np.shape(value.keys)) == len(np.shape(value.values)) == 4
  )


def _check(name: str, value) -> bool:
  """True at an ``attention_kv`` point, False at ``ffn_intermediate``, else
  a one-line error."""
  if _is_kv(value):
    return True
  if not isinstance(value, tuple) and len(np.shape(value)) == 3:
    return False
  raise PeftError(
    f'{name} acts at an attention_kv hook point, AttentionKV(keys (batch, seq, '
    'heads, head_dim), values (batch, seq, heads, head_dim), ...), or an '
    'ffn_intermediate one, (batch, seq, d_ff); got '
    f'{jax.tree.map(np.shape, value)}'
  )


@register('ia3_activations')
def ia3_activations(*, param_dtype: str = 'float32') -> ActivationAdapter:
  """Learned scaling of keys, values and the FFN's inner activation.

  The paper's ``K = l_k ⊙ (x W_k)``, ``V = l_v ⊙ (x W_v)``,
  ``FFN = (l_ff ⊙ f(x W_1)) W_2``, at two kinds of hook point, told apart by
  the value's structure:

  * ``attention_kv``, value ``AttentionKV(k, v, mask_bias, x)`` with
    ``k, v: (b, s, h, d_h)`` (``h`` = key/value heads): returns it with
    ``k ⊙ l_k``, ``v ⊙ l_v``,
    ``l_k, l_v: (h, d_h)`` broadcast over batch and sequence
    (``Ia3KvParams``). Count ``2 h d_h`` (``2 d_kv``).
  * ``ffn_intermediate``, value ``h: (b, s, d_ff)`` (after the
    non-linearity): returns ``h ⊙ l_ff``, ``l_ff: (d_ff,)``
    (``Ia3FfnParams``). Count ``d_ff``.

  Scales initialised to 1 (identity at init); computed in the activation's
  dtype; no buffers. Not mergeable as an activation adapter, but the guide's
  merge note holds: ``l_k``, ``l_v`` fold into the output columns of
  ``W_k``, ``W_v`` and ``l_ff`` into the input rows of ``W_2``. So this
  equals weight-space ``ia3()`` on the key and value kernels where they have
  no bias (a bias ``b`` would become ``b ⊙ l``), and ``ia3(feedforward=True)``
  on the FFN's output kernel (bias or not). The Llama decoder passes keys
  after RoPE, which rotates pairs ``(i, i + d_h/2)`` of each head: there
  ``l_k`` folds into ``W_k`` only when it is equal on each such pair.

  Args:
    param_dtype: dtype of the scales; outputs keep the activations' dtype.

  Returns:
    The (IA)³ ``ActivationAdapter``.
  """
  name = 'ia3_activations'
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, value):
    del key
    ones = lambda x: jnp.ones(x.shape[2:], dtype)  # Feature axes of (b, s, ...).
    if _check(name, value):
      return Ia3KvParams(ones(value.keys), ones(value.values)), None
    return Ia3FfnParams(ones(value)), None

  def apply(value, params, buffers):
    del buffers
    if _check(name, value):
      k, v = value.keys, value.values
      return value._replace(
        keys=k * params.l_k.astype(k.dtype), values=v * params.l_v.astype(v.dtype)
      )
    return value * params.l_ff.astype(value.dtype)

  def num_params(value):
    if _check(name, value):
      return sum(math.prod(x.shape[2:]) for x in (value.keys, value.values))
    return value.shape[2]

  return ActivationAdapter(init=init, apply=apply, num_params=num_params)
