"""Core types of peft_jax: an adapter is a NamedTuple of pure functions.

Conventions (used by every method):

* A *leaf* is one array of a frozen parameter pytree, named by its key path
  joined with ``/`` (``encoder/layer_3/attention/query/kernel``).
* Linear kernels use the Flax layout ``w: (d_in, d_out)``, so a layer computes
  ``y = x @ w + b`` with ``x: (..., d_in)``. The method specs in
  ``shared/spec`` use the PyTorch layout ``W = wᵀ: (d_out, d_in)``; every
  method docstring states its formula in the Flax layout.
* ``theta`` is the pytree of trainable parameters of one leaf (per-leaf
  adapter) or of a whole tree (tree-level adapter, see ``by_rules``).
* Non-trainable per-leaf state that ``apply`` needs (SVD bases, initial
  factors, masks) lives under the key ``'buffers'`` of a leaf's ``theta``
  dict: it is checkpointed and passed to ``apply``, but the train step never
  updates it and ``count`` does not count it (see ``BUFFERS``). Buffers must
  be floating point (the step differentiates the whole ``theta`` and zeroes
  the buffers' gradients); store integer data such as permutations as floats.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

Array = jax.Array
BUFFERS = 'buffers'  # The theta key of non-trainable per-leaf state.
Params = Any  # A pytree of arrays: frozen weights, or a perturbed copy.
AdapterParams = Any  # A pytree of trainable arrays (theta).
Shape = tuple[int, ...]

InitFn = Callable[[Array, Array], AdapterParams]  # (key, w) -> theta
ApplyFn = Callable[[Array, AdapterParams], Array]  # (w, theta) -> w'
FactoredFn = Callable[[Array, Array, AdapterParams], Array]  # (x, w, theta) -> y
UnapplyFn = Callable[[Array, AdapterParams], Array]  # (w', theta) -> w
RegularizerFn = Callable[[Array, AdapterParams], Array]  # (w, theta) -> scalar
NumParamsFn = Callable[[Shape], int]  # shape of w -> trainable count
# Tree-level adapters: (frozen, theta) -> {leaf name: (leaf adapter, leaf theta)}.
PlanFn = Callable[[Any, Any], dict[str, tuple['Adapter', Any]]]


class Adapter(NamedTuple):
  """A parameter-efficient fine-tuning method as pure functions (optax-style).

  A method is a factory closing over its hyper-parameters that returns an
  ``Adapter``, e.g. ``lora(rank=8, alpha=16)``. Two fields are required; the
  others are optional capabilities, ``None`` where a method lacks them.

  Attributes:
    init: ``(key, w) -> theta``. The trainable parameters for frozen leaf
      ``w``. Methods whose init needs the pretrained weight (SVD-based ones)
      compute it here, once.
    apply: ``(w, theta) -> w'``. The method's definition in weight space;
      ``w'`` has the shape and dtype of ``w``. Merging uses it.
    factored: ``(x, w, theta) -> y`` with ``x: (..., d_in)``, 2-D
      ``w: (d_in, d_out)`` and ``y: (..., d_out)``, equal to
      ``x @ apply(w, theta)`` but computed without forming ``w'`` (and so,
      under ``jax.grad``, without a ``(d_in, d_out)`` weight gradient).
    unapply: ``(w', theta) -> w``, the inverse of ``apply`` (unmerge).
    regularizer: ``(w, theta) -> scalar`` added to the training loss.
    num_params: ``shape -> int``, the trainable-parameter count formula of
      the method for a leaf of that shape (tests check it against ``init``).
    factors: ``theta -> (down, up)``, the method's low-rank factors in the
      Flax layout, ``down: (d_in, r)`` and ``up: (r, d_out)`` (LoRA's ``a`` and
      ``b``); matrix-pattern regularisers (MPC) act on them.
    mergeable: whether ``apply`` folds the method into plain weights with no
      inference overhead.
    name: the canonical spec string, e.g. ``'lora(rank=8, alpha=16)'``, set by
      the registry (``''`` for hand-built adapters).
    kernel_in_axes: set by ``matrix_view(method, n_in)``: ``factored`` takes
      an N-D kernel whose leading ``n_in`` axes are its input (``None``: a 2-D
      kernel, one input axis).
    unstacked: set by ``stacked(method)``: the per-slice adapter this one
      vmaps over a leading layer axis (the factored path unstacks it inside
      a scan over layers).
    plan: tree-level adapters only (``by_rules``): ``(frozen, theta) ->
      {leaf name: (leaf adapter, leaf theta)}`` for the adapted leaves,
      after checking that ``theta`` fits ``frozen``. The factored path uses it.
  """

  init: InitFn
  apply: ApplyFn
  factored: FactoredFn | None = None
  unapply: UnapplyFn | None = None
  regularizer: RegularizerFn | None = None
  num_params: NumParamsFn | None = None
  factors: Callable[[AdapterParams], tuple[Array, Array]] | None = None
  mergeable: bool = True
  name: str = ''
  kernel_in_axes: int | None = None
  unstacked: 'Adapter | None' = None
  plan: PlanFn | None = None


class PeftError(ValueError):
  """Bad input to peft_jax: a one-line message naming the value and the fix."""


class Schedule(NamedTuple):
  """A state update run between training steps, inside the jitted step.

  Methods whose structure changes during training (the AdaLoRA budget,
  LoRA-Dash's phase switch, FlexLoRA's prune/grow) pair their adapter with a
  schedule. ``make_train_step(..., schedule=s)`` calls ``s.update`` after
  every optimizer update; its state lives in ``TrainState.schedule_state``
  and is checkpointed with the rest of the state. Use ``jax.lax.cond`` (not
  Python ``if``) for periodic events so the step compiles once.

  Attributes:
    init: ``(frozen, theta) -> state``.
    update: ``(state, frozen, theta, grads, opt_state, step) -> (theta,
      opt_state, state)``; ``step`` is the number of optimizer updates done so
      far (1 after the first), ``grads`` the gradients of that update. It may
      rewrite ``theta`` (e.g. mask AdaLoRA's ``e``) and reset optimizer
      moments of re-initialised entries.
  """

  init: Callable[[Any, AdapterParams], Any]
  update: Callable[..., tuple[AdapterParams, Any, Any]]
