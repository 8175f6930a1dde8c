"""UniPELT's gate (Mao et al., ACL 2022): ``g = mean_seq σ(x @ w_g + b_g)``.

Each UniPELT sub-module (LoRA, prefix, sequential adapter) scales its output
by a gate computed from its own input ``x: (..., s, d)``: a linear head
``w_g: (d, heads)``, ``b_g: (heads,)``, a sigmoid per position, then the mean
over the sequence axis (−2). As in adapter-hub/adapters (``methods/lora.py``,
``methods/modeling.py``: ``torch.mean(torch.sigmoid(gate(x)), dim=1)``), the
mean runs over every position, padding included. An ``x`` of rank 2 is one
sequence ``(s, d)``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src.base import Array, PeftError


def sequence_gate(name: str, x: Array, weight: Array, bias: Array) -> Array:
  """``mean over axis −2 of σ(x @ weight + bias)``.

  Shapes: ``x: (..., s, d)``, ``weight: (d, heads)``, ``bias: (heads,)``;
  the gate is ``(..., 1, heads)``, which broadcasts over the ``s`` positions
  (and, with one head, over the features) of the gated output.
  """
  if x.ndim < 2:
    raise PeftError(
      f'{name} gates over a sequence axis: x must be (..., s, d); got shape '
      f'{tuple(x.shape)}'
    )
  return jnp.mean(jax.nn.sigmoid(x @ weight + bias), axis=-2, keepdims=True)


class GateParams(NamedTuple):
  """A gate head: ``weight: (d, heads)``, ``bias: (heads,)``."""

  weight: Array
  bias: Array


class Gated(NamedTuple):
  """A method's parameters with UniPELT's gate beside them."""

  inner: Any
  gate: GateParams


def init_gate(key: Array, d: int, dtype, heads: int = 1) -> GateParams:
  """``weight ~ N(0, 0.02²)``, ``bias ~ U(±1/√d)``: the adapters library's
  ``nn.Linear(d, heads)`` with ``weight.normal_(std=0.02)`` and torch's
  default bias."""
  key_w, key_b = jax.random.split(key)
  bound = 1.0 / np.sqrt(d)
  return GateParams(
    0.02 * jax.random.normal(key_w, (d, heads), dtype),
    jax.random.uniform(key_b, (heads,), dtype, -bound, bound),
  )
