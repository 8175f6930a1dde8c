"""Which trained parameters weight decay acts on: Hugging Face's Trainer rule.

The Trainer puts every parameter in AdamW's decay group except biases (a
name containing ``bias``) and the parameters of normalisation layers. Here
a parameter's name is its path in the adapter-parameter tree, which is the
frozen leaf's path (``encoder/layer_0/attention/output/LayerNorm/scale``)
followed by the method's fields (``.../query/kernel`` then LoRA's ``a``):
so LoRA's factors on a kernel are decayed, a ``full()`` or BitFit bias and
LayerNorm's scale are not, as in the Trainer.
"""

import re

from peft_jax._src import paths
from peft_jax._src.base import AdapterParams

# A normalisation module, by the names of this package's model families:
# BERT/DeBERTa ``LayerNorm``, Llama ``input_layernorm``,
# ``post_attention_layernorm`` and the final ``norm``.
NORM_MODULE = re.compile(r'layer_?norm|^norm$', re.IGNORECASE)


def decays(names: list[str]) -> bool:
  """Whether the Trainer decays the parameter at ``names``: not a bias, not in
  a normalisation module."""
  return not any('bias' in name or NORM_MODULE.search(name) for name in names)


def hf_decay_mask(params: AdapterParams):
  """``True`` at every leaf of ``params`` that Hugging Face's Trainer would
  decay (``decays``), ``False`` at biases and normalisation parameters: the
  ``mask`` of ``optax.adamw`` or ``optax.add_decayed_weights``, and of
  ``peft_jax.adamw_per_adapter``.
  """
  return paths.map_named(lambda name, _: decays(name.split(paths.SEPARATOR)), params)
