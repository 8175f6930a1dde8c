"""Core types of peft_jax: adapters are NamedTuples of pure functions.

Conventions (used by every method):

* A *leaf* is one array of a frozen parameter pytree, named by its key path
  joined with ``/`` (``encoder/layer_3/attention/query/kernel``). A *hook
  point* is a named place inside a model where an activation can be read and
  replaced (``encoder/layer_3/ffn_output``; see ``peft_jax.hook_point``).
* Linear kernels use the Flax layout ``w: (d_in, d_out)``, so a layer computes
  ``y = x @ w + b`` with ``x: (..., d_in)``. The method specs in
  ``shared/spec`` use the PyTorch layout ``W = wᵀ: (d_out, d_in)``; every
  method docstring states its formula in the Flax layout.
* An adapter's ``init`` returns two pytrees, apart by structure:
  ``params``, the trainable parameters (a typed NamedTuple per method, e.g.
  ``LoraParams(a, b)``), and ``buffers``, non-trainable state of any dtype
  (SVD bases, masks, permutations; ``None`` when there is none). Gradients,
  optimizers and ``count`` see only ``params``; ``buffers`` are checkpointed
  and passed to ``apply``.

Three adapter types, one per level:

* ``Adapter``: a weight-space method on one leaf, ``w' = apply(w, θ)``.
* ``ActivationAdapter``: an activation-side method at one hook point,
  ``h' = apply(h, θ)``.
* ``TreeAdapter``: both lifted to a whole model by rules (``by_rules``).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

Array = jax.Array
Params = Any  # A pytree of arrays: frozen weights, or a perturbed copy.
AdapterParams = Any  # Trainable parameters (a typed NamedTuple, or a tree of them).
Buffers = Any  # Non-trainable adapter state, any dtype (or None).
Shape = tuple[int, ...]

LeafInitFn = Callable[[Array, Array], tuple[AdapterParams, Buffers]]
LeafApplyFn = Callable[[Array, AdapterParams, Buffers], Array]
# (x, w, params, buffers) -> y, for x: (..., *w.shape[:in_axes]).
FactoredFn = Callable[[Array, Array, AdapterParams, Buffers], Array]
# (w, params, buffers) -> an array of penalty terms (one per matrix).
RegularizerFn = Callable[[Array, AdapterParams, Buffers], Array]


class PeftError(ValueError):
  """Bad input to peft_jax: a one-line message naming the value and the fix."""


class Linear(NamedTuple):
  """How an adapted kernel acts inside ``x @ w'``: the factored path's capability.

  Wrappers forward it whole (``mpc``) or transform it whole (``stacked``,
  ``matrix_view``).

  Attributes:
    factored: ``(x, w, params, buffers) -> y``, equal to ``x`` contracted with
      the leading ``in_axes`` axes of ``w' = apply(w, ...)``, computed without
      forming ``w'`` (so, under ``jax.grad``, without a weight-sized
      gradient). ``x: (..., *w.shape[:in_axes])``, ``y: (...,
      *w.shape[in_axes:])``. ``None`` for a stacked kernel, which is only
      used a layer at a time (see ``per_layer``).
    in_axes: how many leading kernel axes are its input (1 for ``nn.Dense``).
    per_layer: set by ``stacked(method)``: the adapter of one slice along
      the leading layer axis; the factored path unstacks the kernel inside a
      scan over layers and uses this adapter's ``linear`` there.
    token_wise: each row of ``x`` maps to its row of ``y`` alone (every
      method but those that pool over a sequence axis, like ``gated_lora``'s
      gate); the factored path then runs ``factored`` on ``x``'s leading
      axes flattened into one, which spares XLA:CPU a transpose of the
      output gradient in the backward pass.
  """

  factored: FactoredFn | None
  in_axes: int = 1
  per_layer: 'Adapter | None' = None
  token_wise: bool = True


class Adapter(NamedTuple):
  """A weight-space method on one leaf, as pure functions (optax-style).

  A method is a factory closing over its hyper-parameters that returns an
  ``Adapter``, e.g. ``lora(rank=8, alpha=16)``. ``init`` is required; the
  other fields are capabilities, ``None`` where a method lacks them.

  Attributes:
    init: ``(key, w) -> (params, buffers)`` for frozen leaf ``w``. Methods
      whose init needs the pretrained weight (SVD-based ones) compute it
      here, once.
    apply: ``(w, params, buffers) -> w'``, the method's definition in weight
      space; ``w'`` has the shape and dtype of ``w``. ``merge`` uses it.
      ``None`` for methods with no weight-space form (a nonlinear branch
      beside a linear layer), which run only through ``linear``.
    unapply: ``(w', params, buffers) -> w``, the inverse of ``apply``.
    linear: the factored form for linear layers (``Linear``).
    regularizer: ``(w, params, buffers) -> terms``, an array of penalty terms
      (shape ``()``, or one per layer for ``stacked``) that the tree adds to
      the loss, summed or averaged (``by_rules(..., regularizer=)``).
    num_params: ``shape -> int``, the trainable-parameter count of the method
      for a leaf of that shape (tests check it against ``init``).
    factors: ``(params, buffers) -> (down, up)``, the effective low-rank
      factors in the Flax layout (masks applied),
      ``down: (..., d_in, r)``, ``up: (..., r, d_out)`` (LoRA's ``a``, ``b``);
      matrix-pattern regularisers (``mpc``) act on them.
    name: the canonical spec string, e.g. ``'lora(rank=8, alpha=16.0, ...)'``,
      set by the registry (``''`` for hand-built adapters).
  """

  init: LeafInitFn
  apply: LeafApplyFn | None = None
  unapply: LeafApplyFn | None = None
  linear: Linear | None = None
  regularizer: RegularizerFn | None = None
  num_params: Callable[[Shape], int] | None = None
  factors: Callable[[AdapterParams, Buffers], tuple[Array, Array]] | None = None
  name: str = ''

  @property
  def mergeable(self) -> bool:
    """Whether ``apply`` folds the method into plain weights."""
    return self.apply is not None


class Shared(NamedTuple):
  """Parameters that every hook point of one rule shares (one copy in θ).

  Prefix tuning's reparametrisation MLP and Compacter's PHM rule matrices
  are shared across layers. ``by_rules`` keeps one copy per rule at
  ``params['@shared'][<method name>]`` and, each time the model runs,
  hands every point ``derive(shared, own)`` as its parameters, computed
  outside any ``nn.scan``, so gradients from all layers reach the one copy.

  Attributes:
    init: ``(key, value) -> shared params``, from one point's value (every
      point of the rule must show the same shapes).
    derive: ``(shared, own) -> params`` that ``ActivationAdapter.apply``
      receives; ``own`` (what ``ActivationAdapter.init`` made) may carry
      leading layer axes (``nn.scan``), which ``derive`` must broadcast over.
    num_params: ``value -> int``, the trainable count of ``init``'s result.
  """

  init: Callable[[Array, Any], AdapterParams]
  derive: Callable[[AdapterParams, AdapterParams], AdapterParams]
  num_params: Callable[[Any], int] | None = None


class ActivationAdapter(NamedTuple):
  """An activation-side method at one hook point, as pure functions.

  ``value`` is what the model passes to its hook point: an array or a tuple
  of arrays (e.g. ``(embeddings (b, s, d), mask (b, s))``), seen one layer
  at a time under ``nn.scan`` (``by_rules`` stacks the parameters of such
  points and Flax's scan slices them).

  Attributes:
    init: ``(key, value) -> (params, buffers)``; ``value`` holds
      ``jax.ShapeDtypeStruct``s of one call (batch and sequence sizes are
      those of the example inputs: use only feature sizes).
    apply: ``(value, params, buffers) -> value'``; may change sequence
      lengths (prompts) where the model's hook point allows it. With
      ``shared``, ``params`` is ``shared.derive(shared params, own params)``.
    num_params: ``value -> int``, the trainable count of one point's own
      parameters for that value.
    name: the canonical spec string, set by the registry.
    shared: parameters shared by all points of a rule, or None.
  """

  init: Callable[[Array, Any], tuple[AdapterParams, Buffers]]
  apply: Callable[[Any, AdapterParams, Buffers], Any]
  num_params: Callable[[Any], int] | None = None
  name: str = ''
  shared: Shared | None = None


class TreeAdapter(NamedTuple):
  """Adapters lifted to a whole model by rules (built by ``by_rules``).

  ``params`` and ``buffers`` are *sparse* nested dicts keyed like the frozen
  tree (and, for activation adapters, by hook-point name), holding only the
  adapted entries.

  Attributes:
    init: ``(key, frozen, hooks=None) -> (params, buffers)``; ``hooks`` are
      the model's hook points (``peft_jax.hook_points``), needed when rules
      select activation adapters.
    apply: ``(frozen, params, buffers) -> weights``, the full weight tree with
      every weight-space method applied (activation adapters act only when
      the model runs: see ``peft_jax.adapted``).
    unapply: ``(weights, params, buffers) -> frozen`` where every chosen
      method is invertible, else ``None``.
    regularizer: ``(frozen, params, buffers) -> scalar`` where some chosen
      method has one, else ``None``.
    plan: ``(frozen, params, buffers) -> Plan``, the adapted leaves and hook
      points with their adapters and parameters, after checking that
      ``params``/``buffers`` fit ``frozen``.
    mergeable: every chosen method has a weight-space form and no rule
      selects an activation adapter.
    name: ``by_rules([...])`` with the canonical spec strings.
  """

  init: Callable[..., tuple[AdapterParams, Buffers]]
  apply: Callable[[Params, AdapterParams, Buffers], Params]
  unapply: Callable[[Params, AdapterParams, Buffers], Params] | None
  regularizer: Callable[[Params, AdapterParams, Buffers], Array] | None
  plan: Callable[[Params, AdapterParams, Buffers], 'Plan']
  mergeable: bool
  name: str


class Entry(NamedTuple):
  """One adapted leaf or hook point: its adapter, parameters and buffers."""

  adapter: Adapter | ActivationAdapter
  params: AdapterParams
  buffers: Buffers


class Plan(NamedTuple):
  """What a ``TreeAdapter`` does to one frozen tree, by name (tree order)."""

  weights: dict[str, Entry]
  hooks: dict[str, Entry]


class Schedule(NamedTuple):
  """A state update run between training steps, inside the jitted step.

  Methods whose structure changes during training (the AdaLoRA budget,
  LoRA-Dash's phase switch, FlexLoRA's prune/grow) pair their adapter with a
  schedule, which lives beside the method and finds the leaves it governs by
  the type of their parameters. ``make_train_step(..., schedule=s)`` calls
  ``s.update`` after every optimizer update; its state lives in
  ``TrainState.schedule_state`` and is checkpointed with the rest. Periodic
  events use ``jax.lax.cond`` (not Python ``if``) so the step compiles once.

  Attributes:
    init: ``(frozen, params, buffers) -> state``.
    update: ``(state, frozen, params, buffers, grads, opt_state, step) ->
      (params, buffers, opt_state, state)``; ``step`` is the number of
      optimizer updates done (1 after the first), ``grads`` the gradients of
      that update. It may rewrite parameters (mask AdaLoRA's ``e``), buffers
      (store LoRA-Dash's directions) and optimizer moments of re-initialised
      entries.
  """

  init: Callable[[Params, AdapterParams, Buffers], Any]
  update: Callable[..., tuple[AdapterParams, Buffers, Any, Any]]
