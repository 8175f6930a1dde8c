"""PEFT's ``OFT`` type <-> ``oft`` (exact Cayley, Cayley–Neumann, COFT).

Per module PEFT stores ``oft_R.weight: (k, b(b − 1)/2)`` (``(1, ...)`` with
``block_share``): each row the upper triangle of one block's ``Q = S − Sᵀ``
in ``triu_indices`` order, exactly our ``q``. Its forward is ``x ↦ x R``
blockwise, then the base layer (our ``w' = R w``). With
``use_cayley_neumann`` (its default) ``R_i`` is the truncated series of
``(I + Q)(I − Q)⁻¹`` (our ``neumann_terms = num_cayley_neumann_terms``);
without it ``R_i = (I − Q)(I + Q)⁻¹``, ours for ``q = −oft_R.weight``.
``coft``/``eps`` become ``coft_eps = eps``. The block size comes from the
tensor (PEFT resolves ``r``/``oft_block_size`` to it); ``module_dropout``
only acts in training, so it is ignored.
"""

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from peft_jax._src.base import PeftError
from peft_jax.interop import hf_peft
from peft_jax.models.checkpoints import Module

SKEW = 'oft_R.weight'
NEUMANN_TERMS = 5  # PEFT's default num_cayley_neumann_terms.
DEFAULT_EPS = 6e-5  # PEFT's default eps.


def check_options(config: Mapping[str, Any], where: str, peft_type: str) -> None:
  """Refuses ``fan_in_fan_out`` and trained biases (``bias != 'none'``)."""
  unsupported = (('fan_in_fan_out', (False, None)), ('bias', ('none', None)))
  hf_peft.refuse_options(config, where, peft_type, unsupported)


def block_size_of(name: str, entries: int) -> int:
  """``b`` with ``b(b − 1)/2 = entries``, or an error."""
  b = (1 + math.isqrt(1 + 8 * entries)) // 2
  if b * (b - 1) // 2 != entries or b < 2:
    raise PeftError(
      f'{name}: oft_R.weight rows have {entries} entries; expected b(b − 1)/2 '
      'for a block size b ≥ 2.'
    )
  return b


def read(
  config: Mapping[str, Any],
  name: str,
  tensors: hf_peft.Tensors,
  module: Module,
  shared: hf_peft.Tensors,
) -> tuple[str, hf_peft.Tensors, hf_peft.Tensors]:
  """``(oft(...) spec, {q}, {})`` for module ``name``."""
  del module, shared
  check_options(config, name, 'OFT')
  skew_entries = tensors[SKEW]
  block_share = bool(config.get('block_share'))
  if skew_entries.ndim != 2 or (block_share and skew_entries.shape[0] != 1):
    raise PeftError(
      f'{name}: oft_R.weight has shape {skew_entries.shape}; expected '
      f'{"(1, b(b − 1)/2) with block_share" if block_share else "(k, b(b − 1)/2)"}.'
    )
  block_size = block_size_of(name, skew_entries.shape[1])
  neumann = config.get('use_cayley_neumann', True)
  terms = int(config.get('num_cayley_neumann_terms', NEUMANN_TERMS)) if neumann else 0
  coft_eps = float(config.get('eps', DEFAULT_EPS)) if config.get('coft') else 0.0
  if config.get('coft') and not coft_eps > 0:
    raise PeftError(
      f'{name}: OFT option eps={coft_eps!r} with coft=True; expected > 0.'
    )
  spec = (
    f'oft(block_size={block_size}, block_share={block_share}, '
    f'neumann_terms={terms}, coft_eps={coft_eps})'
  )
  q = skew_entries if terms else -skew_entries
  return spec, {'q': q}, {}


def write(
  kind: str, kwargs: dict, params: Any, buffers: Any, module: Module
) -> tuple[hf_peft.Tensors, dict, hf_peft.Tensors]:
  """PEFT's ``oft_R.weight`` and options for one ``oft`` leaf."""
  del kind, buffers, module
  q = np.asarray(params.q)
  options = {
    'block_size': kwargs['block_size'],
    'blocks': None if kwargs['block_share'] else q.shape[0],
    'block_share': kwargs['block_share'],
    'neumann_terms': kwargs['neumann_terms'],
    'coft_eps': kwargs['coft_eps'],
  }
  return {SKEW: q if kwargs['neumann_terms'] else -q}, options, {}


def block_fields(
  options: dict[str, dict], size_field: str, count_field: str
) -> dict[str, int]:
  """``{size_field: b, count_field: 0}`` if every module has block size ``b``,
  else ``{size_field: 0, count_field: k}`` if every one has ``k`` blocks
  (PEFT derives the other per module); an error otherwise."""
  sizes = {o['block_size'] for o in options.values()}
  counts = {o['blocks'] for o in options.values()}
  if len(sizes) == 1:
    return {size_field: sizes.pop(), count_field: 0}
  if len(counts) == 1 and None not in counts:
    return {size_field: 0, count_field: counts.pop()}
  raise PeftError(
    f'save_hf_adapter: one PEFT config has one {size_field} or one {count_field} '
    f'for all modules; these have block sizes {sorted(sizes)} and block counts '
    f'{sorted(counts, key=repr)}.'
  )


def config(options: dict[str, dict]) -> dict[str, Any]:
  """``adapter_config.json`` fields for the per-module options."""
  terms = hf_peft.common(options, 'neumann_terms')
  coft_eps = hf_peft.common(options, 'coft_eps')
  return {
    **block_fields(options, 'oft_block_size', 'r'),
    'block_share': hf_peft.common(options, 'block_share'),
    'use_cayley_neumann': terms > 0,
    'num_cayley_neumann_terms': terms or NEUMANN_TERMS,
    'coft': coft_eps > 0,
    'eps': coft_eps or DEFAULT_EPS,
    'target_modules': sorted(options),
    'module_dropout': 0.0,
    'bias': 'none',
    'fan_in_fan_out': False,
    'init_weights': True,
  }


OFT = hf_peft.register_hf(
  hf_peft.HfMethod(
    peft_type='OFT',
    methods=('oft',),
    suffixes=(SKEW,),
    read=read,
    write=write,
    config=config,
  )
)
