"""Running a model with its adapters: ``adapted(adapter, fn, factored=...)``.

``adapted(adapter, fn)`` turns ``fn(weights, *args)`` — any JAX function of a
weight tree: a Linen ``model.apply``, a whole loss — into
``g(frozen, params, buffers, *args)``: ``fn`` run on ``adapter.apply(frozen,
params, buffers)`` with every activation adapter installed at its hook point
(``peft_jax.hook_point``).

With ``factored=True``, every matmul that consumes an adapted kernel runs the
method's factored form (``Adapter.linear``), e.g. LoRA's
``x @ w + s·(x @ a) @ b``: the weight ``w' = f(w, θ)`` is never formed, and
under ``jax.grad`` neither is the ``(d_in, d_out)`` weight gradient, so a
LoRA step costs about 4N FLOPs per token instead of 6N. Methods with no
weight-space form (``parallel_adapter``) always run this way.

Mechanism: ``fn`` is traced to a jaxpr and re-evaluated by a small
interpreter in which each such kernel is an ``Adapted(w, θ)`` value.

* ``dot_general`` with an ``Adapted`` kernel contracted on its leading input
  axes (``x @ w``, the form of ``nn.Dense``, ``nn.Einsum('...i,ij->...j')``,
  ``nnx.Linear``, with ``w`` on either operand side; ``nn.DenseGeneral``
  kernels through ``matrix_view``) runs the factored form.
* ``convert_element_type`` of the kernel (a model ``dtype`` of bf16 over f32
  params) keeps the kernel factored.
* ``jit``, ``custom_jvp``/``custom_vjp`` calls and ``checkpoint`` (remat,
  kept as remat) are entered; ``scan`` and ``cond`` are entered with
  ``Adapted`` values in their operands, so kernels stacked for ``nn.scan`` or
  ``lax.scan`` over layers stay factored when their method is
  ``stacked(method)`` (adapter parameters stacked the same way; the scan
  slices kernel and parameters together). A ``while`` loop is entered with
  ``Adapted`` kernels among the values its body closes over, so a decoding
  loop (``llama.generate``) runs factored at every step.
* A quantized frozen kernel (``QuantizedArray``, ``peft_jax.quantize``) is
  an ``Adapted`` value with ``adapter=None``: a ``dot_general`` with it is
  ``quantization.dequantized_linear`` (``w`` formed at that use, formed
  again in the backward pass rather than kept); any other use (a gather, a
  transpose) dequantizes it there under ``quantization.recomputed`` (not a
  fallback: no warning). An adapted quantized kernel runs its method's
  factored form interpreted the same way, so LoRA's ``x @ w`` inside it is
  a dequantized matmul too.
* Any other use of an adapted kernel — ``x @ wᵀ`` (tied embeddings), a
  gather, a reshape, a loop carry — falls back to the weight-space form
  ``w' = apply(w, θ)`` at that use, with a ``FactoredFallbackWarning`` naming
  the leaf and the primitive. Methods without a factored form, and leaves
  whose shape it does not take, are applied in weight space up front.
"""

import contextvars
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from peft_jax._src import hooks, paths, quantization
from peft_jax._src.base import Adapter, Entry, Params, PeftError, TreeAdapter
from peft_jax._src.quantized_array import is_quantized
from peft_jax._src.tree import with_name


class FactoredFallbackWarning(UserWarning):
  """An adapted kernel had to be materialised on the factored path."""


@jax.tree_util.register_pytree_node_class
class Adapted:
  """A frozen kernel with its adapter parameters, standing in for ``w'``;
  or, with ``adapter=None``, a quantized kernel standing in for ``w``.

  A pytree (children ``w``, ``params``, ``buffers``), so ``scan`` slices
  stacked ones and ``checkpoint``/``cond`` pass them through.
  """

  def __init__(self, w, params, buffers, adapter: Adapter | None, name: str):
    self.w, self.params, self.buffers = w, params, buffers
    self.adapter, self.name = adapter, name

  def tree_flatten(self):
    return (self.w, self.params, self.buffers), (self.adapter, self.name)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  def materialize(self, reason: str) -> jax.Array:
    w = quantization.values(self.w)
    if self.adapter is None:
      return w
    if self.adapter.apply is None:
      raise PeftError(
        f'{self.name}: {self.adapter.name or "its method"} has no weight-space '
        f'form, and the kernel is used by {reason}, not by x @ w'
      )
    warnings.warn(
      f'factored path: {self.name} is used by {reason}; computing it in weight '
      "space (w' = apply(w, params, buffers)) there",
      FactoredFallbackWarning,
      stacklevel=2,
    )
    return self.adapter.apply(w, self.params, self.buffers)

  def replace(self, **changes) -> 'Adapted':
    fields = dict(
      w=self.w, params=self.params, buffers=self.buffers, adapter=self.adapter
    )
    return Adapted(**{**fields, **changes}, name=self.name)


def _is_adapted(x: Any) -> bool:
  return isinstance(x, Adapted)


def _materialize_all(values: list, reason: str) -> list:
  return [v.materialize(reason) if _is_adapted(v) else v for v in values]


def _bind_materialized(eqn, invals: list, reason: str) -> list:
  """``eqn`` on its operands with every ``Adapted`` one materialised; where
  one is quantized, under ``quantization.recomputed`` (not kept for the
  backward pass)."""
  run = lambda *vals: _bind(eqn, _materialize_all(list(vals), reason))
  if any(_is_adapted(v) and is_quantized(v.w) for v in invals):
    run = quantization.recomputed(run)
  return run(*invals)


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


# While ``adapted`` interprets a function, per JAX trace (``_own_inputs``):
# ``{(id(x), x_axes, token_wise): (x, x as the factored form sees it)}``, so
# that projections sharing an input (q/k/v; gate/up) share its moved and
# flattened form too. Each projection making its own would be a distinct
# value to JAX, and a scan over layers would keep one copy per projection
# for the backward pass (``∂a = xᵀ (g bᵀ)``): three more ``(tokens, d)``
# stacks per Llama layer. ``x`` is held so that its ``id`` is not reused
# while the entry lives.
_INPUTS: contextvars.ContextVar[dict] = contextvars.ContextVar('_INPUTS')


def _own_inputs(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` run with its own, empty ``_INPUTS``: a function that JAX traces
  apart (the interpreted function, a scan or while body, a cond branch, a
  checkpointed region) leaves none of its tracers behind when it returns."""

  def run(*args):
    token = _INPUTS.set({})
    try:
      return fn(*args)
    finally:
      _INPUTS.reset(token)

  return run


def _factored_input(x, x_axes, token_wise: bool):
  """``x`` with its ``x_axes`` moved last and, for a ``token_wise`` form, its
  other axes flattened into one token axis; the same value for the same
  ``x`` within one trace (``_INPUTS``)."""
  inputs, key = _INPUTS.get(), (id(x), tuple(x_axes), token_wise)
  if key not in inputs:
    n_in = len(x_axes)
    moved = jnp.moveaxis(x, x_axes, tuple(range(x.ndim - n_in, x.ndim)))
    if token_wise:
      moved = moved.reshape(-1, *moved.shape[x.ndim - n_in :])
    inputs[key] = (x, moved)
  return inputs[key][1]


def _factored_dot(x, kernel: Adapted, x_axes, kernel_first: bool, out_dtype):
  """``x`` contracted on ``x_axes`` with ``w'``, in dot_general's output order.

  A ``token_wise`` factored form sees ``x`` as ``(tokens, *in_axes)``, its
  leading axes flattened into one, so that the backward pass contracts over
  one axis (LoRA's ``∂b = (x a)ᵀ g``): over (batch, seq), XLA:CPU first
  transposed the whole output gradient ``g`` for every such dot (19% of the
  small-Llama LoRA step's op time in a CPU profile:
  benchmarks/results/cpu_profile_small.md).
  """
  n_in = len(x_axes)
  token_wise = kernel.adapter.linear.token_wise
  y = _run_factored(_factored_input(x, x_axes, token_wise), kernel)
  if token_wise:
    leading = [d for axis, d in enumerate(x.shape) if axis not in x_axes]
    y = y.reshape(*leading, *y.shape[1:])
  if kernel_first:  # dot_general(w, x): output (*w_free, *x_free).
    n_out = np.ndim(kernel.w) - n_in
    y = jnp.moveaxis(y, tuple(range(y.ndim - n_out, y.ndim)), tuple(range(n_out)))
  return y if out_dtype is None else y.astype(out_dtype)


def _run_factored(x, kernel: Adapted):
  """The method's factored form on ``x`` (input axes last). A quantized ``w``
  enters it as a plain quantized kernel, interpreted: its ``x @ w`` is
  ``quantization.dequantized_linear``, any other use is dequantized there."""
  factored = kernel.adapter.linear.factored
  if not is_quantized(kernel.w):
    return factored(x, kernel.w, kernel.params, kernel.buffers)
  run = lambda w, x, params, buffers: factored(x, w, params, buffers)
  traced = _as_traced(kernel.name, kernel.w)
  plain = Adapted(kernel.w, None, None, None, kernel.name)
  return _interpreted(run, traced, plain, x, kernel.params, kernel.buffers)


def _interpreted(fn: Callable[..., Any], traced, value, *args) -> Any:
  """``fn(weights, *args)`` traced with ``traced`` (arrays or shape structs)
  standing for ``weights`` and evaluated with ``value`` (a tree of the same
  leaves, some ``Adapted``) in their place."""
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(traced, *args)
  leaves = jax.tree.leaves(value, is_leaf=_is_adapted) + jax.tree.leaves(args)
  out = evaluate(closed.jaxpr, closed.consts, leaves)
  return jax.tree.unflatten(jax.tree.structure(out_shape), out)


def _quantized_dot(eqn, lhs, rhs) -> list | None:
  """A ``dot_general`` of a plain quantized kernel with an array, as
  ``quantization.dequantized_linear``; ``None`` for other operands."""
  for x, kernel, kernel_first in ((lhs, rhs, False), (rhs, lhs, True)):
    if _is_adapted(kernel) and kernel.adapter is None and not _is_adapted(x):
      order = (lambda x, w: [w, x]) if kernel_first else (lambda x, w: [x, w])
      fn = lambda x, w, order=order: _bind(eqn, order(x, w))[0]
      return [quantization.dequantized_linear(fn, x, kernel.w)]
  return None


def _dot_general(eqn, lhs, rhs) -> list:
  """Factored ``x @ w'`` where possible; weight space otherwise."""
  dot = _parse_dot(eqn.params)
  for x, kernel, kernel_first in ((lhs, rhs, False), (rhs, lhs, True)):
    x_contract = dot.rhs_contract if kernel_first else dot.lhs_contract
    w_contract = dot.lhs_contract if kernel_first else dot.rhs_contract
    if (
      _is_adapted(kernel)
      and kernel.adapter is not None
      and not _is_adapted(x)
      and not dot.batch
      and w_contract == tuple(range(kernel.adapter.linear.in_axes))
      and np.ndim(kernel.w) > len(w_contract)
    ):
      return [_factored_dot(x, kernel, x_contract, kernel_first, dot.out_dtype)]
  quantized = _quantized_dot(eqn, lhs, rhs)
  if quantized is not None:
    return quantized
  return _bind_materialized(eqn, [lhs, rhs], 'a dot_general that is not x @ w')


def _on_kernel(eqn, value) -> list:
  """An elementwise primitive of the frozen kernel alone (a dtype cast;
  ``pvary``, which shard_map's ``check_vma`` inserts where a replicated
  kernel meets sharded activations): applied to ``w``, ``θ`` kept. The
  factored matmul then meets the sharded ``x`` as the original did (JAX
  inserts the ``pvary`` of ``θ`` itself). A quantized ``w`` is cast by its
  dequantized dtype, and ``pvary`` applies to its codes and scales."""
  w = value.w
  if not is_quantized(w):
    w = eqn.primitive.bind(w, **eqn.params)
  elif eqn.primitive.name == 'convert_element_type':
    w = w.astype(eqn.params['new_dtype'])
  else:
    w = jax.tree.map(lambda part: eqn.primitive.bind(part, **eqn.params), w)
  return [value.replace(w=w)]


def _unstack(x):
  """A stacked ``Adapted`` scanned over: its slices use the per-layer method."""
  if not _is_adapted(x) or x.adapter is None:
    return x
  if x.adapter.linear.per_layer is None:
    return x.materialize('a scan over its leading axis (not a stacked(...) method)')
  return x.replace(adapter=x.adapter.linear.per_layer)


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

  @_own_inputs
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
    _own_inputs(lambda *ops, b=b: evaluate(*_jaxpr_and_consts(b), list(ops)))
    for b in eqn.params['branches']
  ]
  return jax.lax.switch(index, branches, *operands)


def _while(eqn, invals) -> list:
  """``while_loop`` with ``Adapted`` kernels among the consts its condition
  and body close over (a decoding loop's weights): both are interpreted, so
  the body's ``x @ w'`` stays factored; carries are materialised."""
  p = eqn.params
  n_cond, n_body = p['cond_nconsts'], p['body_nconsts']
  cond_consts, body_consts = invals[:n_cond], invals[n_cond : n_cond + n_body]
  carry = _materialize_all(invals[n_cond + n_body :], 'a while_loop carry')
  cond_jaxpr, cond_inner = _jaxpr_and_consts(p['cond_jaxpr'])
  body_jaxpr, body_inner = _jaxpr_and_consts(p['body_jaxpr'])
  cond = _own_inputs(lambda c: evaluate(cond_jaxpr, cond_inner, [*cond_consts, *c])[0])
  body = _own_inputs(lambda c: evaluate(body_jaxpr, body_inner, [*body_consts, *c]))
  return jax.lax.while_loop(cond, body, carry)


def _checkpoint(eqn, invals) -> list:
  inner, consts = _jaxpr_and_consts(eqn.params['jaxpr'])
  call = jax.checkpoint(
    _own_inputs(lambda *args: evaluate(inner, consts, list(args))),
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
  'convert_element_type': lambda eqn, invals: _on_kernel(eqn, invals[0]),
  'pvary': lambda eqn, invals: _on_kernel(eqn, invals[0]),
  'jit': _enter('jaxpr'),
  'pjit': _enter('jaxpr'),
  'closed_call': _enter('call_jaxpr'),
  'custom_jvp_call': _enter('call_jaxpr'),
  'custom_vjp_call': _enter('call_jaxpr'),
  'scan': _scan,
  'cond': _cond,
  'while': _while,
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
      outvals = _bind_materialized(eqn, invals, eqn.primitive.name)
    for var, value in zip(eqn.outvars, outvals, strict=True):
      env[var] = value
  return [read(v) for v in jaxpr.outvars]


def _has_factored_form(adapter: Adapter, ndim: int) -> bool:
  """Whether the factored path takes this kernel, possibly in ``stacked``
  layers: the method has a factored form and the kernel has output axes
  beyond its input axes (``init`` has checked the rest of the shape)."""
  while adapter.linear is not None and adapter.linear.per_layer is not None:
    adapter, ndim = adapter.linear.per_layer, ndim - 1
  linear = adapter.linear
  return linear is not None and linear.factored is not None and ndim > linear.in_axes


def _split(adapter: TreeAdapter, frozen, params, buffers, factored: bool):
  """The weight tree with weight-space methods applied (and hooks installed),
  and ``{name: Entry}`` of the kernels to run factored."""
  if not isinstance(adapter, TreeAdapter):
    raise PeftError(
      'adapted() needs a tree-level adapter from by_rules(...); got '
      f'{type(adapter).__name__} {getattr(adapter, "name", "")}'.rstrip()
    )
  plan = adapter.plan(frozen, params, buffers)
  flat = paths.flatten(frozen)
  fast: dict[str, Entry] = {}
  for name, entry in plan.weights.items():
    takes = _has_factored_form(entry.adapter, np.ndim(flat[name]))
    if entry.adapter.apply is None and not takes:
      raise PeftError(
        f'{name}: {entry.adapter.name or "its method"} has no weight-space form '
        f'and its factored form does not take a leaf of shape {np.shape(flat[name])}'
      )
    if takes and (factored or entry.adapter.apply is None):
      fast[name] = entry

  def weight_space(name, w):
    if name in fast or name not in plan.weights:
      return w
    e = plan.weights[name]
    return with_name(name, e.adapter.apply, quantization.values(w), e.params, e.buffers)

  weights = paths.map_named(weight_space, frozen)
  return hooks.install(weights, plan.hooks), fast


def _as_traced(name: str, w: Any) -> Any:
  """A quantized leaf as the float array ``fn`` sees (shape and dtype)."""
  return jax.ShapeDtypeStruct(w.shape, w.dtype) if is_quantized(w) else w


def _kernel_value(name: str, w: Any, fast: dict[str, Entry]) -> Any:
  """What the interpreter holds for leaf ``w``: ``Adapted`` when it runs
  factored or is quantized, else ``w``."""
  if name in fast:
    e = fast[name]
    return Adapted(w, e.params, e.buffers, e.adapter, name)
  return Adapted(w, None, None, None, name) if is_quantized(w) else w


def adapted(
  adapter: TreeAdapter, fn: Callable[..., Any], *, factored: bool = False
) -> Callable[..., Any]:
  """Transforms ``fn(weights, *args)`` into ``g(frozen, params, buffers, *args)``.

  ``g`` runs ``fn`` on the adapted weights with activation adapters at their
  hook points. ``factored=True`` computes every ``x @ w'`` of an adapted
  kernel by the method's factored form (same result up to float rounding).
  Quantized frozen leaves (``peft_jax.quantize``) are dequantized at each
  use and recomputed, not kept, for the backward pass.
  Jit, grad and vmap compose with ``g``.

  Args:
    adapter: a tree-level adapter from ``by_rules``.
    fn: a function whose first argument is the full weight tree (a Linen
      params dict or an NNX state), e.g.
      ``lambda w, x: model.apply({'params': w}, x)``.
    factored: use the factored forms of linear layers.

  Returns:
    ``g(frozen, params, buffers, *args)``.
  """

  def g(frozen: Params, params, buffers, *args):
    weights, fast = _split(adapter, frozen, params, buffers, factored)
    leaves = jax.tree.leaves(weights, is_leaf=is_quantized)
    if not fast and not any(map(is_quantized, leaves)):
      return fn(weights, *args)
    traced = paths.map_named(_as_traced, weights)
    names = jax.tree.leaves(paths.map_named(lambda name, w: name, weights))
    weight_leaves = [
      _kernel_value(name, leaf, fast) for name, leaf in zip(names, leaves, strict=True)
    ]
    return _own_inputs(_interpreted)(fn, traced, weight_leaves, *args)

  return g
