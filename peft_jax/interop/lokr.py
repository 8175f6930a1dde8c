"""PEFT's ``LOKR`` type <-> ``lokr``.

Per linear module PEFT stores the Kronecker factors of ``W' = W + s·kron(w1,
w2)`` (torch layout, ``s = alpha / r``): ``lokr_w1: (a2, a1)`` or
``lokr_w1_a: (a2, r)``, ``lokr_w1_b: (r, a1)``, and ``lokr_w2: (b2, b1)`` or
``lokr_w2_a: (b2, r)``, ``lokr_w2_b: (r, b1)``, where ``(a1, b1)``,
``(a2, b2)`` factor ``d_in``, ``d_out`` (``decompose_factor``). PEFT picks
per module: ``lokr_w2`` is factored iff ``r < max(b1, b2)/2``, ``lokr_w1``
iff ``decompose_both`` and ``r < max(a1, a2)/2``.

Ours (Flax layout): ``c = w1ᵀ: (a1, a2)`` (``c1 = w1_bᵀ``, ``c2 = w1_aᵀ``),
``d = w2ᵀ: (b1, b2)`` (``d1 = w2_bᵀ``, ``d2 = w2_aᵀ``). Each module reads as
``lokr(factor=decompose_factor, rank=r, alpha=α, decompose_both=<w1
factored>, full_d=<w2 full>)`` and is written back as it came. Our
``rank=None`` leaves (both factors full, ``s = α``) are written with the least
power of two ``r >= max(a1, a2, b1, b2)/2`` (so PEFT keeps both factors full)
and ``alpha = α·r`` (so ``alpha/r`` is ``α`` exactly); a leaf whose factoring
PEFT would not choose at its rank is refused. ``rank_dropout``
(and its scale) and ``module_dropout`` act in training only (no-ops for the
saved model); ``use_effective_conv2d`` changes convolutions only, whose
``lokr_t2`` is refused.
"""

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from peft_jax._src.base import PeftError
from peft_jax.interop import hf_peft
from peft_jax.models.checkpoints import Module

W1, W1_A, W1_B = 'lokr_w1', 'lokr_w1_a', 'lokr_w1_b'
W2, W2_A, W2_B = 'lokr_w2', 'lokr_w2_a', 'lokr_w2_b'
# The CP-decomposed core PEFT adds for convolutions (use_effective_conv2d).
CONV_CORE = 'lokr_t2'


def peft_factors(
  rank: int, decompose_both: bool, c_shape, d_shape
) -> tuple[bool, bool]:
  """``(w1 factored, w2 factored)`` as PEFT decides them for rank r and
  ``c: (a1, a2)``, ``d: (b1, b2)``."""
  return decompose_both and rank < max(c_shape) / 2, rank < max(d_shape) / 2


def _kron_factor(
  tensors: hf_peft.Tensors, full: str, a: str, b: str
) -> tuple[hf_peft.Tensors, tuple[int, int], int | None]:
  """One Kronecker factor in our layout: ``({'': w.T} or {'1': b.T, '2':
  a.T}, its shape, its rank or None)``."""
  if full in tensors:
    value = tensors[full].T
    return {'': value}, value.shape, None
  low, high = tensors[b].T, tensors[a].T
  return {'1': low, '2': high}, (low.shape[0], high.shape[1]), low.shape[1]


def read(
  config: Mapping[str, Any],
  name: str,
  tensors: hf_peft.Tensors,
  module: Module,
  shared: hf_peft.Tensors,
) -> tuple[str, hf_peft.Tensors, hf_peft.Tensors]:
  """``(lokr(...) spec, {c or c1, c2; d or d1, d2}, {})`` for module ``name``."""
  del module, shared
  if CONV_CORE in tensors:
    raise PeftError(
      f'{name}: LoKr option use_effective_conv2d=True (lokr_t2 of a '
      'convolution) is not supported; expected False.'
    )
  layouts = [w1 | w2 for w1 in ({W1}, {W1_A, W1_B}) for w2 in ({W2}, {W2_A, W2_B})]
  if set(tensors) not in layouts:
    raise PeftError(
      f'{name}: LoKr tensors {sorted(tensors)}; expected one of '
      f'{[sorted(t) for t in layouts]}.'
    )
  c, c_shape, c_rank = _kron_factor(tensors, W1, W1_A, W1_B)
  d, d_shape, d_rank = _kron_factor(tensors, W2, W2_A, W2_B)
  rank = hf_peft.pattern_value(config.get('rank_pattern') or {}, name, config['r'])
  alpha = float(
    hf_peft.pattern_value(config.get('alpha_pattern') or {}, name, config['alpha'])
  )
  decompose_both = bool(config.get('decompose_both'))
  factored = (c_rank is not None, d_rank is not None)
  ranks_fit = {c_rank, d_rank} <= {None, rank}
  if factored != peft_factors(rank, decompose_both, c_shape, d_shape) or not ranks_fit:
    raise PeftError(
      f'{name}: LoKr tensors {sorted(tensors)} do not fit r/rank_pattern={rank}, '
      f'decompose_both={decompose_both} (factor shapes {c_shape}, {d_shape}).'
    )
  factor = config.get('decompose_factor', -1)
  fields = {f'c{k}': v for k, v in c.items()} | {f'd{k}': v for k, v in d.items()}
  spec = (
    f'lokr(factor={factor}, rank={rank}, alpha={alpha}, '
    f'decompose_both={factored[0]}, full_d={not factored[1]})'
  )
  return spec, fields, {}


def _shape(full, low, high) -> tuple[int, int]:
  """A factor's shape: ``full``'s, or that of ``low @ high``."""
  return tuple(full.shape) if full is not None else (low.shape[0], high.shape[1])


def write(
  kind: str, kwargs: dict, params: Any, buffers: Any, module: Module
) -> tuple[hf_peft.Tensors, dict, hf_peft.Tensors]:
  """PEFT's tensors and options (``r``, ``alpha``, ``decompose_both``: True,
  False or None for either, ``decompose_factor``) for one ``lokr`` leaf.

  Raises:
    PeftError: if PEFT, at the leaf's rank, would factor ``d`` (or ``c``)
      otherwise than the leaf does.
  """
  del kind, buffers
  leaf = module['weight'].path
  rank, both = kwargs['rank'], kwargs['decompose_both']
  alpha = float(kwargs['alpha'] if kwargs['alpha'] is not None else rank or 1)
  c_shape = _shape(params.c, params.c1, params.c2)
  d_shape = _shape(params.d, params.d1, params.d2)
  tensors = {}
  if params.c is None:
    tensors.update({W1_A: np.asarray(params.c2).T, W1_B: np.asarray(params.c1).T})
  else:
    tensors[W1] = np.asarray(params.c).T
  if params.d is None:
    tensors.update({W2_A: np.asarray(params.d2).T, W2_B: np.asarray(params.d1).T})
  else:
    tensors[W2] = np.asarray(params.d).T
  options = {'decompose_factor': kwargs['factor']}
  if rank is None:
    full_rank = 2 ** math.ceil(math.log2(max(1, max(*c_shape, *d_shape) / 2)))
    options.update(r=full_rank, alpha=alpha * full_rank, decompose_both=None)
    return tensors, options, {}
  c_factorable, d_factored = peft_factors(rank, True, c_shape, d_shape)
  if d_factored == kwargs['full_d']:
    raise PeftError(
      f'save_hf_adapter: {leaf!r} has full_d={kwargs["full_d"]} for d: {d_shape} '
      f'at rank={rank}, but PEFT keeps d full iff rank >= {max(d_shape) / 2}; '
      f'expected full_d={not d_factored}.'
    )
  if both and not c_factorable:
    raise PeftError(
      f'save_hf_adapter: {leaf!r} factors c: {c_shape} at rank={rank}, but PEFT '
      f'keeps it full unless rank < {max(c_shape) / 2}; expected decompose_both=False.'
    )
  options.update(
    r=rank, alpha=alpha, decompose_both=both or (False if c_factorable else None)
  )
  return tensors, options, {}


def config(options: dict[str, dict]) -> dict[str, Any]:
  """``adapter_config.json`` fields for the per-module options."""
  both = {name: o['decompose_both'] for name, o in options.items()}
  both = {name: v for name, v in both.items() if v is not None}
  return {
    **hf_peft.common_or_patterns(hf_peft.option(options, 'r'), 'r', 'rank_pattern'),
    **hf_peft.common_or_patterns(
      hf_peft.option(options, 'alpha'), 'alpha', 'alpha_pattern'
    ),
    'decompose_both': hf_peft.uniform(both, 'decompose_both') if both else False,
    'decompose_factor': hf_peft.common(options, 'decompose_factor'),
    'target_modules': sorted(options),
    'rank_dropout': 0.0,
    'module_dropout': 0.0,
    'rank_dropout_scale': False,
    'use_effective_conv2d': False,
    'init_weights': True,
  }


LOKR = hf_peft.register_hf(
  hf_peft.HfMethod(
    peft_type='LOKR',
    methods=('lokr',),
    suffixes=(W1, W1_A, W1_B, W2, W2_A, W2_B, CONV_CORE),
    read=read,
    write=write,
    config=config,
  )
)
