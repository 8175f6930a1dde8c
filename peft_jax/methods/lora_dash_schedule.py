"""LoRA-Dash's phase switch: pick the dash directions after the pre-launch."""

import functools
import math

import jax
import jax.numpy as jnp

from peft_jax._src import checks, paths
from peft_jax._src.base import Array, Entry, Schedule, TreeAdapter
from peft_jax._src.linalg import thin_svd
from peft_jax._src.schedules import stateless_lookup
from peft_jax.methods.lora_dash import LoraDashBuffers, LoraDashParams


def select_directions(w: Array, delta: Array, n: int) -> tuple[Array, Array]:
  """The ``n`` singular directions of ``w`` that ``delta`` changes most, relatively.

  With the float32 thin SVD ``w = v · diag(σ) · uᵀ`` (``linalg.thin_svd``;
  PyTorch layout ``W = U diag(σ) Vᵀ``) and ``delta = ΔWᵀ: (d_in, d_out)``,
  ``δ_i = u_iᵀ ΔW v_i = v_iᵀ delta u_i`` and the change rate is
  ``c_i = |δ_i| / σ_i``, the code's form (the paper writes
  ``|δ_i| / (σ_i + ε)``); a direction with ``σ_i = 0`` has rate ``inf``
  (``0`` if ``δ_i = 0`` too). ``I`` = the indices of the top-``n`` rates.

  Args:
    w: the frozen kernel, ``(d_in, d_out)``.
    delta: the LoRA update ``s · a @ b``, ``(d_in, d_out)``.
    n: the number of directions.

  Returns:
    ``(v_I: (d_in, n), u_I: (d_out, n))``, float32, by decreasing rate.
  """
  u, sigma, v = thin_svd(w)
  projected = jnp.sum((v.T @ delta.astype(jnp.float32)) * u.T, axis=1)
  rate = jnp.nan_to_num(jnp.abs(projected) / sigma, nan=0.0, posinf=jnp.inf)
  _, chosen = jax.lax.top_k(rate, n)
  return v[:, chosen], u[:, chosen]


def leaf_directions(w: Array, entry: Entry) -> LoraDashBuffers:
  """The directions of one governed leaf, as the method sees its kernel.

  ``ΔW = s · a @ b`` is the leaf adapter's ``apply`` on a zero weight with
  ``d = 0`` (so any wrapper's reshaping applies). The buffers ``v: (...,
  d_in, n)`` and ``u: (..., d_out, n)`` give the matrix shape the method
  sees: the frozen ``w`` and ``ΔW`` are viewed as ``(..., d_in, d_out)``
  (``matrix_view`` flattens the input and output axes the same way; leading
  axes are the layers of ``stacked``), and ``select_directions`` runs on
  each matrix.
  """
  params, buffers = entry.params, entry.buffers
  lora_only = params._replace(d=jnp.zeros_like(params.d))
  delta = entry.adapter.apply(jnp.zeros(w.shape, jnp.float32), lora_only, buffers)
  *lead, d_in, n = buffers.v.shape
  d_out = buffers.u.shape[-2]
  count = math.prod(lead)
  as_matrices = lambda x: jnp.reshape(x, (count, d_in, d_out))
  select = jax.vmap(functools.partial(select_directions, n=n))
  v, u = select(as_matrices(w), as_matrices(delta))
  return LoraDashBuffers(
    v=jnp.reshape(v, buffers.v.shape), u=jnp.reshape(u, buffers.u.shape)
  )


def lora_dash_schedule(adapter: TreeAdapter, *, warmup_steps: int = 100) -> Schedule:
  """LoRA-Dash's switch from pre-launch to dash over the ``lora_dash`` leaves.

  Governed leaves are those whose parameters are ``LoraDashParams``, however
  the method is wrapped (``mpc``, ``matrix_view``, ``stacked``, a hand-built
  copy): each matrix the method sees (one per layer under ``stacked``) gets
  its own directions.

  After update ``t = warmup_steps`` (the spec's ``t_w = 100``), for every
  governed matrix: ``ΔW = s · a @ b``, the top-``n`` directions by
  ``select_directions`` on the frozen ``w`` (``leaf_directions``), stored
  into the leaf's ``LoraDashBuffers`` ``v`` and ``u``. From update
  ``t_w + 1`` on, ``d`` gets gradients and trains; ``a`` and ``b`` keep
  training (the spec, issue #8). Everything else is left alone (the
  parameters, and the optimizer state: ``d``'s moments are still zero). The
  SVD runs inside a ``lax.cond``, only at that step.

  Steps are optimizer updates. The reference counts forward calls of each
  module, which includes gradient-accumulation micro-batches and evaluation
  passes, so its switch comes earlier in updates when either is used.

  Args:
    adapter: a tree-level adapter (``by_rules``) with ``lora_dash`` leaves.
    warmup_steps: ``t_w > 0``, the updates of plain LoRA before the dash.

  Returns:
    The ``Schedule`` (its state is ``()``).
  """
  name = 'lora_dash_schedule'
  warmup = checks.positive_int(name, 'warmup_steps', warmup_steps)

  leaves, init = stateless_lookup(name, adapter, LoraDashParams)

  def select(frozen, params, buffers):
    flat = paths.flatten(frozen)
    chosen = leaves(frozen, params, buffers)
    return paths.replace(
      buffers,
      {leaf: leaf_directions(flat[leaf], entry) for leaf, entry in chosen.items()},
    )

  def update(state, frozen, params, buffers, grads, opt_state, step):
    del grads
    buffers = jax.lax.cond(
      step == warmup,
      lambda b: select(frozen, params, b),
      lambda b: b,
      buffers,
    )
    return params, buffers, opt_state, state

  return Schedule(init=init, update=update)
