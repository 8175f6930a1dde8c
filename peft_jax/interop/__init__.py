"""Interoperability with the PyTorch world: Hugging Face PEFT adapter folders.

``load_hf_adapter(dir, hf_modules(model), frozen)`` reads a PEFT folder for
one of our models; ``save_hf_adapter`` writes one. Each PEFT type has its
table in this package, one file each: ``lora`` (LoRA, rsLoRA, DoRA),
``ia3``, ``adalora``, ``ln_tuning``, ``vera``, ``fourierft``, ``oft``,
``boft``, ``loha``, ``lokr``; activation-side ``prompt_tuning`` (prompt
tuning, P-tuning), ``prefix_tuning`` and ``adaption_prompt``, read with
``hooks=pj.hook_points(model, ids)``.
"""

from peft_jax.interop import adalora as adalora  # registers ADALORA
from peft_jax.interop import (
  adaption_prompt as adaption_prompt,  # registers ADAPTION_PROMPT
)
from peft_jax.interop import boft as boft  # registers BOFT
from peft_jax.interop import fourierft as fourierft  # registers FOURIERFT
from peft_jax.interop import ia3 as ia3  # registers IA3
from peft_jax.interop import ln_tuning as ln_tuning  # registers LN_TUNING
from peft_jax.interop import loha as loha  # registers LOHA
from peft_jax.interop import lokr as lokr  # registers LOKR
from peft_jax.interop import lora as lora  # registers LORA
from peft_jax.interop import oft as oft  # registers OFT
from peft_jax.interop import (
  prefix_tuning as prefix_tuning,  # registers PREFIX_TUNING
)
from peft_jax.interop import (
  prompt_tuning as prompt_tuning,  # registers PROMPT_TUNING, P_TUNING
)
from peft_jax.interop import vera as vera  # registers VERA
from peft_jax.interop.families import (
  example_hook_points,
  example_ids,
  hf_modules,
  load_base,
  load_tokenizer,
  resolve_base,
)
from peft_jax.interop.hf_peft import (
  HfAdapter,
  HfMethod,
  is_target,
  load_hf_adapter,
  pattern_value,
  save_hf_adapter,
  scan_layout,
)

__all__ = [
  'HfAdapter',
  'HfMethod',
  'example_hook_points',
  'example_ids',
  'hf_modules',
  'is_target',
  'load_base',
  'load_hf_adapter',
  'load_tokenizer',
  'pattern_value',
  'resolve_base',
  'save_hf_adapter',
  'scan_layout',
]
