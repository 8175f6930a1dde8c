"""Leaf names: key paths joined with ``/``, for Linen dicts and NNX states.

A Linen ``variables['params']`` dict and an NNX ``State`` (from
``nnx.split``) name their leaves the same way: ``layers/0/kernel``. NNX
``Variable`` wrappers are looked through (their ``value`` is the leaf) and
rebuilt on the way out, so ``nnx.merge(graphdef, mapped_state)`` works. The
fields of typed adapter parameters (NamedTuples) are named by attribute:
``dense/kernel/a``. A quantized frozen weight (``QuantizedArray``) is one
leaf.
"""

import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
from flax import nnx

from peft_jax._src.base import Params
from peft_jax._src.quantized_array import is_quantized

SEPARATOR = '/'


def leaf_key(key: jax.Array, name: str) -> jax.Array:
  """The PRNG key of one named entry: depends on its name, not on tree order."""
  return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _is_leaf(x: Any) -> bool:
  return _is_variable(x) or is_quantized(x)


def _name(path: tuple[Any, ...]) -> str:
  return jax.tree_util.keystr(path, simple=True, separator=SEPARATOR)


def named_leaves(tree: Params) -> Iterator[tuple[str, Any]]:
  """Yields ``(name, leaf)`` for every leaf of ``tree``, in tree order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
  for path, leaf in flat:
    yield _name(path), (leaf.get_value() if _is_variable(leaf) else leaf)


def map_named(fn: Callable[[str, Any], Any], tree: Params) -> Params:
  """Returns ``tree`` with each leaf replaced by ``fn(name, leaf)``."""

  def visit(path, leaf):
    if _is_variable(leaf):
      return leaf.replace(fn(_name(path), leaf.get_value()))
    return fn(_name(path), leaf)

  return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=_is_leaf)


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  """``{'a/b': x, 'a/c': y}`` -> ``{'a': {'b': x, 'c': y}}`` (values kept whole)."""
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, last = name.split(SEPARATOR)
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = value
  return tree


def flatten(tree: Params) -> dict[str, Any]:
  """``{name: leaf}`` in tree order (the inverse of ``nest`` for dicts)."""
  return dict(named_leaves(tree))


def subtree(tree: Mapping[str, Any], name: str) -> Any:
  """The node of a nested dict at ``name`` (``KeyError`` if absent)."""
  node = tree
  for key in name.split(SEPARATOR):
    node = node[key]
  return node


def replace(tree: Mapping[str, Any], replacements: Mapping[str, Any]) -> dict:
  """``tree`` (nested dicts, not modified) with the node at each name replaced.

  Missing intermediate dicts are created, so this also inserts new nodes.
  """

  def put(node, keys, value):
    if not keys:
      return value
    return {**node, keys[0]: put(node.get(keys[0], {}), keys[1:], value)}

  for name, value in replacements.items():
    tree = put(tree, name.split(SEPARATOR), value)
  return dict(tree)
