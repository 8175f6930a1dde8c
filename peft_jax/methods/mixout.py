"""Mixout (Lee, Cho & Kang, ICLR 2020): mix trained weights with pretrained ones."""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from peft_jax._src import checks, noise
from peft_jax._src.base import Adapter, Array, Linear, PeftError
from peft_jax._src.noise import Noise
from peft_jax._src.registry import register

UNITS = ('entry', 'input')


class MixoutParams(NamedTuple):
  """The trained weight ``theta``, shaped like the leaf (initialised to it)."""

  theta: Array


class MixoutBuffers(NamedTuple):
  """The mixing mask's ``Noise`` (inactive when stored: the evaluation form)."""

  noise: Noise


def keep_mask(key: Array, shape, p: float, per: str = 'entry') -> Array:
  """``M ~ Bernoulli(1 − p)`` (bool), broadcastable to ``shape``.

  ``per='entry'``: one draw per entry, ``M: shape``. ``per='input'``: one
  draw per input feature of a kernel ``(d_in, d_out)``, ``M: (d_in, 1)``
  (a row shared by every output, as the reference code's ``noise[0]``
  repeated over the rows of the PyTorch ``W: (d_out, d_in)``); leaves of
  fewer than 2 axes draw per entry.
  """
  if per == 'input' and len(shape) >= 2:
    shape = (shape[0], *(1,) * (len(shape) - 1))
  return jax.random.bernoulli(key, 1 - p, shape)


def mix(theta: Array, theta0: Array, keep: Array, p: float) -> Array:
  """``(M ⊙ θ + (1 − M) ⊙ θ0 − p · θ0) / (1 − p)`` in float32.

  Lee et al.'s mixout operator (§3, with ``u = θ0``), as the reference
  ``mixout.py`` (github.com/bloodwass/mixout) computes it; ``E_M[·] = θ``
  for ``M ~ Bernoulli(1 − p)``.
  """
  theta, theta0 = theta.astype(jnp.float32), theta0.astype(jnp.float32)
  mixed = jnp.where(keep, theta, theta0)
  return (mixed - p * theta0) / (1 - p)


@register('mixout')
def mixout(
  p: float = 0.1, *, per: str = 'entry', param_dtype: str = 'float32'
) -> Adapter:
  """Mixout: train ``θ``; the forward mixes it with ``θ0`` at random.

  Shapes: any leaf ``w = θ0`` (Flax layout ``(d_in, d_out)`` for kernels);
  params ``MixoutParams(theta: θ)`` shaped like ``w``, initialised to it
  (like ``full``); buffers ``MixoutBuffers(noise)``. Lee, Cho & Kang,
  "Mixout: Effective Regularization to Finetune Large-scale Pretrained
  Language Models" (ICLR 2020), §3, with ``u = θ0`` the pretrained weight:

  * training (the ``Noise`` active, inside ``make_train_step`` only):
    ``θ_mix = (M ⊙ θ + (1 − M) ⊙ θ0 − p · θ0) / (1 − p)`` with
    ``M ~ Bernoulli(1 − p)`` drawn per forward (``mix``, ``keep_mask``), so
    ``E[θ_mix] = θ``: each entry is swapped for its pretrained value with
    probability ``p`` and the result is rescaled around ``θ0``, as dropout
    rescales around 0. Gradients are exact (``M/(1 − p) ⊙ g``; the
    reference's hand-written backward returns ``M ⊙ g``, ``(1 − p)`` times
    smaller, the same up to the learning rate).
  * evaluation (the ``Noise`` inactive: stored buffers, ``merge``):
    ``w' = θ``, the paper's (and its code's) deterministic form.

  The SAM paper (Fu et al., AAAI 2023, Table 1 baselines) describes its
  code's MixOut differently: its ``mixout=p`` mode trains densely and, at
  evaluation, replaces each encoder weight by its ``θ0`` value with
  probability ``p``. We implement Lee et al.'s Mixout, not that variant.

  ``per='entry'`` (default) draws ``M`` per weight, as the formula is
  written; ``per='input'`` draws it per input feature of a kernel, as the
  reference ``MixLinear`` does (a neuron mixed out with all its outgoing
  weights). Trainable count ``size(w)``. Mergeable;
  not invertible (``θ0`` is not kept). Factored form ``y = x @ w'``.

  Args:
    p: the mix probability, ``0 < p < 1``.
    per: ``'entry'`` or ``'input'``.
    param_dtype: dtype of ``θ`` (float32 master weights by default).

  Returns:
    The Mixout ``Adapter``.
  """
  name = 'mixout'
  p = checks.real(name, 'p', p)
  if not 0 < p < 1:
    raise PeftError(f'{name}: p={p} must be in (0, 1)')
  checks.choice(name, 'per', per, UNITS)
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def init(key, w):
    params = MixoutParams(theta=jnp.array(w, dtype=dtype, copy=True))
    return params, MixoutBuffers(noise=noise.inactive(key))

  # Jitted so that eager calls (merge, evaluation outside a step) compile the
  # lax.cond once per adapter instead of once per call; inlined under jit.
  @jax.jit
  def apply(w, params, buffers):
    stream = buffers.noise

    def sampled():
      keep = keep_mask(noise.key_of(stream), jnp.shape(w), p, per)
      return mix(params.theta, w, keep, p).astype(w.dtype)

    return jax.lax.cond(stream.active, sampled, lambda: params.theta.astype(w.dtype))

  def factored(x, w, params, buffers):
    return x @ apply(w, params, buffers)

  return Adapter(init=init, apply=apply, linear=Linear(factored), num_params=math.prod)
