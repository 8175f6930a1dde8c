"""peft_jax: parameter-efficient fine-tuning as pure functions over pytrees.

Every method is a factory returning an ``Adapter(init, apply, ...)``;
``by_rules`` chooses the leaves it perturbs; ``make_train_step`` trains the
adapter parameters with optax. See README.md.
"""

from peft_jax import methods as methods  # registers every method
from peft_jax._src.base import (
  BUFFERS,
  Adapter,
  AdapterParams,
  Params,
  PeftError,
  Schedule,
)
from peft_jax._src.checkpoint import (
  checkpoint_manager,
  load_adapter,
  restore_checkpoint,
  save_adapter,
  save_checkpoint,
)
from peft_jax._src.factored import FactoredFallbackWarning, factored
from peft_jax._src.hooks import hook_handler, hook_point
from peft_jax._src.registry import get, names, register
from peft_jax._src.rules import Rule
from peft_jax._src.step import TrainState, make_train_step
from peft_jax._src.tree import (
  by_rules,
  count,
  describe,
  merge,
  trainable_mask,
  unmerge,
)
from peft_jax.methods.bitfit import bitfit, is_bias
from peft_jax.methods.full import full
from peft_jax.methods.ia3 import ia3
from peft_jax.methods.lora import lora
from peft_jax.methods.ssb import ssb
from peft_jax.methods.ssl import ssl
from peft_jax.methods.stacked import stacked

__all__ = [
  'BUFFERS',
  'Adapter',
  'AdapterParams',
  'FactoredFallbackWarning',
  'Params',
  'PeftError',
  'Rule',
  'Schedule',
  'TrainState',
  'bitfit',
  'by_rules',
  'checkpoint_manager',
  'count',
  'describe',
  'factored',
  'full',
  'get',
  'hook_handler',
  'hook_point',
  'ia3',
  'is_bias',
  'load_adapter',
  'lora',
  'make_train_step',
  'merge',
  'names',
  'register',
  'restore_checkpoint',
  'save_adapter',
  'save_checkpoint',
  'ssb',
  'ssl',
  'stacked',
  'trainable_mask',
  'unmerge',
]
