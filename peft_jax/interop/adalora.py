"""PEFT's ``ADALORA`` type <-> ``adalora``.

Per module PEFT stores ``lora_A: (k, d_in)``, ``lora_E: (k, 1)`` and
``lora_B: (d_out, k)`` (no ``.weight``): ``W' = W + s·B (A ⊙ E)`` with
``s = lora_alpha / (ranknum + 1e-5)``; ``ranknum = init_r`` is not saved
(nor the per-module ``r``/``alpha_pattern``, which AdaLoRA ignores).
A pruned adapter (after ``update_and_allocate``'s final budget step) has
``rank_pattern = {'<module>.lora_E': [kept?] * init_r}`` in its config and
only the ``k`` kept ranks in the file; PEFT's loader resizes the module to
``k`` and keeps ``ranknum = init_r``.

Ours: ``adalora(rank=init_r, alpha=lora_alpha, reg_orth_coef=
orth_reg_weight)`` with ``a: (d_in, init_r)``, ``e: (init_r,)``,
``b: (init_r, d_out)``; a pruned rank is an entry of ``e`` equal to 0 (what
``adalora_schedule`` masks), its column of ``a`` and row of ``b`` 0 on
import. Export writes every module with a zero in ``e`` pruned: its nonzero
ranks and a ``rank_pattern`` mask (an untrained ``e = 0`` module is written
with rank 0, the same zero update). The budget schedule's options
(``target_r``, ``tinit``, ``tfinal``, ``deltaT``, ``beta1/2``) are not an
adapter's: ignored on import, written as a finished schedule on export
(``total_step=1``; override them with ``save_hf_adapter``'s fields).
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from peft_jax._src.base import PeftError
from peft_jax.interop import hf_peft
from peft_jax.models.checkpoints import Module

A, E, B = 'lora_A', 'lora_E', 'lora_B'
DEFAULT_INIT_R = 12
DEFAULT_LORA_ALPHA = 8
DEFAULT_ORTH_REG_WEIGHT = 0.5

# Options whose non-default values change the model in ways ``adalora`` does
# not express: (field, its no-op values).
_UNSUPPORTED = (
  ('fan_in_fan_out', (False, None)),
  ('bias', ('none', None)),
  ('layer_replication', (None, [])),
  ('target_parameters', (None, [])),
  ('trainable_token_indices', (None, {}, [])),
)


def _check_options(config: Mapping[str, Any], where: str) -> None:
  hf_peft.refuse_options(config, where, 'AdaLoRA', _UNSUPPORTED)


def kept_ranks(config: Mapping[str, Any], name: str, init_r: int) -> np.ndarray:
  """The ``(init_r,)`` bool mask of the ranks PEFT keeps for module ``name``:
  ``rank_pattern['<name>.lora_E']``, all ranks where it has no entry."""
  pattern = (config.get('rank_pattern') or {}).get(f'{name}.{E}')
  if pattern is None:
    return np.ones(init_r, bool)
  if not (
    isinstance(pattern, list)
    and len(pattern) == init_r
    and all(isinstance(kept, bool) for kept in pattern)
  ):
    raise PeftError(
      f'{name}: AdaLoRA rank_pattern entry {pattern!r} is not supported; expected '
      f'a list of {init_r} booleans (the ranks kept by budget pruning).'
    )
  return np.array(pattern, bool)


def _check_alpha(name: str, alpha: float, rank: int, init_r: int) -> None:
  """PEFT replaces ``lora_alpha <= 0`` by the module's current rank, ours by
  ``init_r``: the same unless the module is pruned to ``0 < rank < init_r``."""
  if alpha <= 0 and 0 < rank < init_r:
    raise PeftError(
      f'{name}: AdaLoRA option lora_alpha={alpha} with pruned ranks is not '
      'supported (PEFT then scales by the pruned rank); expected lora_alpha > 0.'
    )


def read(
  config: Mapping[str, Any],
  name: str,
  tensors: hf_peft.Tensors,
  module: Module,
  shared: hf_peft.Tensors,
) -> tuple[str, hf_peft.Tensors, hf_peft.Tensors]:
  """``(adalora(...) spec, {a, e, b}, {})`` for module ``name``: the kept
  ranks scattered into ``init_r`` slots, pruned ones 0."""
  del module, shared
  _check_options(config, name)
  if set(tensors) != {A, E, B}:
    raise PeftError(
      f'{name}: AdaLoRA tensors {sorted(tensors)}; expected {sorted([A, E, B])}.'
    )
  init_r = int(config.get('init_r', DEFAULT_INIT_R))
  kept = kept_ranks(config, name, init_r)
  rank = int(kept.sum())
  shapes = [tensors[A].shape[0], tensors[E].shape, tensors[B].shape[1]]
  if shapes != [rank, (rank, 1), rank]:
    raise PeftError(
      f'{name}: lora_A/lora_E/lora_B shapes {tensors[A].shape}/{tensors[E].shape}/'
      f'{tensors[B].shape}; expected rank {rank} (init_r/rank_pattern).'
    )
  alpha = float(config.get('lora_alpha', DEFAULT_LORA_ALPHA))
  _check_alpha(name, alpha, rank, init_r)
  a = np.zeros((tensors[A].shape[1], init_r), tensors[A].dtype)
  e = np.zeros(init_r, tensors[E].dtype)
  b = np.zeros((init_r, tensors[B].shape[0]), tensors[B].dtype)
  a[:, kept], e[kept], b[kept] = tensors[A].T, tensors[E][:, 0], tensors[B].T
  coef = float(config.get('orth_reg_weight', DEFAULT_ORTH_REG_WEIGHT))
  spec = f'adalora(rank={init_r}, alpha={alpha}, reg_orth_coef={coef})'
  return spec, {'a': a, 'e': e, 'b': b}, {}


def write(
  kind: str, kwargs: dict, params: Any, buffers: Any, module: Module
) -> tuple[hf_peft.Tensors, dict, hf_peft.Tensors]:
  """PEFT's tensors (the ranks whose ``e`` is nonzero when any is 0) and
  options for one ``adalora`` leaf."""
  del kind, buffers
  if kwargs['reg_form'] != 'mean':
    raise PeftError(
      f'{module["weight"].path}: adalora option reg_form={kwargs["reg_form"]!r} '
      "is not PEFT's orthogonal regulariser; expected 'mean'."
    )
  a, e, b = (np.asarray(x) for x in (params.a, params.e, params.b))
  kept = e != 0
  _check_alpha(module['weight'].path, kwargs['alpha'], int(kept.sum()), kwargs['rank'])
  tensors = {A: a[:, kept].T, E: e[kept][:, None], B: b[kept].T}
  options = {
    'init_r': kwargs['rank'],
    'lora_alpha': kwargs['alpha'],
    'orth_reg_weight': kwargs['reg_orth_coef'],
    'kept': None if kept.all() else tuple(bool(k) for k in kept),
  }
  return tensors, options, {}


def config(options: dict[str, dict]) -> dict[str, Any]:
  """``adapter_config.json`` fields for the per-module options: one
  ``init_r``, ``lora_alpha`` and ``orth_reg_weight``; the pruned modules'
  masks in ``rank_pattern``; a finished budget schedule."""
  init_r = hf_peft.common(options, 'init_r')
  rank_pattern = {
    f'{name}.{E}': list(o['kept']) for name, o in sorted(options.items()) if o['kept']
  }
  return {
    'init_r': init_r,
    'target_r': init_r,
    'lora_alpha': hf_peft.common(options, 'lora_alpha'),
    'orth_reg_weight': hf_peft.common(options, 'orth_reg_weight'),
    'rank_pattern': rank_pattern or None,
    'target_modules': sorted(options),
    'total_step': 1,
    'tinit': 0,
    'tfinal': 0,
    'lora_dropout': 0.0,
    'bias': 'none',
    'fan_in_fan_out': False,
    'init_lora_weights': True,
  }


ADALORA = hf_peft.register_hf(
  hf_peft.HfMethod(
    peft_type='ADALORA',
    methods=('adalora',),
    suffixes=(A, E, B),
    read=read,
    write=write,
    config=config,
  )
)
