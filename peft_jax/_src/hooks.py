"""Hook points: where activation-side methods act inside a model.

Weight-space methods need nothing from a model. Methods that act on
activations — prompt and prefix tuning, bottleneck adapters, (IA)³ on
activations — need the model to expose named points where a value can be
read and replaced. The protocol is one call:

  x = peft_jax.hook_point(self, 'ffn_output', x)

inside a Linen module's ``__call__`` (``self`` gives the module path). With no
handler active it returns ``x`` unchanged and adds nothing to the traced
computation. ``with peft_jax.hook_handler(fn): ...`` makes every hook point
traced inside the block call ``fn(name, x)`` and use its result, where
``name`` is the module path joined with ``/`` plus the point
(``bert/encoder/layer_3/ffn_output``). Handlers run at trace time, so they
compose with ``jit`` and ``grad``: a handler closing over traced adapter
parameters is differentiated like any other code.

Standard points (the shipped models document theirs):

* ``input_embeddings``: ``(embeddings (b, s, d), attention_mask (b, s))``;
  prompt tuning returns both with a prompt prepended.
* ``attention_kv``: the keys and values of one attention layer, for prefix
  tuning to prepend to. The value's form is the model's: BERT and DeBERTa
  pass ``(keys (b, s, h, d_h), values (b, s, h, d_h), mask_bias (b, 1, 1,
  s))`` (prepend to all three); the Llama decoder passes ``(keys, values)``
  after RoPE, ``(b, s, kv_heads, d_h)``, and makes prepended keys visible to
  every query itself.
* ``attention_output`` / ``ffn_output``: the sub-layer output ``(b, s, d)``
  before the residual; bottleneck (Houlsby/Pfeiffer/parallel) adapters.
* ``ffn_intermediate``: the activation after the FFN non-linearity
  ``(b, s, d_ff)``; (IA)³'s ``l_ff``.

Limit: inside ``nn.scan`` over layers every layer has the same module path,
so a handler sees one name for all layers.
"""

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

HookFn = Callable[[str, Any], Any]

_HANDLER: contextvars.ContextVar[HookFn | None] = contextvars.ContextVar(
  'peft_jax_hook_handler', default=None
)


def hook_point(module: Any, point: str, value: Any) -> Any:
  """Returns ``value``, or what the active handler makes of it.

  Args:
    module: the calling Linen module (for its path), or a path string.
    point: the point's name within the module, e.g. ``'ffn_output'``.
    value: the activation (or tuple of activations) at this point.
  """
  handler = _HANDLER.get()
  if handler is None:
    return value
  prefix = module if isinstance(module, str) else '/'.join(map(str, module.path))
  return handler(f'{prefix}/{point}' if prefix else point, value)


@contextlib.contextmanager
def hook_handler(fn: HookFn) -> Iterator[None]:
  """Makes hook points traced inside the block call ``fn(name, value)``."""
  token = _HANDLER.set(fn)
  try:
    yield
  finally:
    _HANDLER.reset(token)
