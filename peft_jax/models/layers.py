"""Layers shared by the model families."""

import functools

import flax.linen as nn
import jax

Array = jax.Array


def _x_at_w(x: Array, kernel: Array, precision, preferred_element_type) -> Array:
  """``(..., d_in) @ (d_in, d_out) -> (..., d_out)``."""
  return jax.lax.dot_general(
    x,
    kernel,
    (((x.ndim - 1,), (0,)), ((), ())),
    precision=precision,
    preferred_element_type=preferred_element_type,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _token_dot(x: Array, kernel: Array, precision, preferred_element_type) -> Array:
  return _x_at_w(x, kernel, precision, preferred_element_type)


def _token_dot_fwd(x, kernel, precision, preferred_element_type):
  return _x_at_w(x, kernel, precision, preferred_element_type), (x, kernel)


def _token_dot_bwd(precision, preferred_element_type, residuals, g):
  """JAX's own gradients of ``x @ w``, taken with ``x`` and ``g`` seen as
  ``(tokens, d)``: ``∂w = xᵀ g`` then contracts one axis, not (batch, seq)."""
  x, kernel = residuals
  tokens = lambda a: a.reshape(-1, a.shape[-1])
  _, vjp = jax.vjp(
    lambda x, w: _x_at_w(x, w, precision, preferred_element_type), tokens(x), kernel
  )
  dx, dkernel = vjp(tokens(g))
  return dx.reshape(x.shape), dkernel


_token_dot.defvjp(_token_dot_fwd, _token_dot_bwd)


def token_dot_general(
  x: Array,
  kernel: Array,
  dimension_numbers,
  precision=None,
  preferred_element_type=None,
) -> Array:
  """``nn.Dense``'s ``y = x @ w``, ``(..., d_in) @ (d_in, d_out) -> (...,
  d_out)``, whose backward pass sees the leading axes as one token axis.

  The forward is ``lax.dot_general`` on ``x`` as given, so what reads the
  program (the factored path, which enters the custom VJP, and a factored
  form that pools over the sequence) sees ``(batch, seq, d_in)``. Only the
  gradients change: ``∂w = xᵀ g`` over one axis, where over (batch, seq)
  XLA:CPU first transposed the whole output gradient ``g`` (a fifth of the
  small Llama's full fine-tuning step, benchmarks/results/cpu_profile_small.md).
  Same values as ``lax.dot_general``'s gradients up to summation order.
  """
  (x_contract, w_contract), batch = dimension_numbers
  if x_contract != (x.ndim - 1,) or w_contract != (0,) or batch != ((), ()):
    raise ValueError(f'expected x @ w dimension numbers, got {dimension_numbers}')
  return _token_dot(x, kernel, precision, preferred_element_type)


def dense(features: int, name: str, **kwargs) -> nn.Dense:
  """``nn.Dense`` (same parameters) with ``token_dot_general``."""
  return nn.Dense(features, dot_general=token_dot_general, name=name, **kwargs)


@jax.checkpoint
def gelu(h: Array) -> Array:
  """Exact (erf) GELU, ``h Φ(h)`` elementwise on any shape, recomputed in the
  backward from ``h`` alone.

  Without the checkpoint XLA keeps ``GELU(h)`` and the terms of its
  derivative (``exp(-h²/2)``, the erf branch) for the backward: three more
  arrays of the FFN's widest shape ``(batch, seq, intermediate)`` per layer.
  With it, only ``h`` (the ``intermediate`` matmul's output) is kept and the
  derivative is recomputed elementwise. Measured ad hoc on the project's
  2-core CPU (XLA:CPU, float32, 32 × 64 tokens, 2026-12-03): MiniLM-L6's LoRA
  step keeps 488 MiB of temporary buffers instead of 632 and runs 7-9 %
  faster; a 6-layer, 384-wide DeBERTa's gradient 871 MiB instead of 1,015
  (README, "Against HF PEFT on a CPU"). Same values up to float round-off.
  """
  return jax.nn.gelu(h, approximate=False)


@jax.checkpoint
def swiglu(gate: Array, up: Array) -> Array:
  """SwiGLU's product ``silu(gate) · up = gate σ(gate) · up`` elementwise,
  ``(..., ffn)`` each, recomputed in the backward from ``gate`` and ``up``.

  As for ``gelu``: XLA otherwise keeps ``σ(gate)``, ``silu(gate)`` and the
  product for the backward besides the two inputs it needs. Ad hoc, XLA:CPU
  on 2 cores, float32, 2026-12-03, the small Llama of benchmarks/lora_step.py
  (4 × 256 tokens, LoRA r16 on all seven projections): the factored LoRA step
  keeps 275 MiB of temporary buffers instead of 372 and runs 12 % faster,
  weight-space LoRA 18 % faster, full fine-tuning (which needs the product
  for ``down_proj``'s gradient anyway) unchanged (interleaved, 2 runs of 5-7
  rounds).
  """
  return jax.nn.silu(gate) * up
