"""LN-tuning (Qi et al., 2022; HF PEFT ``LNTuningConfig``): train the norms."""

import re

import numpy as np

from peft_jax._src import checks
from peft_jax._src.base import Adapter, PeftError
from peft_jax._src.registry import register
from peft_jax._src.replace import replace_leaf
from peft_jax._src.selectors import register_selector

NORM_WORDS = frozenset({'ln', 'norm', 'layernorm', 'rmsnorm'})


def _words(segment: str) -> list[str]:
  """The lowercase words of a name segment, split at every non-letter.

  ``'output_layer_norm'`` -> ``['output', 'layer', 'norm']``,
  ``'LayerNorm_0'`` -> ``['layernorm']``, ``'ln_1'`` -> ``['ln']``.
  """
  return [word for word in re.split(r'[^a-z]+', segment.lower()) if word]


@register_selector('is_layer_norm')
def is_layer_norm(name: str, leaf) -> bool:
  """Predicate selecting LN-tuning's leaves: 1-D leaves of a norm module.

  A leaf matches when it is 1-D and some segment of its name other than the
  last (the module path, not the parameter's own name) contains one of the
  words ``ln``, ``norm``, ``layernorm``, ``rmsnorm`` (case-insensitive;
  segments are split into words at every non-letter). This matches BERT's
  ``layer_norm``/``output_layer_norm``, Flax ``LayerNorm_0``/``RMSNorm_0``,
  HF ``LayerNorm``, GPT-2's ``ln_1``/``ln_f``, LLaMA's
  ``input_layernorm``/``post_attention_layernorm``/``norm``, and T5's
  ``final_layer_norm``; it does not match ``BatchNorm``/``GroupNorm``
  (``batchnorm``, ``groupnorm`` are other words) nor words that merely
  contain the letters (``normal``, ``linear``). Both the scale (γ) and the
  bias (β) of a matched norm are selected.
  """
  if len(getattr(leaf, 'shape', ())) != 1:
    return False
  modules = name.split('/')[:-1]
  return any(word in NORM_WORDS for part in modules for word in _words(part))


@register('ln_tuning')
def ln_tuning(*, param_dtype: str = 'float32') -> Adapter:
  """Trains a norm's scale or bias: ``γ' = θ`` (or ``β' = θ``), ``θ`` init ``γ``.

  Select the leaves with the predicate ``is_layer_norm`` (or a regex such as
  ``'.*layer_norm/(scale|bias)'``); other leaves stay frozen. Leaf
  ``γ: (d,)``; trainable count ``d``. Mergeable (the trained vector replaces
  the leaf); not invertible. A non-1-D leaf is an error.

  Args:
    param_dtype: dtype of the trained copy.
  """
  name = 'ln_tuning'
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)

  def check_norm(w):
    if np.ndim(w) != 1:
      raise PeftError(
        f'{name} expects a 1-D leaf (a norm scale or bias); got shape {np.shape(w)}'
      )

  return replace_leaf(dtype, check=check_norm)
