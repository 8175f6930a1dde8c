"""PEFT's ``FOURIERFT`` type <-> ``fourierft``.

Per module PEFT stores ``fourierft_spectrum: (n,)`` only (``n``:
``n_frequency`` or ``n_frequency_pattern``'s value), and ``ΔW = scaling ·
Re(ifft2(F))`` with ``F: (d_out, d_in)`` zero but at ``n`` frequencies from
``torch.randperm(d_out·d_in)`` seeded with ``random_loc_seed``. The
frequencies are not in the file; ``fourierft`` recomputes torch's
permutation exactly (``torch_randperm_prefix``), so ours is
``fourierft(n_frequency=n, scaling, seed=random_loc_seed)`` with the same
spectrum. Exact for kernels under ``(2³² − 1) // 20`` entries (about 2·10⁸;
larger ones make torch draw 64-bit numbers, not reproduced).
"""

import collections
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from peft_jax._src.base import PeftError
from peft_jax.interop import hf_peft
from peft_jax.models.checkpoints import Module

SPECTRUM = 'fourierft_spectrum'

# Options whose non-default values change the model in ways ``fourierft``
# does not express: (field, its no-op values).
_UNSUPPORTED = (
  ('fan_in_fan_out', (False, None)),
  ('bias', ('none', None)),
)


def _check_options(config: Mapping[str, Any], where: str) -> None:
  hf_peft.refuse_options(config, where, 'FourierFT', _UNSUPPORTED)


def n_frequency(config: Mapping[str, Any], name: str) -> int:
  """PEFT's ``n`` for module ``name``: the first ``n_frequency_pattern`` key
  ``k`` with ``.*\\.k$`` matching ``name`` (a key matching the whole name
  does not), else the key equal to ``name``, else ``n_frequency``."""
  patterns = config.get('n_frequency_pattern') or {}
  key = next((k for k in patterns if re.match(rf'.*\.{k}$', name)), name)
  return patterns.get(key, config['n_frequency'])


def _pattern_key(name: str) -> str:
  """A key PEFT's ``n_frequency_pattern`` resolves to module ``name`` only:
  the name after its first component, escaped (``layers\\.0\\.mlp\\.up_proj``
  for ``model.layers.0.mlp.up_proj``), or a one-component name as is."""
  _, dot, rest = name.partition('.')
  return re.escape(rest) if dot else name


def read(
  config: Mapping[str, Any],
  name: str,
  tensors: hf_peft.Tensors,
  module: Module,
  shared: hf_peft.Tensors,
) -> tuple[str, hf_peft.Tensors, hf_peft.Tensors]:
  """``(fourierft(...) spec, {spectrum}, {})`` for module ``name``."""
  del module, shared
  _check_options(config, name)
  spectrum = tensors[SPECTRUM]
  wanted = n_frequency(config, name)
  if spectrum.shape != (wanted,):
    raise PeftError(
      f'{name}: fourierft_spectrum has shape {spectrum.shape}, but '
      f'n_frequency/n_frequency_pattern give {wanted}.'
    )
  spec = (
    f'fourierft(n_frequency={wanted}, scaling={float(config["scaling"])}, '
    f'seed={config["random_loc_seed"]})'
  )
  return spec, {'spectrum': spectrum}, {}


def write(
  kind: str, kwargs: dict, params: Any, buffers: Any, module: Module
) -> tuple[hf_peft.Tensors, dict, hf_peft.Tensors]:
  """PEFT's ``fourierft_spectrum`` and options for one ``fourierft`` leaf."""
  del kind, buffers, module
  options = {
    'n_frequency': kwargs['n_frequency'],
    'scaling': kwargs['scaling'],
    'random_loc_seed': kwargs['seed'],
  }
  return {SPECTRUM: np.asarray(params.spectrum)}, options, {}


def config(options: dict[str, dict]) -> dict[str, Any]:
  """``adapter_config.json`` fields for the per-module options."""
  sizes = hf_peft.option(options, 'n_frequency')
  common = collections.Counter(sizes.values()).most_common(1)[0][0]
  patterns = {_pattern_key(m): n for m, n in sorted(sizes.items()) if n != common}
  return {
    'n_frequency': common,
    'n_frequency_pattern': patterns,
    'scaling': hf_peft.common(options, 'scaling'),
    'random_loc_seed': hf_peft.common(options, 'random_loc_seed'),
    'target_modules': sorted(options),
    'bias': 'none',
    'fan_in_fan_out': False,
    'init_weights': False,
  }


FOURIERFT = hf_peft.register_hf(
  hf_peft.HfMethod(
    peft_type='FOURIERFT',
    methods=('fourierft',),
    suffixes=(SPECTRUM,),
    read=read,
    write=write,
    config=config,
  )
)
