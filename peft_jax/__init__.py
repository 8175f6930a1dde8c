"""peft_jax: parameter-efficient fine-tuning as pure functions over pytrees.

Every method is a factory returning an ``Adapter`` (weight space, per leaf)
or an ``ActivationAdapter`` (at a hook point); ``by_rules`` lifts them to a
``TreeAdapter`` over a whole model; ``adapted`` runs a model with it;
``make_train_step`` trains its parameters with optax; ``save_adapter`` and
``load_adapter_file`` keep them in a small file; ``from_pretrained`` does it
all on a Hugging Face, GGUF or shipped model in one call. See README.md.
"""

from peft_jax import analysis as analysis
from peft_jax import methods as methods  # registers every method
from peft_jax import recipes as recipes
from peft_jax import schedules as schedules
from peft_jax import selection as selection
from peft_jax import wrappers as wrappers  # registers the wrappers
from peft_jax._src.base import (
  ActivationAdapter,
  Adapter,
  AdapterParams,
  Buffers,
  Entry,
  Linear,
  Params,
  PeftError,
  Plan,
  Schedule,
  Shared,
  TreeAdapter,
)
from peft_jax._src.checkpoint import (
  DamagedCheckpoint,
  LoadedAdapter,
  checkpoint_manager,
  load_adapter,
  load_adapter_file,
  restore_checkpoint,
  restore_newest_good,
  save_adapter,
  save_checkpoint,
)
from peft_jax._src.decay import hf_decay_mask
from peft_jax._src.factored import FactoredFallbackWarning, adapted
from peft_jax._src.hooks import AttentionKV, HookPoint, hook_point, hook_points
from peft_jax._src.many import (
  adamw_per_adapter,
  make_many_train_step,
  shard_adapters,
  stack_states,
  stack_trees,
  take_adapter,
)
from peft_jax._src.noise import Noise
from peft_jax._src.per_row import adapted_per_row
from peft_jax._src.quantization import dequantize_tree as dequantize
from peft_jax._src.quantization import quantize, stored_bytes
from peft_jax._src.quantized_array import KINDS as QUANTIZATION_KINDS
from peft_jax._src.quantized_array import QuantizedArray, is_quantized
from peft_jax._src.registry import (
  get,
  names,
  register,
  register_wrapper,
  wrapper_names,
)
from peft_jax._src.rules import Rule, deserialize_rules, serialize_rules
from peft_jax._src.selectors import get_selector, register_selector, selector_names
from peft_jax._src.sharding import adapter_shardings, optimizer_shardings
from peft_jax._src.step import TrainState, make_train_step
from peft_jax._src.tree import by_rules, count, describe, merge, unmerge
from peft_jax.methods.adalora import adalora
from peft_jax.methods.adaption_prompt import adaption_prompt
from peft_jax.methods.bitfit import bitfit, is_bias
from peft_jax.methods.boft import boft
from peft_jax.methods.child_pruning import child_pruning
from peft_jax.methods.compacter import compacter
from peft_jax.methods.compacter_adapter import compacter_adapter
from peft_jax.methods.diff_pruning import diff_pruning
from peft_jax.methods.dora import dora
from peft_jax.methods.flexlora import flexlora
from peft_jax.methods.flora import flora
from peft_jax.methods.fourierft import fourierft
from peft_jax.methods.full import full
from peft_jax.methods.gated_lora import gated_lora
from peft_jax.methods.houlsby import houlsby
from peft_jax.methods.ia3 import ia3
from peft_jax.methods.ia3_activations import ia3_activations
from peft_jax.methods.intrinsic_said import intrinsic_said
from peft_jax.methods.liera import liera
from peft_jax.methods.ln_tuning import is_layer_norm, ln_tuning
from peft_jax.methods.loha import loha
from peft_jax.methods.lokr import lokr
from peft_jax.methods.lora import lora
from peft_jax.methods.lora_dash import lora_dash
from peft_jax.methods.milora import milora
from peft_jax.methods.mixout import mixout
from peft_jax.methods.moslora import moslora
from peft_jax.methods.oft import oft
from peft_jax.methods.p_tuning import p_tuning
from peft_jax.methods.parallel_adapter import parallel_adapter
from peft_jax.methods.pfeiffer import pfeiffer
from peft_jax.methods.pissa import pissa
from peft_jax.methods.prefix_tuning import prefix_tuning
from peft_jax.methods.prompt_tuning import (
  prompt_from_text,
  prompt_from_vocabulary,
  prompt_tuning,
)
from peft_jax.methods.sam_parser import sam_parser
from peft_jax.methods.scaled_parallel import scaled_parallel
from peft_jax.methods.sparse import sparse, sparse_rules
from peft_jax.methods.spectral_adapter import spectral_adapter
from peft_jax.methods.ssb import ssb
from peft_jax.methods.ssl import ssl
from peft_jax.methods.svdiff import svdiff
from peft_jax.methods.trilora import trilora
from peft_jax.methods.vera import vera
from peft_jax.wrappers import (
  matrix_view,
  mpc,
  pad_rank,
  rank_masked,
  stacked,
  with_rank,
)

__all__ = [
  'QUANTIZATION_KINDS',
  'ActivationAdapter',
  'Adapter',
  'AdapterParams',
  'AttentionKV',
  'Buffers',
  'DamagedCheckpoint',
  'Entry',
  'FactoredFallbackWarning',
  'HookPoint',
  'Linear',
  'LoadedAdapter',
  'Noise',
  'Params',
  'PeftError',
  'PeftModel',
  'Plan',
  'QuantizedArray',
  'Rule',
  'Schedule',
  'Shared',
  'TrainState',
  'TreeAdapter',
  'adalora',
  'adamw_per_adapter',
  'adapted',
  'adapted_per_row',
  'adapter_shardings',
  'adaption_prompt',
  'bitfit',
  'boft',
  'by_rules',
  'checkpoint_manager',
  'child_pruning',
  'compacter',
  'compacter_adapter',
  'count',
  'dequantize',
  'describe',
  'deserialize_rules',
  'diff_pruning',
  'dora',
  'flexlora',
  'flora',
  'fourierft',
  'from_pretrained',
  'full',
  'gated_lora',
  'get',
  'get_selector',
  'hf_decay_mask',
  'hook_point',
  'hook_points',
  'houlsby',
  'ia3',
  'ia3_activations',
  'intrinsic_said',
  'is_bias',
  'is_layer_norm',
  'is_quantized',
  'liera',
  'ln_tuning',
  'load_adapter',
  'load_adapter_file',
  'loha',
  'lokr',
  'lora',
  'lora_dash',
  'make_many_train_step',
  'make_train_step',
  'matrix_view',
  'merge',
  'milora',
  'mixout',
  'moslora',
  'mpc',
  'names',
  'oft',
  'optimizer_shardings',
  'p_tuning',
  'pad_rank',
  'parallel_adapter',
  'pfeiffer',
  'pissa',
  'prefix_tuning',
  'prompt_from_text',
  'prompt_from_vocabulary',
  'prompt_tuning',
  'quantize',
  'rank_masked',
  'register',
  'register_selector',
  'register_wrapper',
  'restore_checkpoint',
  'restore_newest_good',
  'sam_parser',
  'save_adapter',
  'save_checkpoint',
  'scaled_parallel',
  'schedules',
  'selection',
  'selector_names',
  'serialize_rules',
  'shard_adapters',
  'sparse',
  'sparse_rules',
  'spectral_adapter',
  'ssb',
  'ssl',
  'stack_states',
  'stack_trees',
  'stacked',
  'stored_bytes',
  'svdiff',
  'take_adapter',
  'trilora',
  'unmerge',
  'vera',
  'with_rank',
  'wrapper_names',
  'wrappers',
]


def __getattr__(name: str):
  """``PeftModel`` and ``from_pretrained`` (``peft_jax.pretrained``), imported
  on first use: they load models and tokenizers (transformers), which
  ``import peft_jax`` does not need."""
  if name in ('PeftModel', 'from_pretrained'):
    from peft_jax import pretrained

    return getattr(pretrained, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
