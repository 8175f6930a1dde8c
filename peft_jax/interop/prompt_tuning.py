"""PEFT's prompt learning types <-> ``prompt_tuning`` (and ``p_tuning``).

``PROMPT_TUNING`` stores the prompt as the bare tensor ``prompt_embeddings:
(l, d)`` (no ``base_model.`` prefix): ours is ``prompt_tuning(length=l)`` at
the ``input_embeddings`` hook point with ``prompt = prompt_embeddings``
(``x' = concat(P, x)``, mask extended by ``l`` ones).

``P_TUNING`` saves only its encoder's output ``P = encoder(E): (l, d)`` as
``prompt_embeddings``, and PEFT runs a loaded folder (inference mode) on
that ``P`` alone, so an imported P-tuning adapter is exactly prompt tuning
with those embeddings: it is read as ``prompt_tuning(length=l)`` (the
encoder is not in the file). Our ``p_tuning`` is written the same way, as a
``PROMPT_TUNING`` folder of ``P = encode(params)``: PEFT loads prompt
learning in inference mode only, where a ``P_TUNING`` folder would mean the
same ``P`` but claim an encoder (``encoder_hidden_size``, ...) the file
does not hold.

``PREFIX_TUNING`` is in ``prefix_tuning.py``.

Causal LMs only (``task_type='CAUSAL_LM'``): PEFT's sequence classifiers
pool the first virtual token, ours the real first token.
"""

from typing import Any

import numpy as np

from peft_jax._src.base import PeftError
from peft_jax.interop import hf_peft
from peft_jax.methods import p_tuning

PROMPT = 'prompt_embeddings'
POINT = 'input_embeddings'
TASK_TYPES = ('CAUSAL_LM',)


def read_points(
  config: dict[str, Any], tensors: hf_peft.Tensors, hooks: Any
) -> dict[str, hf_peft.Read]:
  """``{input_embeddings: (prompt_tuning(length=l), {prompt: P}, {})}``."""
  del hooks
  peft_type = config['peft_type']
  if set(tensors) != {PROMPT}:
    raise PeftError(f'{peft_type}: tensors {sorted(tensors)}; expected [{PROMPT!r}].')
  prompt = tensors[PROMPT]
  length = config.get('num_virtual_tokens')
  if prompt.ndim != 2 or prompt.shape[0] != length:
    raise PeftError(
      f'{peft_type}: {PROMPT} has shape {prompt.shape}; num_virtual_tokens='
      f'{length} needs ({length}, token_dim).'
    )
  if config.get(hf_peft.SAVED):
    raise PeftError(f'{peft_type}: modules_to_save is not supported here.')
  return {POINT: (f'prompt_tuning(length={length})', {'prompt': prompt}, {})}


def write_point(
  kind: str, kwargs: dict, params: Any, buffers: Any, point: str, modules: Any
) -> tuple[hf_peft.Tensors, dict]:
  """``{prompt_embeddings: P}`` and ``{num_virtual_tokens: l, token_dim:
  d}``: ``P`` is the prompt, or ``p_tuning``'s ``encode(params)``."""
  del kwargs, buffers, modules
  if point != POINT:
    raise PeftError(
      f'save_hf_adapter: {kind} at {point!r}; PEFT prepends the prompt at '
      f'the model input ({POINT!r}).'
    )
  prompt = np.asarray(p_tuning.encode(params) if kind == 'p_tuning' else params.prompt)
  length, width = prompt.shape
  return {PROMPT: prompt}, {'num_virtual_tokens': length, 'token_dim': width}


def config(options: dict[str, dict]) -> dict[str, Any]:
  """``PromptTuningConfig`` fields (PEFT fills ``num_layers`` and
  ``num_attention_heads`` from the model's config)."""
  (point_options,) = options.values()
  return {
    **point_options,
    'num_transformer_submodules': 1,
    'prompt_tuning_init': 'RANDOM',
    'task_type': 'CAUSAL_LM',
  }


PROMPT_TUNING = hf_peft.register_hf(
  hf_peft.HfMethod(
    peft_type='PROMPT_TUNING',
    methods=('prompt_tuning', 'p_tuning'),
    config=config,
    read_points=read_points,
    write_point=write_point,
    top_level=(PROMPT,),
    task_types=TASK_TYPES,
  )
)
P_TUNING = hf_peft.register_hf(
  hf_peft.HfMethod(
    peft_type='P_TUNING',
    methods=(),
    config=config,
    read_points=read_points,
    top_level=(PROMPT,),
    task_types=TASK_TYPES,
  )
)
