"""LoRA-Dash's phase switch: pick the dash directions after the pre-launch."""

import jax
import jax.numpy as jnp

from peft_jax._src import checks, paths
from peft_jax._src.base import BUFFERS, Adapter, AdapterParams, Array, Schedule
from peft_jax._src.linalg import thin_svd
from peft_jax.schedules.adalora import governed, replace_subtrees


def select_directions(w: Array, delta: Array, n: int) -> tuple[Array, Array]:
  """The ``n`` singular directions of ``w`` that ``delta`` changes most, relatively.

  With the float32 thin SVD ``w = v · diag(σ) · uᵀ`` (``sam_parser.thin_svd``;
  PyTorch layout ``W = U diag(σ) Vᵀ``) and ``delta = ΔWᵀ: (d_in, d_out)``,
  ``δ_i = u_iᵀ ΔW v_i = v_iᵀ delta u_i`` and the change rate is
  ``c_i = |δ_i| / σ_i``, the code's form (the paper writes
  ``|δ_i| / (σ_i + ε)``); a direction with ``σ_i = 0`` has rate ``inf``
  (``0`` if ``δ_i = 0`` too). ``I`` = the indices of the top-``n`` rates.

  Returns:
    ``(v_I: (d_in, n), u_I: (d_out, n))``, float32, by decreasing rate.
  """
  u, sigma, v = thin_svd(w)
  projected = jnp.sum((v.T @ delta.astype(jnp.float32)) * u.T, axis=1)
  rate = jnp.nan_to_num(jnp.abs(projected) / sigma, nan=0.0, posinf=jnp.inf)
  _, chosen = jax.lax.top_k(rate, n)
  return v[:, chosen], u[:, chosen]


def lora_dash_schedule(adapter: Adapter, *, warmup_steps: int = 100) -> Schedule:
  """LoRA-Dash's switch from pre-launch to dash over the ``lora_dash`` leaves.

  After update ``t = warmup_steps`` (the spec's ``t_w = 100``), for every
  governed leaf: ``ΔW = s · a @ b`` (the leaf's ``apply`` on a zero weight
  with ``d = 0``), the top-``n`` directions by ``select_directions`` on the
  frozen ``w``, stored into the leaf's ``buffers`` ``v`` and ``u``. From
  update ``t_w + 1`` on, ``d`` gets gradients and trains; ``a`` and ``b``
  keep training (the spec, issue #8). Everything else is left alone
  (including the optimizer state: ``d``'s moments are still zero). The SVD
  runs inside a ``lax.cond``, only at that step.

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

  def init(frozen, theta):
    governed(name, adapter, frozen, theta, 'lora_dash')
    return ()

  def select(frozen: dict, theta: AdapterParams) -> AdapterParams:
    flat = paths.flatten(frozen)
    buffers = {}
    for leaf, (leaf_adapter, leaf_theta) in governed(
      name, adapter, frozen, theta, 'lora_dash'
    ).items():
      w = flat[leaf]
      lora_only = {**leaf_theta, 'd': jnp.zeros_like(leaf_theta['d'])}
      delta = leaf_adapter.apply(jnp.zeros(w.shape, jnp.float32), lora_only)
      v, u = select_directions(w, delta, leaf_theta['d'].shape[0])
      buffers[f'{leaf}/{BUFFERS}'] = {'v': v, 'u': u}
    return replace_subtrees(theta, buffers)

  def update(state, frozen, theta, grads, opt_state, step):
    del grads
    theta = jax.lax.cond(
      step == warmup, lambda t: select(frozen, t), lambda t: t, theta
    )
    return theta, opt_state, state

  return Schedule(init=init, update=update)
