"""Interoperability with the PyTorch world: Hugging Face PEFT adapter folders.

``load_hf_adapter(dir, hf_modules(model), frozen)`` reads a PEFT folder for
one of our models; ``save_hf_adapter`` writes one. Each PEFT type has its
table in this package (``lora``: LoRA, rsLoRA, DoRA; ``ia3``: (IA)³).
"""

from peft_jax.interop import ia3 as ia3  # registers IA3
from peft_jax.interop import lora as lora  # registers LORA
from peft_jax.interop.families import hf_modules, load_base
from peft_jax.interop.hf_peft import (
  HfAdapter,
  HfMethod,
  is_target,
  load_hf_adapter,
  pattern_value,
  save_hf_adapter,
)

__all__ = [
  'HfAdapter',
  'HfMethod',
  'hf_modules',
  'is_target',
  'load_base',
  'load_hf_adapter',
  'pattern_value',
  'save_hf_adapter',
]
