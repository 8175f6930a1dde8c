"""PEFT's ``BOFT`` type <-> ``boft``.

Per module PEFT stores ``boft_R: (m, k, b, b)`` (``m`` butterfly factors of
``k = d_in / b`` blocks) and ``boft_s: (d_out, 1)``. It uses only the skew
part ``Q = ½(A − Aᵀ)`` of each block ``A`` and ``R = (I − Q)(I + Q)⁻¹``; its
forward is ``x ↦ x R``, the base layer, then ``s ⊙`` on the bias-free part
(our ``w' = (R w) · diag(s)``). Ours: ``q = −`` the upper triangle of ``Q``
(``triu_indices`` order), ``s = boft_s[:, 0]``. Written back, ``boft_R`` is
the skew matrix ``−skew(q)`` itself, bit for bit what PEFT trains from its
zero init (its gradient is skew-symmetric). ``m`` and ``b`` come from the
tensor; ``boft_dropout`` only acts in training, so it is ignored.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from peft_jax._src.base import PeftError
from peft_jax.interop import hf_peft
from peft_jax.interop.oft import block_fields, check_options
from peft_jax.models.checkpoints import Module

BLOCKS, SCALE = 'boft_R', 'boft_s'


def skew_entries(blocks: np.ndarray) -> np.ndarray:
  """``(..., b, b) -> (..., b(b − 1)/2)``: the upper triangle of ``½(A − Aᵀ)``."""
  rows, cols = np.triu_indices(blocks.shape[-1], 1)
  return 0.5 * (blocks[..., rows, cols] - blocks[..., cols, rows])


def skew_blocks(entries: np.ndarray, block_size: int) -> np.ndarray:
  """``(..., b(b − 1)/2) -> (..., b, b)``: ``S − Sᵀ``, ``S`` strictly upper."""
  rows, cols = np.triu_indices(block_size, 1)
  upper = np.zeros((*entries.shape[:-1], block_size, block_size), entries.dtype)
  upper[..., rows, cols] = entries
  return upper - np.swapaxes(upper, -1, -2)


def read(
  config: Mapping[str, Any],
  name: str,
  tensors: hf_peft.Tensors,
  module: Module,
  shared: hf_peft.Tensors,
) -> tuple[str, hf_peft.Tensors, hf_peft.Tensors]:
  """``(boft(...) spec, {q, s}, {})`` for module ``name``."""
  del module, shared
  check_options(config, name, 'BOFT')
  if set(tensors) != {BLOCKS, SCALE}:
    raise PeftError(
      f'{name}: BOFT tensors {sorted(tensors)}; expected {[BLOCKS, SCALE]}.'
    )
  blocks, scale = tensors[BLOCKS], tensors[SCALE]
  if blocks.ndim != 4 or blocks.shape[-1] != blocks.shape[-2] or scale.ndim != 2:
    raise PeftError(
      f'{name}: boft_R {blocks.shape}, boft_s {scale.shape}; expected '
      '(m, k, b, b) and (d_out, 1).'
    )
  factors, block_size = blocks.shape[0], blocks.shape[-1]
  configured = config.get('boft_n_butterfly_factor', 1)
  if factors not in (1, configured):
    raise PeftError(
      f'{name}: boft_R holds {factors} butterfly factors; expected '
      f'boft_n_butterfly_factor={configured}.'
    )
  spec = f'boft(block_size={block_size}, n_butterfly_factor={factors}, scale=True)'
  return spec, {'q': -skew_entries(blocks), 's': scale[:, 0]}, {}


def write(
  kind: str, kwargs: dict, params: Any, buffers: Any, module: Module
) -> tuple[hf_peft.Tensors, dict, hf_peft.Tensors]:
  """PEFT's ``boft_R``, ``boft_s`` and options for one ``boft`` leaf."""
  del kind, buffers
  if not kwargs['scale']:
    raise PeftError(
      f'save_hf_adapter: {module["weight"].path!r} uses boft(scale=False); '
      'PEFT always learns boft_s, expected scale=True.'
    )
  q = np.asarray(params.q)
  tensors = {
    BLOCKS: skew_blocks(-q, kwargs['block_size']),
    SCALE: np.asarray(params.s)[:, None],
  }
  options = {
    'block_size': kwargs['block_size'],
    'blocks': q.shape[1],
    'factors': kwargs['n_butterfly_factor'],
  }
  return tensors, options, {}


def config(options: dict[str, dict]) -> dict[str, Any]:
  """``adapter_config.json`` fields for the per-module options."""
  factors = {name: o['factors'] for name, o in options.items()}
  return {
    **block_fields(options, 'boft_block_size', 'boft_block_num'),
    'boft_n_butterfly_factor': hf_peft.uniform(factors, 'boft_n_butterfly_factor'),
    'target_modules': sorted(options),
    'boft_dropout': 0.0,
    'bias': 'none',
    'fan_in_fan_out': False,
    'init_weights': True,
  }


BOFT = hf_peft.register_hf(
  hf_peft.HfMethod(
    peft_type='BOFT',
    methods=('boft',),
    suffixes=(BLOCKS, SCALE),
    read=read,
    write=write,
    config=config,
  )
)
