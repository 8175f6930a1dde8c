"""The factored fast path: adapted matmuls without forming ``w'`` or ``dL/dw'``.

``factored(adapter, fn)`` turns ``fn(params, *args)`` — any JAX function of a
parameter tree: a Linen ``model.apply``, an ``nnx.merge``-based function, a
whole loss — into ``g(frozen, theta, *args)`` that equals
``fn(adapter.apply(frozen, theta), *args)`` but computes every matmul that
consumes an adapted kernel with the method's ``factored`` form, e.g. LoRA's
``x @ w + s·(x @ a) @ b``. The weight ``w' = f(w, θ)`` is never formed, and
under ``jax.grad`` neither is the ``(d_in, d_out)`` weight gradient: a
LoRA step costs about 4N FLOPs per token instead of 6N.

Mechanism: ``fn`` is traced to a jaxpr and re-evaluated by a small
interpreter in which each adapted kernel is an ``Adapted(w, θ)`` value.

* ``dot_general`` with an ``Adapted`` 2-D kernel contracted on its input
  axis (``x @ w``, the form of ``nn.Dense``, ``nn.Einsum('...i,ij->...j')``,
  ``nnx.Linear``, and of ``w`` on either operand side) runs the factored
  form; so does an N-D ``nn.DenseGeneral`` kernel contracted on its leading
  axes when its method is ``matrix_view(method, n_in)``.
* ``convert_element_type`` of the kernel (a model ``dtype`` of bf16 over f32
  params) keeps the kernel factored.
* ``jit``, ``custom_jvp``/``custom_vjp`` calls and ``checkpoint`` (remat,
  kept as remat) are entered; ``scan`` and ``cond`` are entered with
  ``Adapted`` values in their operands, so kernels stacked for ``nn.scan`` or
  ``lax.scan`` over layers stay factored when their method is
  ``stacked(method)`` (adapter parameters stacked the same way; the scan
  slices kernel and parameters together).
* Any other use of an adapted kernel — ``x @ wᵀ`` (tied embeddings), a
  gather, a reshape, a ``while`` loop — falls back to the weight-space form
  ``w' = apply(w, θ)`` at that use, with a ``FactoredFallbackWarning`` naming
  the leaf and the primitive. Methods without a ``factored`` form, and
  non-2-D leaves, are applied in weight space up front.
"""

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from peft_jax._src import paths
from peft_jax._src.base import Adapter, AdapterParams, Params, PeftError


class FactoredFallbackWarning(UserWarning):
  """An adapted kernel had to be materialised on the factored path."""


@jax.tree_util.register_pytree_node_class
class Adapted:
  """A frozen kernel with its adapter parameters, standing in for ``w'``.

  A pytree (children ``w`` and ``theta``), so ``scan`` slices stacked ones
  and ``checkpoint``/``cond`` pass them through.
  """

  def __init__(self, w, theta, adapter: Adapter, name: str):
    self.w, self.theta, self.adapter, self.name = w, theta, adapter, name

  def tree_flatten(self):
    return (self.w, self.theta), (self.adapter, self.name)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  def materialize(self, reason: str) -> jax.Array:
    warnings.warn(
      f'factored path: {self.name} is used by {reason}; computing it in weight '
      "space (w' = apply(w, theta)) there",
      FactoredFallbackWarning,
      stacklevel=2,
    )
    return self.adapter.apply(self.w, self.theta)


def _is_adapted(x: Any) -> bool:
  return isinstance(x, Adapted)


def _materialize_all(values: list, reason: str) -> list:
  return [v.materialize(reason) if _is_adapted(v) else v for v in values]


class _DotGeneral(NamedTuple):
  """``dot_general``'s dimension numbers and output type."""

  lhs_contract: tuple[int, ...]
  rhs_contract: tuple[int, ...]
  batch: bool
  out_dtype: Any


def _parse_dot(params: dict) -> _DotGeneral:
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = params['dimension_numbers']
  return _DotGeneral(
    tuple(lhs_contract),
    tuple(rhs_contract),
    bool(lhs_batch or rhs_batch),
    params.get('preferred_element_type'),
  )


def _kernel_in_axes(adapter: Adapter) -> int:
  """How many leading kernel axes the factored form contracts (2-D: 1)."""
  return adapter.kernel_in_axes or 1


def _factored_dot(x, kernel: Adapted, x_axes, kernel_first: bool, out_dtype):
  """``x`` contracted on ``x_axes`` with ``w'``, in dot_general's output order."""
  n_in = len(x_axes)
  moved = jnp.moveaxis(x, x_axes, tuple(range(x.ndim - n_in, x.ndim)))
  y = kernel.adapter.factored(moved, kernel.w, kernel.theta)
  if kernel_first:  # dot_general(w, x): output (*w_free, *x_free).
    n_out = np.ndim(kernel.w) - n_in
    y = jnp.moveaxis(y, tuple(range(y.ndim - n_out, y.ndim)), tuple(range(n_out)))
  return y if out_dtype is None else y.astype(out_dtype)


def _dot_general(eqn, lhs, rhs) -> list:
  """Factored ``x @ w'`` where possible; weight space otherwise."""
  dot = _parse_dot(eqn.params)
  for x, kernel, kernel_first in ((lhs, rhs, False), (rhs, lhs, True)):
    x_contract = dot.rhs_contract if kernel_first else dot.lhs_contract
    w_contract = dot.lhs_contract if kernel_first else dot.rhs_contract
    if (
      _is_adapted(kernel)
      and not _is_adapted(x)
      and not dot.batch
      and w_contract == tuple(range(_kernel_in_axes(kernel.adapter)))
      and np.ndim(kernel.w) > len(w_contract)
    ):
      return [_factored_dot(x, kernel, x_contract, kernel_first, dot.out_dtype)]
  return _bind(eqn, _materialize_all([lhs, rhs], 'a dot_general that is not x @ w'))


def _convert(eqn, value) -> list:
  w = eqn.primitive.bind(value.w, **eqn.params)
  return [Adapted(w, value.theta, value.adapter, value.name)]


def _unstack(x):
  """A stacked ``Adapted`` scanned over: its slices use the per-layer method."""
  if not _is_adapted(x):
    return x
  if x.adapter.unstacked is None:
    return x.materialize('a scan over its leading axis (not a stacked(...) method)')
  return Adapted(x.w, x.theta, x.adapter.unstacked, x.name)


def _scan_layout(params: dict) -> tuple[int, int]:
  """``(num_consts, num_carry)`` of a scan: jax <= 0.10 names them; 0.11
  groups the operands as a flat tree ``ft_in`` with parts (consts, carry,
  xs), each as long as its number of operands."""
  if 'num_consts' in params:
    return params['num_consts'], params['num_carry']
  consts, carry, _ = params['ft_in'].elts
  return len(consts), len(carry)


def _jaxpr_and_consts(jaxpr) -> tuple[Any, Any]:
  """A ``ClosedJaxpr`` (jax <= 0.10 scan bodies) or an open ``Jaxpr`` (0.11)."""
  return (jaxpr.jaxpr, jaxpr.consts) if hasattr(jaxpr, 'consts') else (jaxpr, ())


def _scan(eqn, invals) -> list:
  p = eqn.params
  n_consts, n_carry = _scan_layout(p)
  consts, carry, xs = (
    invals[:n_consts],
    _materialize_all(invals[n_consts : n_consts + n_carry], 'a scan carry'),
    [_unstack(x) for x in invals[n_consts + n_carry :]],
  )
  body, body_consts = _jaxpr_and_consts(p['jaxpr'])

  def step(carry, x):
    out = evaluate(body, body_consts, [*consts, *carry, *x])
    return out[:n_carry], out[n_carry:]

  carry, ys = jax.lax.scan(
    step, carry, xs, length=p['length'], reverse=p['reverse'], unroll=p['unroll']
  )
  return [*carry, *ys]


def _cond(eqn, invals) -> list:
  index, operands = invals[0], invals[1:]
  branches = [
    (lambda *ops, b=b: evaluate(*_jaxpr_and_consts(b), list(ops)))
    for b in eqn.params['branches']
  ]
  return jax.lax.switch(index, branches, *operands)


def _checkpoint(eqn, invals) -> list:
  inner, consts = _jaxpr_and_consts(eqn.params['jaxpr'])
  call = jax.checkpoint(
    lambda *args: evaluate(inner, consts, list(args)),
    prevent_cse=eqn.params['prevent_cse'],
    policy=eqn.params['policy'],
  )
  return call(*invals)


def _enter(key: str):
  """Evaluates the (closed) jaxpr held in ``eqn.params[key]`` inline."""

  def rule(eqn, invals):
    return evaluate(*_jaxpr_and_consts(eqn.params[key]), invals)

  return rule


_RULES: dict[str, Callable] = {
  'dot_general': lambda eqn, invals: _dot_general(eqn, *invals),
  'convert_element_type': lambda eqn, invals: _convert(eqn, invals[0]),
  'jit': _enter('jaxpr'),
  'pjit': _enter('jaxpr'),
  'closed_call': _enter('call_jaxpr'),
  'custom_jvp_call': _enter('call_jaxpr'),
  'custom_vjp_call': _enter('call_jaxpr'),
  'scan': _scan,
  'cond': _cond,
  'checkpoint': _checkpoint,
  'remat2': _checkpoint,
}


def _bind(eqn, invals) -> list:
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
  return list(out) if eqn.primitive.multiple_results else [out]


def evaluate(jaxpr, consts, args) -> list:
  """Evaluates ``jaxpr`` on ``args``, some of which may be ``Adapted``."""
  env: dict = {}
  read = lambda v: v.val if isinstance(v, jex.core.Literal) else env[v]
  for var, value in zip(jaxpr.constvars, consts, strict=True):
    env[var] = value
  for var, value in zip(jaxpr.invars, args, strict=True):
    env[var] = value
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if not any(_is_adapted(v) for v in invals):
      outvals = _bind(eqn, invals)
    elif eqn.primitive.name in _RULES:
      outvals = _RULES[eqn.primitive.name](eqn, invals)
    else:
      outvals = _bind(eqn, _materialize_all(invals, f'{eqn.primitive.name}'))
    for var, value in zip(eqn.outvars, outvals, strict=True):
      env[var] = value
  return [read(v) for v in jaxpr.outvars]


def _has_factored_form(adapter: Adapter, ndim: int) -> bool:
  """A kernel the method's factored form takes, possibly in ``stacked`` layers:
  2-D, or N-D with more axes than ``matrix_view``'s input axes."""
  while adapter.unstacked is not None:
    adapter, ndim = adapter.unstacked, ndim - 1
  if adapter.factored is None:
    return False
  return ndim == 2 if adapter.kernel_in_axes is None else ndim > adapter.kernel_in_axes


def _split_fast(adapter: Adapter, frozen: Params, theta: AdapterParams):
  """Weight-space params for slow leaves; ``{name: (leaf adapter, θ)}`` for fast."""
  if adapter.plan is None:
    raise PeftError(
      'factored() needs a tree-level adapter from by_rules(...); '
      f'got {adapter.name or "a per-leaf adapter"}'
    )
  chosen = adapter.plan(frozen, theta)
  flat = paths.flatten(frozen)
  fast = {
    name: entry
    for name, entry in chosen.items()
    if _has_factored_form(entry[0], np.ndim(flat[name]))
  }

  def weight_space(name, w):
    if name in fast or name not in chosen:
      return w
    leaf_adapter, leaf_theta = chosen[name]
    return leaf_adapter.apply(w, leaf_theta)

  return paths.map_named(weight_space, frozen), fast


def factored(adapter: Adapter, fn: Callable[..., Any]) -> Callable[..., Any]:
  """Transforms ``fn(params, *args)`` into ``g(frozen, theta, *args)``.

  ``g(frozen, θ, *args) == fn(adapter.apply(frozen, θ), *args)`` (up to
  float rounding), with every ``x @ w'`` of an adapted 2-D kernel computed by
  the method's factored form. Jit, grad and vmap compose with ``g``.

  Args:
    adapter: a tree-level adapter from ``by_rules``.
    fn: a function whose first argument is the full parameter tree (a Linen
      params dict or an NNX state), e.g.
      ``lambda p, x: model.apply({'params': p}, x)``.

  Returns:
    ``g(frozen, theta, *args)``.
  """

  def g(frozen: Params, theta: AdapterParams, *args):
    params, fast = _split_fast(adapter, frozen, theta)
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(params, *args)
    names = jax.tree.leaves(paths.map_named(lambda name, w: name, params))
    param_leaves = [
      Adapted(leaf, fast[name][1], fast[name][0], name) if name in fast else leaf
      for name, leaf in zip(names, jax.tree.leaves(params), strict=True)
    ]
    out = evaluate(closed.jaxpr, closed.consts, param_leaves + jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(out_shape), out)

  return g
