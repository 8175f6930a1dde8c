"""Hugging Face checkpoints: one reader and one table-driven conversion.

Every model family describes its checkpoint layout as a table (a
``Layout``): one ``Tensor`` row per checkpoint tensor, naming our parameter
path and the transform that turns the stored array into our leaf (a PyTorch
``Linear.weight`` ``(d_out, d_in)`` is transposed to the Flax kernel
``(d_in, d_out)``). ``convert`` applies any table to a dict of arrays, with
the same checks for all of them: missing tensors, unexpected tensors, and
each converted leaf's shape against the model's.

Example (what each family's ``load_hf`` does)::

  config = bert.BertConfig.from_hf(read_hf_config(model_dir))
  params = load_safetensors(model_dir, bert.hf_layout(config))

A state dict already in memory (e.g. a torch model's, as numpy arrays)
converts with ``convert(tensors, bert.hf_layout(config))``; the GGUF loader
converts dequantized tensors with the Llama table renamed to GGUF names
(``gguf_loading.gguf_layout``).
"""

import json
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import transformers
from flax import traverse_util

from peft_jax._src.base import PeftError
from peft_jax._src.quantized_array import is_quantized

Params = dict[str, Any]
Transform = Callable[[np.ndarray], np.ndarray]


class Tensor(NamedTuple):
  """One row of a conversion table.

  Attributes:
    name: the checkpoint tensor's name, without the layout's prefixes
      (``encoder.layer.0.attention.self.query.weight``).
    path: our ``/``-joined parameter path
      (``encoder/layer_0/attention/query/kernel``).
    transform: float32 stored array -> our leaf (e.g. ``transpose``); None
      keeps it.
    optional: rows marked optional are loaded all or none: a checkpoint with
      none of them gives parameters without them (e.g. BERT's pooler).
  """

  name: str
  path: str
  transform: Transform | None = None
  optional: bool = False


class Layout(NamedTuple):
  """How one model's parameters are stored in a checkpoint.

  Attributes:
    tensors: the conversion table, one ``Tensor`` per stored tensor.
    abstract: the model's ``params`` shapes (``jax.eval_shape`` of ``init``),
      which the converted tree must match leaf by leaf.
    hint: what to check when the checkpoint has tensors the table does not
      expect (e.g. the config fields that add tensors), for the message.
    dtype: dtype of the converted leaves.
    prefixes: name prefixes stripped before lookup (``'bert.'``); the first
      that matches is removed.
    ignore: regexes (``re.fullmatch``) of stored tensors the model does not
      use (task heads, buffers such as ``position_ids``).
  """

  tensors: tuple[Tensor, ...]
  abstract: Params
  hint: str
  dtype: Any = jnp.float32
  prefixes: tuple[str, ...] = ()
  ignore: tuple[str, ...] = ()


Module = dict[str, Tensor]
"""One module's rows by parameter name (``'weight'``, ``'bias'``)."""


def modules(
  rows: Iterable[Tensor], rename: Callable[[str], str] = lambda name: name
) -> dict[str, Module]:
  """A conversion table grouped by module: ``{module name: {param: row}}``.

  Args:
    rows: the table (``'<module>.<param>'`` names).
    rename: table module name -> the module's name in the full transformers
      model (e.g. adding ``'model.'``).

  Returns:
    ``{'model.layers.0.self_attn.q_proj': {'weight': Tensor(...)}, ...}``:
    the module names PEFT adapters use, with our parameter paths.
  """
  table: dict[str, Module] = {}
  for row in rows:
    module, _, param = row.name.rpartition('.')
    table.setdefault(rename(module), {})[param] = row
  return table


def nested(rows: Iterable[Tensor], prefix: str, encoder: str) -> list[Tensor]:
  """An encoder's rows inside a task model: names under ``prefix``
  (``'bert.'``), paths under ``encoder`` (``'bert'``), none optional."""
  return [
    row._replace(name=prefix + row.name, path=f'{encoder}/{row.path}', optional=False)
    for row in rows
  ]


def task_modules(
  rows: Iterable[Tensor], prefix: str, encoder: str, head: Iterable[Tensor]
) -> dict[str, Module]:
  """The module table of a task model: the encoder's ``rows`` nested under
  ``prefix``/``encoder`` (see ``nested``) plus the ``head`` rows as they are."""
  return modules([*nested(rows, prefix, encoder), *head])


def task_layout(
  base: Layout,
  prefix: str,
  encoder: str,
  head: Iterable[Tensor],
  head_abstract: Params,
) -> Layout:
  """The layout of a task checkpoint (``bert.*`` + ``classifier.*``): the
  encoder's ``base`` layout nested (see ``nested``; its ``ignore`` patterns
  under ``prefix`` too), plus the ``head`` rows and their shapes; no name
  prefix is stripped."""
  rows = [
    row._replace(name=prefix + row.name, path=f'{encoder}/{row.path}')
    for row in base.tensors
  ]
  return base._replace(
    tensors=(*rows, *head),
    abstract={encoder: base.abstract, **head_abstract},
    prefixes=(),
    ignore=tuple(re.escape(prefix) + pattern for pattern in base.ignore),
  )


def dense_shapes(d_in: int, d_out: int) -> Params:
  """``{'kernel': (d_in, d_out), 'bias': (d_out,)}`` as float32 shape structs."""
  return {
    'kernel': jax.ShapeDtypeStruct((d_in, d_out), jnp.float32),
    'bias': jax.ShapeDtypeStruct((d_out,), jnp.float32),
  }


def transpose(w: np.ndarray) -> np.ndarray:
  """A PyTorch ``Linear.weight`` ``(d_out, d_in)`` as a Flax kernel."""
  return w.T


def dense(name: str, path: str, *, bias: bool = True) -> Iterator[Tensor]:
  """The rows of a ``Linear`` module ``name`` -> Flax ``Dense`` at ``path``."""
  yield Tensor(f'{name}.weight', f'{path}/kernel', transpose)
  if bias:
    yield Tensor(f'{name}.bias', f'{path}/bias')


def embedding(name: str, path: str) -> Iterator[Tensor]:
  """The row of an ``Embedding`` module -> Flax ``Embed`` at ``path``."""
  yield Tensor(f'{name}.weight', f'{path}/embedding')


def norm(name: str, path: str, *, bias: bool = True) -> Iterator[Tensor]:
  """The rows of a LayerNorm (``bias``) or RMSNorm -> ``scale`` (``bias``)."""
  yield Tensor(f'{name}.weight', f'{path}/scale')
  if bias:
    yield Tensor(f'{name}.bias', f'{path}/bias')


def optional(rows: Iterable[Tensor]) -> Iterator[Tensor]:
  """``rows`` marked ``optional`` (loaded all or none)."""
  for row in rows:
    yield row._replace(optional=True)


def convert(tensors: Mapping[str, np.ndarray], layout: Layout) -> Params:
  """Converts stored tensors to a ``params`` tree by the layout's table.

  Args:
    tensors: stored tensor name -> array (names may carry a layout prefix).
    layout: the model's table and checks.

  Returns:
    The ``params`` tree: ``transform(float32 array)`` at each row's path,
    in ``layout.dtype`` (``QuantizedArray`` tensors stay quantized).

  Raises:
    PeftError: naming the missing tensors, the unexpected ones (neither in
      the table nor ignored), or the first leaf whose shape differs from
      ``layout.abstract``.
  """
  tensors = {_strip(name, layout.prefixes): w for name, w in tensors.items()}
  rows, abstract = _present(layout, tensors)
  _check_names(tensors, rows, layout)
  flat = {}
  for row in rows:
    w = _as_float32(tensors[row.name])
    w = w if row.transform is None else row.transform(w)
    flat[row.path] = _as_param(w, layout.dtype)
  params = traverse_util.unflatten_dict(flat, sep='/')
  _check_shapes(params, abstract)
  return params


def _as_float32(w: Any) -> Any:
  """A stored tensor as float32 NumPy; a ``QuantizedArray`` as it is (its
  transforms are the transpose and row permutations it supports)."""
  return w if is_quantized(w) else np.asarray(w, np.float32)


def _as_param(w: Any, dtype: Any) -> Any:
  """A converted tensor as a ``dtype`` device array; a ``QuantizedArray``
  keeps its codes and dequantizes to ``dtype``."""
  if is_quantized(w):
    return jax.tree.map(jnp.asarray, w.astype(dtype))
  return jnp.asarray(w, dtype)


def _strip(name: str, prefixes: tuple[str, ...]) -> str:
  """``name`` without the first of ``prefixes`` it starts with."""
  for prefix in prefixes:
    if name.startswith(prefix):
      return name.removeprefix(prefix)
  return name


def _present(layout: Layout, tensors: Mapping[str, Any]) -> tuple[list, Params]:
  """The rows to load and their shapes: optional rows only if any is stored."""
  rows = list(layout.tensors)
  dropped = [r for r in rows if r.optional]
  if any(r.name in tensors for r in dropped):
    return rows, layout.abstract
  drop = {r.path for r in dropped}
  flat = traverse_util.flatten_dict(layout.abstract, sep='/')
  abstract = {k: v for k, v in flat.items() if k not in drop}
  rows = [r for r in rows if not r.optional]
  return rows, traverse_util.unflatten_dict(abstract, sep='/')


def _check_names(tensors: Mapping[str, Any], rows: list, layout: Layout) -> None:
  """Raises naming the missing tensors, then the unexpected ones."""
  expected = {row.name for row in rows}
  missing = [row.name for row in rows if row.name not in tensors]
  if missing:
    raise PeftError(
      f'Checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:4]}; it '
      f'has {len(tensors)} tensors, e.g. {sorted(tensors)[:4]}.'
    )
  ignore = [re.compile(pattern) for pattern in layout.ignore]
  unexpected = sorted(
    name
    for name in tensors.keys() - expected
    if not any(p.fullmatch(name) for p in ignore)
  )
  if unexpected:
    raise PeftError(
      f'Checkpoint has {len(unexpected)} unexpected tensor(s), e.g. '
      f'{unexpected[:4]}, for the config given ({layout.hint}).'
    )


def _check_shapes(params: Any, abstract: Any) -> None:
  """Raises naming the first leaf whose shape differs from the model's.

  Args:
    params: a converted ``params`` tree.
    abstract: the model's parameter shapes (e.g. ``jax.eval_shape`` of init).

  Raises:
    PeftError: naming the leaf and both shapes (None: absent).
  """
  want = traverse_util.flatten_dict(abstract, sep='/')
  got = traverse_util.flatten_dict(params, sep='/')
  for name in sorted(want.keys() | got.keys()):
    want_shape = tuple(want[name].shape) if name in want else None
    got_shape = tuple(got[name].shape) if name in got else None
    if want_shape != got_shape:
      raise PeftError(
        f'Parameter {name!r} has shape {got_shape} but the model expects '
        f'{want_shape} (None: absent); the config and the weights disagree.'
      )


def read_hf_config(model_dir: str | os.PathLike) -> Any:
  """The ``transformers`` config of a Hugging Face checkpoint directory.

  Args:
    model_dir: a directory with ``config.json``.

  Returns:
    ``transformers.AutoConfig.from_pretrained(model_dir)``.

  Raises:
    PeftError: if ``config.json`` is absent.
  """
  if not (pathlib.Path(model_dir) / 'config.json').is_file():
    raise PeftError(
      f'No config.json in {str(model_dir)!r}; expected a Hugging Face checkpoint '
      'directory with config.json and safetensors weights.'
    )
  return transformers.AutoConfig.from_pretrained(model_dir)


def _safetensors_files(model_dir: str | os.PathLike) -> list[pathlib.Path]:
  """``model.safetensors``, or the shards its index lists.

  Raises:
    PeftError: if neither file is there, or a listed shard is missing.
  """
  model_dir = pathlib.Path(model_dir)
  single = model_dir / 'model.safetensors'
  index = model_dir / 'model.safetensors.index.json'
  if single.is_file():
    return [single]
  if not index.is_file():
    raise PeftError(
      f'No model.safetensors or model.safetensors.index.json in '
      f'{str(model_dir)!r}; only safetensors checkpoints are supported.'
    )
  weight_map = json.loads(index.read_text())['weight_map']
  files = [model_dir / f for f in sorted(set(weight_map.values()))]
  for f in files:
    if not f.is_file():
      raise PeftError(f'Shard {f.name!r} listed in {index} does not exist.')
  return files


def tensor_names(model_dir: str | os.PathLike) -> set[str]:
  """The tensor names of a checkpoint directory, from the file headers only
  (no tensor is read).

  Raises:
    PeftError: as ``read_safetensors``.
  """
  names = set()
  for f in _safetensors_files(model_dir):
    with safetensors.safe_open(f, framework='numpy') as shard:
      names.update(shard.keys())
  return names


def read_safetensors(model_dir: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every tensor of ``model.safetensors``, or of the shards of its index.

  Args:
    model_dir: a Hugging Face checkpoint directory.

  Returns:
    ``{torch tensor name: numpy array}``.

  Raises:
    PeftError: if neither file is there, or a listed shard is missing.
  """
  tensors = {}
  for f in _safetensors_files(model_dir):
    with safetensors.safe_open(f, framework='numpy') as shard:
      for name in shard.keys():  # noqa: SIM118 (safe_open is not a dict)
        tensors[name] = shard.get_tensor(name)
  return tensors


def load_safetensors(model_dir: str | os.PathLike, layout: Layout) -> Params:
  """``convert`` of a directory's safetensors (``read_safetensors``).

  Args:
    model_dir: a Hugging Face checkpoint directory.
    layout: the model's table and checks.

  Returns:
    The converted ``params`` tree.

  Raises:
    PeftError: from ``read_safetensors`` or ``convert``, naming the directory.
  """
  tensors = read_safetensors(model_dir)
  try:
    return convert(tensors, layout)
  except PeftError as e:
    raise PeftError(f'{model_dir}: {e}') from None
