"""One schedule problem under each wrapping of its method, mapped to plain leaves.

A plain problem is a frozen tree ``{name: {'kernel': w}}`` whose ``governed``
leaves use one method spec (2-D kernels, all of one shape for ``stacked``)
and whose other leaves use ``others``. ``wrapped(kind, ...)`` builds the same
problem with the method wrapped: ``mpc``, a hand-built (unnamed) copy,
``matrix_view`` over a 3-D kernel, ``stacked`` over one kernel holding the
governed leaves as layers, or both (``stacked(matrix_view(...))`` over a 4-D
kernel), with ``to``/``back`` mapping plain-layout trees
(parameters, buffers, schedule state) to the wrapped layout and back.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

import peft_jax as pj

KINDS = ('mpc', 'hand_built', 'matrix_view', 'stacked', 'stacked_matrix_view')
STACK = 'stack'


class Wrapped(NamedTuple):
  adapter: pj.TreeAdapter
  frozen: dict
  to: object
  back: object


def split_input(shape):
  """``(d_in, d_out)`` -> ``(f, d_in // f, d_out)``, f the least factor > 1."""
  d_in, d_out = shape
  f = next(f for f in range(2, d_in + 1) if d_in % f == 0)
  return (f, d_in // f, d_out)


def wrapped(kind, spec, frozen, governed, others=()):
  """The problem ``frozen`` with the ``governed`` leaves' ``spec`` wrapped.

  Args:
    kind: one of ``KINDS``.
    spec: the method's spec string.
    frozen: the plain frozen tree, ``{name: {'kernel': w}}``.
    governed: the names using ``spec``, in tree order.
    others: ``(name, spec)`` rules for the other leaves.
  """
  same = lambda tree: tree
  select = '|'.join(governed)
  rules = lambda method: [(f'({select})/kernel', method), *others]
  if kind == 'mpc':
    return Wrapped(pj.by_rules(rules(f'mpc({spec!r})')), frozen, same, same)
  if kind == 'hand_built':
    hand_built = pj.get(spec)._replace(name='')
    return Wrapped(pj.by_rules(rules(hand_built)), frozen, same, same)
  if kind in ('matrix_view', 'stacked_matrix_view'):
    frozen = {
      name: (
        {'kernel': jnp.reshape(leaf['kernel'], split_input(leaf['kernel'].shape))}
        if name in governed
        else leaf
      )
      for name, leaf in frozen.items()
    }
  if kind == 'matrix_view':
    adapter = pj.by_rules(rules(f'matrix_view({spec!r}, n_in=2)'))
    return Wrapped(adapter, frozen, same, same)
  assert kind in ('stacked', 'stacked_matrix_view')

  def to(tree):
    layers = [tree[name]['kernel'] for name in governed]
    rest = {n: v for n, v in tree.items() if n not in governed}
    return {**rest, STACK: {'kernel': jax.tree.map(lambda *x: jnp.stack(x), *layers)}}

  def back(tree):
    rest = {n: v for n, v in tree.items() if n != STACK}
    stacked = tree[STACK]['kernel']
    return {
      **rest,
      **{
        name: {'kernel': jax.tree.map(lambda x, i=i: x[i], stacked)}
        for i, name in enumerate(governed)
      },
    }

  if kind == 'stacked_matrix_view':
    spec = f'matrix_view({spec!r}, n_in=2)'
  adapter = pj.by_rules([(f'{STACK}/kernel', f'stacked({spec!r})'), *others])
  return Wrapped(adapter, to(frozen), to, back)


def map_params_like(fn, tree, params):
  """``tree`` with ``fn`` applied to every subtree shaped like ``params``.

  For optimizer states, whose moments mirror the parameters.
  """
  structure = jax.tree.structure(params)
  like = lambda node: jax.tree.structure(node) == structure
  return jax.tree.map(lambda node: fn(node) if like(node) else node, tree, is_leaf=like)
