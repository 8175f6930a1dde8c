"""Hugging Face PEFT adapter folders <-> peft_jax adapters.

A PEFT adapter folder holds ``adapter_config.json`` (``peft_type``, the
method's options, ``target_modules``, ...) and ``adapter_model.safetensors``,
whose tensors are named ``base_model.model.<module>.<suffix>``: ``<module>``
is the module's name in the transformers model (``model.layers.0.self_attn.
q_proj``) and ``<suffix>`` the method's tensor (``lora_A.weight``), in torch
layout. ``load_hf_adapter`` turns one into rules, a ``TreeAdapter`` and its
``(params, buffers)`` for one of our models; ``save_hf_adapter`` writes the
folder back, which ``peft.PeftModel.from_pretrained`` loads unchanged.

The adapted modules are exactly those the file holds tensors for, which are
the modules PEFT selected by ``target_modules``, ``layers_to_transform``,
``layers_pattern`` and ``exclude_modules`` when it saved them; each becomes
one exact rule. Per-module options (``rank_pattern``, ``alpha_pattern``) are
resolved as PEFT resolves them (``get_pattern_key``). Modules trained in full
(``modules_to_save``, e.g. a classifier head) become ``full()`` leaves.

Activation-side types (prompt tuning, P-tuning, prefix tuning, adaption
prompt) map to our hook-point adapters instead: their ``HfMethod`` has ``read_points`` /
``write_point``, ``load_hf_adapter`` then needs ``hooks =
pj.hook_points(model, ids)``, and ``save_hf_adapter`` writes ``plan.hooks``.

The method tables (one ``HfMethod`` per PEFT type) live beside this file, one
per method; the module names of each model family live beside its loader
(``hf_modules``).
"""

import collections
import difflib
import json
import os
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
from safetensors import numpy as safetensors_numpy

from peft_jax._src import paths, registry
from peft_jax._src.base import (
  ActivationAdapter,
  AdapterParams,
  Buffers,
  PeftError,
  TreeAdapter,
)
from peft_jax._src.checkpoint import fill_like, host_arrays
from peft_jax._src.tree import by_rules
from peft_jax.models import llama
from peft_jax.models.checkpoints import Module

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
PREFIX = 'base_model.model.'
SHARED_PREFIX = 'base_model.'  # VeRA's base_model.vera_A: outside any module
SAVED = 'modules_to_save'
PARAMS = ('weight', 'bias')  # what a modules_to_save copy stores per module
# The PEFT release whose format and semantics the tests check (OFT's
# parametrisation changed in 0.18: PEFT warns when a folder says older).
PEFT_VERSION = '0.21.2'

Tensors = dict[str, np.ndarray]
# (spec, params fields, buffer fields) of one adapted leaf or hook point.
Read = tuple[str, Tensors, Tensors]


class HfMethod(NamedTuple):
  """How one PEFT type maps to our methods, per module.

  A weight-space type has ``suffixes``, ``read``, ``write`` and ``config``;
  an activation-side type ``read_points``, ``write_point`` and ``config``.

  Attributes:
    peft_type: the ``peft_type`` of ``adapter_config.json`` (``'LORA'``).
    methods: our method names it covers (``('lora', 'dora')``).
    suffixes: the tensor names after the module name (``'lora_A.weight'``).
    read: ``(config, module name, {suffix: array}, module, shared) -> (spec,
      params, buffers)``: our method spec and its parameter and buffer
      fields (``{field: array}``, Flax layout; field ``''`` for a bare
      array) for one module; ``config`` is ``adapter_config.json``,
      ``shared`` the method's ``shared`` tensors.
    write: ``(method name, kwargs, params, buffers, module) -> ({suffix:
      array}, options, shared)``: PEFT's tensors, the options this module
      needs (e.g. ``{'r': 8, 'lora_alpha': 16.0}``) and its share of the
      ``shared`` tensors (every leaf that writes one must agree on it).
    config: ``{module name or hook point: options} -> adapter_config
      fields`` (common values, patterns for the rest; raises for options
      PEFT cannot mix).
    shared: names of tensors stored once for all modules, outside any
      module (VeRA's ``vera_A``, ``vera_B``).
    per_param: the method trains module parameters one by one (LN tuning's
      ``<module>.ln_tuning_layers.weight`` and ``.bias``): the last part of
      each suffix names the parameter, ``read``/``write`` run once per
      parameter with ``module = {param: row}``, and the leaf is that row's.
    read_points: ``(config, tensors, hooks) -> {hook point: (spec, params,
      buffers)}``: an activation-side type's whole folder (``tensors`` named
      as ``_read_folder`` names them) as our hook-point adapters, for the
      model's ``hooks`` (``pj.hook_points``).
    write_point: ``(method name, kwargs, params, buffers, hook point,
      modules) -> (tensors, options)``: PEFT's tensors of one hook point,
      by full name (``model.layers.1.self_attn.adaption_prompt``, or a
      ``top_level`` name), and its options; ``modules`` is the module table.
    top_level: names of tensors stored bare, outside ``base_model``
      (prompt learning's ``prompt_embeddings``).
    combine: ``tensors -> tensors``: the hook points' written tensors as
      the file stores them (prefix tuning's per-layer slices -> one
      ``prompt_embeddings``); None keeps them.
    task_types: the ``task_type`` values the type supports (empty: any).
  """

  peft_type: str
  methods: tuple[str, ...]
  config: Callable[[dict[str, dict]], dict[str, Any]]
  suffixes: tuple[str, ...] = ()
  read: Callable[..., Read] | None = None
  write: Callable[..., tuple[Tensors, dict, Tensors]] | None = None
  shared: tuple[str, ...] = ()
  per_param: bool = False
  read_points: Callable[..., dict[str, Read]] | None = None
  write_point: Callable[..., tuple[Tensors, dict]] | None = None
  top_level: tuple[str, ...] = ()
  task_types: tuple[str, ...] = ()
  combine: Callable[[Tensors], Tensors] | None = None


class HfAdapter(NamedTuple):
  """An adapter read from a PEFT folder.

  Attributes:
    rules: the ``(regex, spec)`` rules, one per adapted leaf.
    adapter: ``by_rules(rules)``.
    params: its trainable parameters (typed, Flax layout).
    buffers: its buffers.
    config: ``adapter_config.json`` as read.
  """

  rules: list[tuple[str, str]]
  adapter: TreeAdapter
  params: AdapterParams
  buffers: Buffers
  config: dict[str, Any]


_METHODS: dict[str, HfMethod] = {}


def register_hf(method: HfMethod) -> HfMethod:
  """Adds a PEFT type's table (done by each ``peft_jax/interop/<method>.py``)."""
  _METHODS[method.peft_type] = method
  return method


def refuse_options(
  config: Mapping[str, Any], where: str, method: str, unsupported
) -> None:
  """Raises naming the first option of ``unsupported`` — ``(field, no-op
  values)`` or ``(field, no-op values, why)`` — whose value in ``config`` is
  not one of its no-op values (the first is the expected one)."""
  for field, no_ops, *why in unsupported:
    if config.get(field) not in no_ops:
      reason = f' ({why[0]})' if why else ''
      raise PeftError(
        f'{where}: {method} option {field}={config[field]!r} is not supported; '
        f'expected {no_ops[0]!r}{reason}.'
      )


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
  """``patterns[key]`` for the first key with ``(.*\\.)?key$`` matching
  ``module`` (PEFT's ``get_pattern_key``), else ``default``."""
  for key, value in patterns.items():
    if re.match(rf'(.*\.)?({key})$', module):
      return value
  return default


def _read_folder(adapter_dir: pathlib.Path) -> tuple[dict[str, Any], Tensors]:
  """``(adapter_config.json, tensors)``: names without ``base_model.model.``,
  a method's ``shared`` tensor ``base_model.<name>`` as ``<name>`` and its
  ``top_level`` tensors as they are."""
  config_path, weights_path = adapter_dir / CONFIG_FILE, adapter_dir / WEIGHTS_FILE
  for path in (config_path, weights_path):
    if not path.is_file():
      bin_note = (
        ' (adapter_model.bin is not read: save with safe_serialization=True)'
        if (adapter_dir / 'adapter_model.bin').exists()
        else ''
      )
      raise PeftError(
        f'{path} does not exist; expected a PEFT adapter folder{bin_note}.'
      )
  config = json.loads(config_path.read_text())
  method = _METHODS.get(config.get('peft_type'))
  shared = method.shared if method else ()
  top_level = method.top_level if method else ()
  tensors = {}
  with safetensors.safe_open(str(weights_path), framework='numpy') as f:
    for name in f.keys():  # noqa: SIM118
      if name.startswith(PREFIX):
        tensors[name.removeprefix(PREFIX)] = f.get_tensor(name)
      elif name.removeprefix(SHARED_PREFIX) in shared:
        tensors[name.removeprefix(SHARED_PREFIX)] = f.get_tensor(name)
      elif name in top_level:
        tensors[name] = f.get_tensor(name)
      else:
        raise PeftError(
          f'{weights_path}: tensor {name!r} is not under {PREFIX!r} nor one '
          f'that {config.get("peft_type")} stores outside it.'
        )
  return config, tensors


def _method(config: Mapping[str, Any], where: str) -> HfMethod:
  peft_type = config.get('peft_type')
  if peft_type not in _METHODS:
    raise PeftError(
      f'{where}: peft_type {peft_type!r} is not supported; expected one of '
      f'{sorted(_METHODS)}.'
    )
  method = _METHODS[peft_type]
  _check_task_type(method, config.get('task_type'), where)
  return method


def _check_task_type(method: HfMethod, task_type: str | None, where: str) -> None:
  if method.task_types and task_type not in method.task_types:
    raise PeftError(
      f'{where}: {method.peft_type} with task_type {task_type!r} is not '
      f'supported; expected one of {list(method.task_types)}.'
    )


def is_target(targets: str | list[str] | None, name: str) -> bool:
  """PEFT's module selection: a string is ``re.fullmatch``ed, a list matches
  the module name or a ``.``-separated suffix of it."""
  if isinstance(targets, str):
    return re.fullmatch(targets, name) is not None
  return any(name == t or name.endswith('.' + t) for t in targets or ())


def _saved(targets, module: str) -> bool:
  """Whether ``module`` is, or is inside, one of ``modules_to_save`` (PEFT
  saves a container such as RoBERTa's ``classifier`` as its submodules)."""
  parts = module.split('.')
  return any(is_target(targets, '.'.join(parts[:i])) for i in range(1, len(parts) + 1))


def _split(
  config: Mapping[str, Any],
  tensors: Tensors,
  method: HfMethod,
  modules: Mapping[str, Module],
  where: str,
) -> tuple[dict[str, Tensors], dict[str, Tensors], Tensors]:
  """``(adapted, saved, shared)``: per module, the method's tensors by suffix;
  the ``modules_to_save`` copies by parameter (``weight``, ``bias``; PEFT
  names them ``<module>.<param>``); the method's ``shared`` tensors."""
  adapted: dict[str, Tensors] = collections.defaultdict(dict)
  saved: dict[str, Tensors] = collections.defaultdict(dict)
  shared: Tensors = {}
  for name, value in tensors.items():
    if name in method.shared:
      shared[name] = value
      continue
    suffix = next((s for s in method.suffixes if name.endswith('.' + s)), None)
    module, _, param = name.rpartition('.')
    if suffix is None and _saved(config.get(SAVED), module) and param in PARAMS:
      saved[module][param] = value
      continue
    if suffix is None:
      raise PeftError(
        f"{where}: tensor {name!r} is not one of {method.peft_type}'s "
        f'{list(method.suffixes)}; this PEFT option is not supported.'
      )
    adapted[name.removesuffix('.' + suffix)][suffix] = value
  for module in [*adapted, *saved]:
    if module not in modules:
      close = difflib.get_close_matches(module, modules, n=3, cutoff=0)
      raise PeftError(
        f'{where}: module {module!r} has no counterpart in this model '
        f'(is it the model the adapter was trained on?); closest: {close}.'
      )
  return dict(adapted), dict(saved), shared


def _leaf(module: Module, name: str, param: str, where: str) -> str:
  """Our path of parameter ``param`` of module ``name``."""
  if param not in module:
    raise PeftError(
      f'{where}: module {name!r} has no {param!r} parameter here; it has '
      f'{sorted(module)}.'
    )
  return module[param].path


def load_hf_adapter(
  adapter_dir: str | os.PathLike,
  modules: Mapping[str, Module],
  frozen: Any,
  hooks: Mapping[str, Any] | None = None,
) -> HfAdapter:
  """Reads a PEFT adapter folder for one of our models.

  Args:
    adapter_dir: the folder (``adapter_config.json`` +
      ``adapter_model.safetensors``).
    modules: the model family's module table, ``hf_modules(...)`` of its
      loader (or ``peft_jax.interop.hf_modules(model)``).
    frozen: the model's ``params`` (arrays or ``jax.ShapeDtypeStruct``s),
      unrolled layout.
    hooks: the model's hook points, ``pj.hook_points(model, ids)``; needed
      for activation-side types (prompt tuning, adaption prompt), whose
      adapters act there.

  Returns:
    An ``HfAdapter``: ``adapter.apply(frozen, params, buffers)`` is the
    adapted model PEFT runs (up to float32 round-off).

  Raises:
    PeftError: for a missing file, an unsupported ``peft_type``, option or
      ``task_type``, a module or hook point the model does not have, or a
      shape that does not fit.
  """
  adapter_dir = pathlib.Path(adapter_dir)
  config, tensors = _read_folder(adapter_dir)
  where = str(adapter_dir)
  method = _method(config, where)
  if method.read_points is None:
    leaves, values, buffer_values = _read_modules(
      config, tensors, method, modules, where
    )
  else:
    leaves, values, buffer_values = _read_points(config, tensors, method, hooks, where)
  rules = _rules(leaves)
  adapter = by_rules(rules)
  params, buffers = _typed(where, adapter, frozen, hooks, values, buffer_values)
  return HfAdapter(rules, adapter, params, buffers, config)


def _typed(
  where: str,
  adapter: TreeAdapter,
  frozen: Any,
  hooks: Mapping[str, Any] | None,
  values: Tensors,
  buffer_values: Tensors,
) -> tuple[AdapterParams, Buffers]:
  """``(params, buffers)`` of ``adapter`` on ``frozen``, typed as its
  ``init`` makes them, from flat ``{name: array}`` values (shapes checked,
  dtypes cast)."""
  like = jax.eval_shape(
    lambda key, w: adapter.init(key, w, hooks), jax.random.key(0), frozen
  )
  as_like = lambda v, s: jnp.asarray(v, s.dtype)
  return tuple(
    jax.tree.map(as_like, fill_like(where, part, flat, tree), tree)
    for part, flat, tree in zip(
      ('params', 'buffers'), (values, buffer_values), like, strict=True
    )
  )


def _read_points(
  config: dict[str, Any],
  tensors: Tensors,
  method: HfMethod,
  hooks: Mapping[str, Any] | None,
  where: str,
) -> tuple[dict[str, str], Tensors, Tensors]:
  """``({hook point: spec}, params, buffers)`` of an activation-side type,
  each point one of ``hooks``."""
  if hooks is None:
    raise PeftError(
      f'{where}: {method.peft_type} adapts activations; pass '
      'hooks=pj.hook_points(model, ids).'
    )
  points = method.read_points(config, tensors, hooks)
  leaves, values, buffer_values = {}, {}, {}
  for point, (spec, fields, buffer_fields) in points.items():
    if point not in hooks:
      close = difflib.get_close_matches(point, hooks, n=3, cutoff=0)
      raise PeftError(
        f'{where}: hook point {point!r} is not in this model; closest: {close}.'
      )
    leaves[point] = spec
    values.update(_named(point, fields))
    buffer_values.update(_named(point, buffer_fields))
  return leaves, values, buffer_values


def _read_modules(
  config: dict[str, Any],
  tensors: Tensors,
  method: HfMethod,
  modules: Mapping[str, Module],
  where: str,
) -> tuple[dict[str, str], Tensors, Tensors]:
  """``({leaf: spec}, params, buffers)`` of a weight-space type, plus the
  ``modules_to_save`` copies as ``full()`` leaves."""
  adapted, saved, shared = _split(config, tensors, method, modules, where)
  leaves, values, buffer_values = {}, {}, {}
  for name, module_tensors in sorted(adapted.items()):
    for param, module, param_tensors in _parts(method, modules[name], module_tensors):
      leaf = _leaf(modules[name], name, param, where)
      spec, fields, buffer_fields = method.read(
        config, name, param_tensors, module, shared
      )
      leaves[leaf] = spec
      values.update(_named(leaf, fields))
      buffer_values.update(_named(leaf, buffer_fields))
  for name, params in sorted(saved.items()):
    for param, value in sorted(params.items()):
      row = modules[name].get(param)
      if row is None:
        raise PeftError(f'{where}: no {param!r} parameter in module {name!r}.')
      leaves[row.path] = 'full()'
      values[row.path] = value if row.transform is None else row.transform(value)
  return leaves, values, buffer_values


def _parts(method: HfMethod, module: Module, tensors: Tensors):
  """``(param, module, tensors)`` per leaf: the module's ``weight`` with all
  its tensors, or for a ``per_param`` method each parameter its suffixes
  name, with ``module = {param: row}``."""
  if not method.per_param:
    return [('weight', module, tensors)]
  params = sorted({suffix.rpartition('.')[2] for suffix in tensors})
  return [
    (
      param,
      {param: module[param]} if param in module else {},  # _leaf refuses {}.
      {s: v for s, v in tensors.items() if s.rpartition('.')[2] == param},
    )
    for param in params
  ]


def _named(leaf: str, fields: Tensors) -> Tensors:
  """``{leaf/field: array}`` (``leaf`` itself for field ``''``)."""
  return {f'{leaf}/{f}' if f else leaf: v for f, v in fields.items()}


def _rules(leaves: dict[str, str]) -> list[tuple[str, str]]:
  """One rule per distinct spec, matching exactly its leaves (in order of
  first appearance)."""
  by_spec: dict[str, list[str]] = {}
  for leaf, spec in leaves.items():
    by_spec.setdefault(spec, []).append(re.escape(leaf))
  return [
    (names[0] if len(names) == 1 else f'({"|".join(names)})', spec)
    for spec, names in by_spec.items()
  ]


LAYER_LEAF = re.compile(r'layers_(\d+)/(.+)')
LAYER_MODULE = re.compile(r'model\.layers\.(\d+)\.')


def num_layers(modules: Mapping[str, Module]) -> int:
  """The decoder layers of a module table (``model.layers.{i}.*``)."""
  return max(int(m[1]) for m in map(LAYER_MODULE.match, modules) if m) + 1


def scan_layout(
  hf: HfAdapter, frozen: Any, hooks: Mapping[str, Any] | None = None
) -> HfAdapter:
  """``hf`` for the same model with ``scan_layers=True``.

  Each per-layer rule ``layers_{i}/<path>`` becomes one rule at
  ``layers/<path>``: weight methods wrapped in ``stacked(...)``, hook-point
  methods as they are (``nn.scan`` slices their parameters); ``params`` and
  ``buffers`` are stacked along a leading layer axis (``llama.stack_layers``).
  PEFT folders that adapt some layers only (``layers_to_transform``) or
  give layers different options (``rank_pattern``) have no stacked form.

  Args:
    hf: what ``load_hf_adapter`` read (unrolled layout).
    frozen: the scanned model's ``params`` (``stack_layers`` of the
      unrolled ones).
    hooks: the scanned model's hook points, for hook-point adapters.

  Returns:
    The ``HfAdapter`` whose ``adapter.apply(frozen, params, buffers)`` is the
    scanned model PEFT runs.

  Raises:
    PeftError: naming a path that not every layer adapts alike.
  """
  num_layers = {np.shape(x)[0] for x in jax.tree.leaves(frozen.get('layers', {}))}
  if len(num_layers) != 1:
    raise PeftError("scan_layout: frozen has no scanned 'layers' subtree.")
  (total,) = num_layers
  per_path: dict[str, dict[int, str]] = {}
  rules = []
  for selector, spec in hf.rules:
    for leaf in selector.removeprefix('(').removesuffix(')').split('|'):
      leaf = re.sub(r'\\(.)', r'\1', leaf)  # undo re.escape
      match = LAYER_LEAF.fullmatch(leaf)
      if match is None:
        rules.append((re.escape(leaf), spec))
      else:
        per_path.setdefault(match[2], {})[int(match[1])] = spec
  for path, specs in per_path.items():
    if sorted(specs) != list(range(total)) or len(set(specs.values())) != 1:
      raise PeftError(
        f'scan_layout: layers/{path} is adapted in layers {sorted(specs)} of '
        f'{total} with {len(set(specs.values()))} specs; a scanned model needs '
        'every layer adapted alike (use the unrolled layout).'
      )
    (spec,) = set(specs.values())
    activation = isinstance(registry.get(spec), ActivationAdapter)
    rules.append(
      (f'layers/{re.escape(path)}', spec if activation else f'stacked({spec!r})')
    )
  adapter = by_rules(rules)
  params, buffers = _typed(
    'scan_layout',
    adapter,
    frozen,
    hooks,
    *(paths.flatten(_stack_layers(tree)) for tree in (hf.params, hf.buffers)),
  )
  return HfAdapter(rules, adapter, params, buffers, hf.config)


def _stack_layers(tree: Any) -> Any:
  """``llama.stack_layers`` of a tree with ``layers_{i}`` keys; others as
  they are."""
  if not isinstance(tree, dict) or not any(
    re.fullmatch(r'layers_\d+', k) for k in tree
  ):
    return tree
  return llama.stack_layers(tree)


def save_hf_adapter(
  adapter_dir: str | os.PathLike,
  adapter: TreeAdapter,
  frozen: Any,
  params: AdapterParams,
  buffers: Buffers,
  modules: Mapping[str, Module],
  **config_fields: Any,
) -> pathlib.Path:
  """Writes a PEFT adapter folder that ``PeftModel.from_pretrained`` loads.

  Args:
    adapter_dir: the folder to write (created; its two files replaced).
    adapter: a ``by_rules`` adapter whose methods one PEFT type covers
      (e.g. ``lora``/``dora`` on linear kernels, plus ``full`` leaves of
      whole modules written as ``modules_to_save``; or ``prompt_tuning`` at
      ``input_embeddings``, ``adaption_prompt`` at the top layers' points).
    frozen: the model's ``params`` (unrolled layout).
    params, buffers: the adapter's values.
    modules: the model family's module table (``hf_modules``).
    **config_fields: extra ``adapter_config.json`` fields, e.g.
      ``base_model_name_or_path`` or ``task_type`` (``'CAUSAL_LM'``,
      ``'SEQ_CLS'``).

  Returns:
    The folder.

  Raises:
    PeftError: naming a leaf whose method PEFT cannot represent, a module
      the table does not know, or options one PEFT config cannot mix.

  Under ``jax.distributed`` every process calls it (parameters spanning
  processes are gathered) and process 0 alone writes.
  """
  params, buffers = jax.tree.map(jnp.asarray, host_arrays((params, buffers)))
  plan = adapter.plan(frozen, params, buffers)
  by_path = {
    row.path: (name, param) for name, m in modules.items() for param, row in m.items()
  }
  tensors, options, saved, method = {}, {}, set(), None
  for leaf, entry in sorted(plan.weights.items()):
    if leaf not in by_path:
      raise PeftError(f'save_hf_adapter: {leaf!r} is not a parameter PEFT can name.')
    name, param = by_path[leaf]
    kind, _, kwargs = registry.parse(entry.adapter.name or '?')
    if kind == 'full':
      row = modules[name][param]
      value = np.asarray(entry.params)
      tensors[f'{name}.{param}'] = value if row.transform is None else value.T
      saved.add(name)
      continue
    method = _covering(leaf, param, entry.adapter.name or kind, kind, method)
    module = {param: modules[name][param]} if method.per_param else modules[name]
    module_tensors, module_options, module_shared = method.write(
      kind, kwargs, entry.params, entry.buffers, module
    )
    options.setdefault(name, {}).update(module_options)
    tensors.update({f'{name}.{s}': v for s, v in module_tensors.items()})
    _add_shared(tensors, module_shared, leaf)
  for point, entry in sorted(plan.hooks.items()):
    kind, _, kwargs = registry.parse(entry.adapter.name or '?')
    method = _covering(point, None, entry.adapter.name or kind, kind, method)
    point_tensors, options[point] = method.write_point(
      kind, kwargs, entry.params, entry.buffers, point, modules
    )
    _add_shared(tensors, point_tensors, point)
  if method is None:
    raise PeftError('save_hf_adapter: no leaf uses a method PEFT can write.')
  if method.read_points and saved:
    raise PeftError(
      f'save_hf_adapter: {method.peft_type} with modules_to_save '
      f'({sorted(saved)[0]!r}) is not written.'
    )
  fields = (
    method.config(options)
    if method.read_points
    else {
      **_compact(method.config(options), modules),
      'modules_to_save': _containers(saved, modules) or None,
    }
  )
  config = {
    'peft_type': method.peft_type,
    **fields,
    'inference_mode': True,
    'peft_version': PEFT_VERSION,
    **config_fields,
  }
  _check_task_type(method, config.get('task_type'), 'save_hf_adapter')
  if method.combine is not None:
    tensors = method.combine(tensors)
  return _write_folder(pathlib.Path(adapter_dir), config, tensors, method)


def _add_shared(tensors: Tensors, shared: Tensors, leaf: str) -> None:
  """Adds a leaf's shared tensors; one another leaf wrote must be equal."""
  for name, value in shared.items():
    if name in tensors and not np.array_equal(tensors[name], value):
      raise PeftError(
        f'save_hf_adapter: {leaf!r} needs a different {name!r} than earlier '
        'leaves; PEFT stores one for all modules.'
      )
    tensors[name] = np.asarray(value)


def _compact(config: dict[str, Any], modules: Mapping[str, Module]) -> dict[str, Any]:
  """``target_modules`` (and ``feedforward_modules``) as short names
  (``['q_proj', 'v_proj']``) where those select exactly the listed modules
  among the model's linear ones; full names otherwise."""
  linear = [m for m, rows in modules.items() if rows['weight'].transform is not None]
  targets = config['target_modules']
  short = short_names(targets, linear)
  config = {**config, 'target_modules': short}
  if config.get('feedforward_modules'):
    selected = [m for m in linear if is_target(short, m)]
    config['feedforward_modules'] = short_names(config['feedforward_modules'], selected)
  return config


def short_names(names: list[str], universe: list[str]) -> list[str]:
  """The last components of ``names`` if, as PEFT matches a list, they select
  exactly ``names`` from ``universe``; else ``names``."""
  short = sorted({n.rpartition('.')[2] for n in names})
  return short if {m for m in universe if is_target(short, m)} == set(names) else names


def _containers(saved: set[str], modules: Mapping[str, Module]) -> list[str]:
  """``modules_to_save`` names: a parent module (RoBERTa's ``classifier``)
  when all its submodules in the table are saved, as PEFT saves and wraps
  it; the modules themselves otherwise."""
  names = set(saved)
  for parent in {m.rpartition('.')[0] for m in saved} - {''}:
    children = {m for m in modules if m.startswith(parent + '.')}
    if children <= saved:
      names = (names - children) | {parent}
  return sorted(names)


def _covering(
  leaf: str, param: str | None, spec: str, kind: str, previous: HfMethod | None
) -> HfMethod:
  """The one PEFT type that writes ``kind`` at a parameter (``param``) or
  hook point (``None``), the same as the earlier leaves'."""
  method = next((m for m in _METHODS.values() if kind in m.methods), None)
  fits = method is not None and (
    method.write_point is not None
    if param is None
    else method.write is not None and (param == 'weight' or method.per_param)
  )
  if not fits:
    supported = sorted(k for m in _METHODS.values() for k in m.methods)
    raise PeftError(
      f'save_hf_adapter: {leaf!r} uses {spec!r}, which PEFT cannot represent; '
      f'supported: {supported} on linear kernels or their hook points, full() '
      'for modules_to_save.'
    )
  if previous is not None and method is not previous:
    raise PeftError(
      f'save_hf_adapter: {leaf!r} needs peft_type {method.peft_type!r} but '
      f'earlier leaves need {previous.peft_type!r}; one folder holds one type.'
    )
  return method


def _stored_name(name: str, method: HfMethod) -> str:
  """A tensor's name in the file: ``top_level`` ones bare, ``shared`` ones
  ``base_model.<name>``, the others under ``base_model.model.``."""
  if name in method.top_level:
    return name
  return (SHARED_PREFIX if name in method.shared else PREFIX) + name


def _write_folder(
  adapter_dir: pathlib.Path,
  config: dict[str, Any],
  tensors: Tensors,
  method: HfMethod,
) -> pathlib.Path:
  """Writes both files (each replaced atomically), tensors named by
  ``_stored_name``; under ``jax.distributed``, process 0 alone."""
  if jax.process_index() != 0:
    return adapter_dir
  adapter_dir.mkdir(parents=True, exist_ok=True)
  weights = {
    _stored_name(n, method): np.ascontiguousarray(v, np.float32)
    for n, v in tensors.items()
  }
  tmp = adapter_dir / f'{WEIGHTS_FILE}.tmp'
  safetensors_numpy.save_file(weights, str(tmp))
  os.replace(tmp, adapter_dir / WEIGHTS_FILE)
  tmp = adapter_dir / f'{CONFIG_FILE}.tmp'
  tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + '\n')
  os.replace(tmp, adapter_dir / CONFIG_FILE)
  return adapter_dir


def common_or_patterns(
  values: dict[str, Any], field: str, pattern_field: str
) -> dict[str, Any]:
  """``{field: the most common value, pattern_field: {escaped module: value}}``
  for the modules whose value differs (PEFT's ``rank_pattern`` style)."""
  counts = collections.Counter(values.values())
  common = counts.most_common(1)[0][0]
  return {
    field: common,
    pattern_field: {re.escape(m): v for m, v in sorted(values.items()) if v != common},
  }


def option(options: dict[str, dict], key: str) -> dict[str, Any]:
  """``{module name or hook point: its value of option key}``."""
  return {name: o[key] for name, o in options.items()}


def common(options: dict[str, dict], key: str) -> Any:
  """The one value of option ``key`` that every module or hook point shares
  (``uniform``)."""
  return uniform(option(options, key), key)


def point_layers(options: dict[str, dict]) -> tuple[list[int], int]:
  """``(the points' layers, sorted; the model's number of layers)`` from
  per-layer options ``{'layer': i, 'num_layers': L, ...}``."""
  return sorted(o['layer'] for o in options.values()), common(options, 'num_layers')


def uniform(values: dict[str, Any], field: str) -> Any:
  """The one value all modules share, or an error naming two that differ."""
  distinct = sorted(set(values.values()), key=repr)
  if len(distinct) > 1:
    a = next(m for m, v in values.items() if v == distinct[0])
    b = next(m for m, v in values.items() if v == distinct[1])
    raise PeftError(
      f'save_hf_adapter: one PEFT config has one {field}; {a!r} has '
      f'{distinct[0]!r} and {b!r} has {distinct[1]!r}.'
    )
  return distinct[0]
