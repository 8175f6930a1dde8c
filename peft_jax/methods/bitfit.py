"""BitFit (Ben Zaken et al., 2022): train only the bias vectors."""

from peft_jax._src import checks
from peft_jax._src.base import Adapter
from peft_jax._src.registry import register
from peft_jax._src.replace import replace_leaf
from peft_jax._src.selectors import register_selector


@register_selector('is_bias')
def is_bias(name: str, leaf) -> bool:
  """Predicate selecting BitFit's leaves: 1-D leaves named ``.../bias``.

  On BERT-like models this picks the Q/K/V/O and FFN biases *and* the
  LayerNorm biases, as the paper's BitFit runs do.
  """
  return name.rsplit('/', 1)[-1] == 'bias' and len(getattr(leaf, 'shape', ())) == 1


@register('bitfit')
def bitfit(*, param_dtype: str = 'float32') -> Adapter:
  """Trains a bias vector: ``b' = θ``, with ``θ`` initialised to ``b``.

  Select the leaves with the predicate ``peft_jax.is_bias`` (or a regex
  such as ``'.*/bias'``); other leaves stay frozen. ``b: (d,)``; trainable
  count ``d``. Mergeable; not invertible. A non-1-D leaf is an error.

  Args:
    param_dtype: dtype of the trained copy.
  """
  name = 'bitfit'
  dtype = checks.float_dtype(name, 'param_dtype', param_dtype)
  return replace_leaf(dtype, check=lambda w: checks.vector(name, w))
