"""Layers shared by the model families."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

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


# Causal self-attention of at least this many tokens skips the quarter of the
# scores that no query sees (keys after the middle, for the first half).
_SPLIT_FROM = 128

# Logits of masked-out keys (finite, as jax.nn.dot_product_attention's): a
# query with every key masked attends to them all uniformly, not to NaN.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def _grouped(x: Array, kv_heads: int) -> Array:
  """``(b, t, kv·g, h) -> (b, kv, g·t, h)``: the ``g`` query heads sharing
  a key/value head become rows of one matrix."""
  b, t, n, h = x.shape
  g = n // kv_heads
  return (
    x.reshape(b, t, kv_heads, g, h)
    .transpose(0, 2, 3, 1, 4)
    .reshape(b, kv_heads, g * t, h)
  )


def _ungrouped(x: Array, t: int) -> Array:
  """``_grouped``'s inverse: ``(b, kv, g·t, h) -> (b, t, kv·g, h)``."""
  b, kv, m, h = x.shape
  g = m // t
  return x.reshape(b, kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, h)


def _logits(qg: Array, k: Array, visible: Array | None) -> Array:
  """Masked, scaled scores ``(b, kv, g·t, s)``, in float32 at least."""
  dtype = jnp.promote_types(qg.dtype, jnp.float32)
  scores = jnp.einsum('bkmh,bskh->bkms', qg, k, preferred_element_type=dtype)
  scores = scores * (qg.shape[-1] ** -0.5)
  return scores if visible is None else jnp.where(visible, scores, _MASKED)


@jax.custom_vjp
def _attention(q: Array, k: Array, v: Array, visible: Array | None) -> Array:
  return _attention_fwd(q, k, v, visible)[0]


def _probabilities(logits: Array, row_max: Array, row_sum: Array) -> Array:
  """``softmax`` of ``logits`` from its rows' max and sum of ``exp(l − max)``
  (kept apart, not as ``max + log sum``: with every key masked, adding
  ``log s`` to the masked logit is lost to rounding, and ``p`` must be
  ``1/s``)."""
  return jnp.exp(logits - row_max) / row_sum


def _attention_fwd(q, k, v, visible):
  qg = _grouped(q, k.shape[2])
  logits = _logits(qg, k, visible)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  unnormalised = jnp.exp(logits - row_max)
  row_sum = jnp.sum(unnormalised, axis=-1, keepdims=True)
  p = unnormalised / row_sum  # _probabilities, without a second exp.
  og = jnp.einsum(
    'bkms,bskh->bkmh', p.astype(v.dtype), v, preferred_element_type=p.dtype
  )
  og = og.astype(q.dtype)
  return _ungrouped(og, q.shape[1]), (qg, k, v, visible, og, row_max, row_sum)


def _attention_bwd(residuals, do):
  """With ``p = softmax(l)``, ``l = q kᵀ/√h`` (masked), ``o = p v``:
  ``∂v = pᵀ ∂o``, ``∂l = p ⊙ (∂o vᵀ − rowsum(∂o ⊙ o))`` (zero where masked),
  ``∂q = ∂l k/√h``, ``∂k = ∂lᵀ q/√h``; ``p`` recomputed from the rows'
  max and sum."""
  qg, k, v, visible, og, row_max, row_sum = residuals
  t = do.shape[1]
  dog = _grouped(do, k.shape[2])
  p = _probabilities(_logits(qg, k, visible), row_max, row_sum)
  wide = functools.partial(jnp.einsum, preferred_element_type=p.dtype)
  dv = wide('bkms,bkmh->bskh', p.astype(dog.dtype), dog).astype(v.dtype)
  dp = wide('bkmh,bskh->bkms', dog, v)
  row = jnp.sum(dog.astype(p.dtype) * og.astype(p.dtype), -1, keepdims=True)
  dl = p * (dp - row) * (qg.shape[-1] ** -0.5)
  if visible is not None:
    dl = jnp.where(visible, dl, 0.0)
  dq = wide('bkms,bskh->bkmh', dl.astype(k.dtype), k).astype(qg.dtype)
  dk = wide('bkms,bkmh->bskh', dl.astype(qg.dtype), qg).astype(k.dtype)
  return _ungrouped(dq, t), dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _causal(groups: int, t: int, s: int, first: int = 0) -> Array:
  """``(g·t, s)``: grouped query row ``m`` (query ``first + m mod t``) sees
  keys ``≤`` its position."""
  rows = first + jnp.arange(groups * t) % t
  return rows[:, None] >= jnp.arange(s)[None, :]


def _visible(mask: Array | None, is_causal: bool, q: Array, k: Array) -> Array | None:
  """Which keys each grouped query row sees, broadcastable to ``(b, kv, g·t,
  s)``; None when all."""
  _, t, n, _ = q.shape
  s, kv = k.shape[1], k.shape[2]
  visible = None
  if is_causal:
    visible = _causal(n // kv, t, s)
  if mask is not None:
    if mask.dtype != jnp.bool_ or mask.ndim != 4:
      raise ValueError(
        f'mask: expected bool (batch, heads, t, s), got {mask.dtype}{mask.shape}'
      )
    full = jnp.broadcast_to(mask, (mask.shape[0], n, t, s))
    full = _grouped(full.transpose(0, 2, 1, 3), kv)  # (b | 1, kv, g·t, s)
    visible = full if visible is None else visible & full
  return visible


def attention(
  q: Array, k: Array, v: Array, mask: Array | None = None, is_causal: bool = False
) -> Array:
  """Softmax attention with grouped key/value heads, probabilities recomputed
  in the backward.

  ``o[b, t, i] = Σ_s p[b, i, t, s] v[b, s, j]``, ``p = softmax_s(q[b, t, i] ·
  k[b, s, j] / √h)`` over the keys ``s`` a query sees, ``j = i // g``:
  ``q (b, t, kv·g, h)``, ``k, v (b, s, kv, h)``, ``o`` like ``q``. ``mask``
  (bool, broadcastable to ``(b, kv·g, t, s)``, True = seen) and
  ``is_causal`` (query ``t`` sees keys ``s ≤ t``) combine, as in
  ``jax.nn.dot_product_attention``, whose XLA implementation it matches up to
  round-off (scores and softmax in float32 or wider; ``p`` cast to ``v``'s
  dtype).

  The ``g`` query heads of a key/value head are computed as the rows of one
  matrix, and the backward recomputes ``p`` from the scores and each row's
  max and sum of ``exp``. In straight-line code XLA reuses the forward's
  ``q kᵀ`` for that rather than computing it again, so per layer one float32
  score array is kept, not the probabilities and masked scores beside it;
  in a scanned stack (``nn.scan``) the backward recomputes ``q kᵀ`` and no
  score array is kept (benchmarks/results/hlo_breakdown.md: the reference
  step's XLA:CPU temporaries 33.3 GiB against 78.5 with
  ``jax.nn.dot_product_attention``).
  Ad hoc on the project's 2-core CPU (XLA:CPU, float32, 2026-12-03), the
  small Llama of benchmarks/lora_step.py (4 × 256 tokens, 8 query and 4
  key/value heads), against ``jax.nn.dot_product_attention``'s XLA
  implementation in the same process, interleaved (rounds of 3 steps; 2 runs
  of 8 rounds for the factored LoRA step, 1 for the others): the factored
  step 5-7 % faster and its temporary buffers 302 MiB instead of 350,
  weight-space LoRA 4 % faster, full fine-tuning 2 %.

  Causal self-attention of 128 tokens or more runs as two halves of the
  queries, the first against the first half of the keys only: a quarter of
  the scores, all masked, is not computed (the same small Llama, interleaved
  against one whole block: factored LoRA step 3-5 % faster in 3 runs, full
  fine-tuning 0.3-2 % and weight-space LoRA 2 % slower in 2 and 1, within
  the machine's noise; temporary buffers 6-10 MiB smaller).
  """
  t, groups = q.shape[1], q.shape[2] // k.shape[2]
  if is_causal and mask is None and t == k.shape[1] and t % 2 == 0 and t >= _SPLIT_FROM:
    # The first half of the queries sees only the first half of the keys.
    half = t // 2
    early = _attention(
      q[:, :half], k[:, :half], v[:, :half], _causal(groups, half, half)
    )
    late = _attention(q[:, half:], k, v, _causal(groups, half, t, first=half))
    return jnp.concatenate([early, late], axis=1)
  return _attention(q, k, v, _visible(mask, is_causal, q, k))
