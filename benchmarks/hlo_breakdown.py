r"""Where the time of the LoRA step goes: a per-op breakdown of its compiled HLO.

  python -m benchmarks.hlo_breakdown --size reference --compile-repeats 5
  python -m benchmarks.hlo_breakdown --size smoke --out /tmp/hlo.json
  python -m benchmarks.hlo_breakdown --size reference --dtype float32 \
      --settings jax_lora_weight,jax_lora_factored --compile-repeats 5 \
      --out benchmarks/results/hlo_breakdown_float32.json

Writes JSON (device, jax version, date, command, a row per setting) and a
Markdown report: ``benchmarks/results/hlo_breakdown.{json,md}`` at the
reference size, ``hlo_breakdown_SIZE.*`` at others, or ``--out``.

For each JAX setting of ``benchmarks.lora_step`` the training step is lowered
and compiled for abstract arguments (``jax.eval_shape`` of its state: no
weight is materialised), weights and compute in ``--dtype`` (bfloat16, as the
reference runs on a GPU; XLA:CPU computes a bfloat16 dot in float32 and
converts around it, so float32 shows a CPU compile without that rewrite),
on the default backend, and its optimized HLO
(``compiled.as_text()``) is read op by op. Every op that runs (in the entry
computation, in while bodies times their trip count, in calls; a fusion is
one op, classified by what is inside it) falls in one category:

  dot:projection  the full-size matmuls (frozen kernels under LoRA)
  dot:adapter     a contracting or non-batch output dimension equal to the rank
  dot:attention   batched dots (q·kᵀ, p·v and their gradients)
  dot:lm_head     a contracting or output dimension equal to the vocabulary
  elementwise     the other fusions and elementwise ops (norms, rotary, AdamW)
  reduction       a reduce at the root of the fusion
  layout          transpose, copy, slice, concatenate, pad, reverse
  convert         dtype conversions (with index/layout ops only)
  slice/gather    dynamic-(update-)slice, gather, scatter (with layout ops)
  collective      all-reduce, all-gather, all-to-all, ... (none on one device)
  custom-call     library calls (e.g. cuDNN attention on a GPU)

FLOPs of a dot are ``2 · prod(output dims) · prod(contracting dims)`` (of a
convolution ``2 · output elements · rhs elements / output features``). Bytes
of an op are its operands' plus its result's sizes, except that an operand
read only through a dynamic-slice or gather counts that slice, and a
dynamic-update-slice counts its update, not the buffer it writes in place.
Bytes of ops that touch an attention-score array (a multiple of half of
``batch·heads·seq²`` elements with last dimension ``seq``, or of a quarter
with ``seq / 2``: the two query halves of ``layers.attention``'s causal
split) are also reported apart:
on a GPU that work is inside cuDNN's flash attention.
The phase of an op comes from its ``metadata={op_name=...}``, else from the
enclosing loop's: ``transpose(`` is the backward pass (under remat the
forward recomputed there included), ``jvp(`` the forward pass, another name
the optimizer (with the step's bookkeeping), no name at all ``other``.

XLA's ``cost_analysis()`` counts a while body once, not times its trip
count: the FLOPs are checked against it counted the same way
(``dot_flops_once + other_flops_once``). The converts the program itself
asks for are read from the HLO before optimization (``lowered``), apart
from those XLA adds.

The Markdown report keeps whatever an existing one has above its first
``## Generated`` heading (the reading, written by hand).

With ``--compile-repeats R`` each setting's ``lower(...).compile()`` is
timed R times, each in a fresh process with the compilation cache off, the
settings interleaved, with the 1-minute load average at each timing.
"""

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

from benchmarks import lora_step

# ---------------------------------------------------------------------------
# Parsing the HLO text.

BYTES = {
  'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2,
  's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
  'c128': 16, 'token': 0,
}  # fmt: skip
_SHAPE = re.compile(r'(\w+)\[([\d,]*)\]')
_HEADER = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)(\s*\(.*->.*)?\s*\{\s*$')


@dataclasses.dataclass(frozen=True)
class Array:
  """One array of an HLO shape: ``dtype`` and ``dims``."""

  dtype: str
  dims: tuple[int, ...]

  @property
  def bytes(self) -> int:
    return math.prod(self.dims) * BYTES.get(self.dtype, 1)


@dataclasses.dataclass(frozen=True)
class Instruction:
  """``[ROOT] %name = shape opcode(args), attributes``.

  ``arrays`` lists the result's arrays (several for a tuple); ``operands``
  the operand names in ``args`` (the text between the parentheses, also a
  parameter's number or a constant's value); ``attributes`` the text after.
  """

  name: str
  arrays: tuple[Array, ...]
  opcode: str
  operands: tuple[str, ...]
  args: str
  attributes: str
  is_root: bool

  @property
  def bytes(self) -> int:
    return sum(a.bytes for a in self.arrays)

  @property
  def op_name(self) -> str:
    """The ``op_name`` of the metadata, ``''`` without one."""
    found = re.search(r'op_name="([^"]*)"', self.attributes)
    return found.group(1) if found else ''

  def dims(self, key: str) -> tuple[int, ...]:
    """An attribute ``key={1,2}`` as a tuple (``()`` if absent)."""
    found = re.search(rf'\b{key}=\{{([\d,]*)\}}', self.attributes)
    return tuple(int(d) for d in found.group(1).split(',') if d) if found else ()

  def called(self, key: str) -> list[str]:
    """The computations named by ``key=%c`` or ``key={%c, %d}``."""
    found = re.search(rf'\b{key}=(\{{[^}}]*\}}|%?[\w.\-]+)', self.attributes)
    names = re.findall(r'%?[\w.\-]+', found.group(1)) if found else []
    return [n.lstrip('%') for n in names]


@dataclasses.dataclass
class Computation:
  name: str
  instructions: list[Instruction]
  is_entry: bool

  @property
  def root(self) -> Instruction:
    return next(i for i in self.instructions if i.is_root)


@dataclasses.dataclass
class Module:
  """The computations of an HLO module and every instruction by name."""

  computations: dict[str, Computation]
  by_name: dict[str, Instruction]

  @property
  def entry(self) -> Computation:
    return next(c for c in self.computations.values() if c.is_entry)

  def fused(self, op: Instruction) -> Computation:
    """The computation a fusion calls."""
    return self.computations[op.called('calls')[0]]

  def array(self, name: str) -> Array:
    """The (first) array of the value ``name``."""
    return self.by_name[name].arrays[0]


def _balanced(text: str, start: int) -> int:
  """The index just past the parenthesis that closes the one at ``start``."""
  depth = 0
  for index in range(start, len(text)):
    depth += {'(': 1, ')': -1}.get(text[index], 0)
    if depth == 0:
      return index + 1
  raise ValueError(f'unbalanced parentheses: {text[start : start + 80]!r}')


def _operand_names(args: str) -> tuple[str, ...]:
  """The names in an operand list, ``%a, %b`` or typed ``f32[2]{0} %a, b``:
  the last word of each top-level comma-separated item."""
  items, depth, start = [], 0, 0
  for index, char in enumerate(args + ','):
    depth += {'(': 1, '[': 1, '{': 1, ')': -1, ']': -1, '}': -1}.get(char, 0)
    if char == ',' and depth == 0:
      items += args[start:index].split()[-1:]
      start = index + 1
  return tuple(item.lstrip('%') for item in items)


def parse_instruction(line: str) -> Instruction:
  """One instruction line (comments ``/*...*/`` already removed)."""
  is_root = line.lstrip().startswith('ROOT ')
  name, rest = line.strip().removeprefix('ROOT ').split(' = ', 1)
  end = _balanced(rest, 0) if rest.startswith('(') else rest.index(' ')
  shape, rest = rest[:end], rest[end:].lstrip()
  opcode = rest[: rest.index('(')]
  close = _balanced(rest, len(opcode))
  args = rest[len(opcode) + 1 : close - 1]
  operands = () if opcode in ('constant', 'parameter') else _operand_names(args)
  arrays = tuple(
    Array(dtype, tuple(int(d) for d in dims.split(',') if d))
    for dtype, dims in _SHAPE.findall(shape)
  )
  return Instruction(
    name.lstrip('%'), arrays, opcode, operands, args, rest[close:], is_root
  )


def parse_module(text: str) -> Module:
  """Every computation of an HLO module's text, optimized
  (``compiled.as_text()``) or not (``lowered.as_text(dialect='hlo')``)."""
  text = re.sub(r'/\*.*?\*/', '', text)
  computations, current = {}, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = Computation(header.group(2), [], bool(header.group(1)))
      computations[current.name] = current
    elif line.strip() == '}':
      current = None
    elif current is not None and ' = ' in line:
      current.instructions.append(parse_instruction(line))
  by_name = {i.name: i for c in computations.values() for i in c.instructions}
  return Module(computations, by_name)


# ---------------------------------------------------------------------------
# What runs: ops with their runs per step and phases.

PHASES = ('forward', 'backward', 'optimizer', 'other')
FREE = {
  'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast',
  'after-all', 'add-dependency', 'opt-barrier', 'partition-id', 'replica-id',
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Executed:
  """An op that runs ``times`` times per step, in ``phase``."""

  op: Instruction
  times: int
  phase: str


def phase_of(op_name: str, default: str) -> str:
  """``backward`` for ``transpose(``, ``forward`` for ``jvp(``, ``optimizer``
  for another name; ``default`` (the enclosing op's phase) without one."""
  if not op_name:
    return default
  if 'transpose(' in op_name:
    return 'backward'
  return 'forward' if 'jvp(' in op_name else 'optimizer'


def trip_count(module: Module, op: Instruction) -> int:
  """A while loop's trip count: XLA's ``known_trip_count``, else the one
  scalar constant of its condition (``i < n``), else 1."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', op.attributes)
  if known:
    return int(known.group(1))
  condition = module.computations[op.called('condition')[0]]
  constants = [
    i for i in condition.instructions if i.opcode == 'constant' and not i.arrays[0].dims
  ]
  if len(constants) == 1 and constants[0].args.isdigit():
    return int(constants[0].args)
  return 1


def executed(module: Module) -> Iterator[Executed]:
  """The ops that do work, from the entry computation down through while
  bodies (times their trip count), calls and conditional branches (each
  branch counted: an upper bound); fusions are not entered here."""

  def walk(computation: Computation, times: int, phase: str):
    for op in computation.instructions:
      here = phase_of(op.op_name, phase)
      if op.opcode == 'while':
        inner = times * trip_count(module, op)
        for name in op.called('body') + op.called('condition'):
          yield from walk(module.computations[name], inner, here)
      elif op.opcode in ('call', 'conditional'):
        names = op.called('to_apply') + op.called('branch_computations')
        names += op.called('true_computation') + op.called('false_computation')
        for name in names:
          yield from walk(module.computations[name], times, here)
      elif op.opcode not in FREE:
        yield Executed(op, times, here)

  yield from walk(module.entry, 1, 'other')


# ---------------------------------------------------------------------------
# Dots.


@dataclasses.dataclass(frozen=True)
class Dims:
  """The sizes that identify adapter, LM-head and attention work.

  ``scores`` is the element count of one layer's attention scores
  (``batch · heads · seq²``); ``kernels`` the shapes of the frozen kernels
  (stacked and per layer).
  """

  rank: int
  vocab: int
  seq: int
  scores: int
  kernels: frozenset = frozenset()

  def is_scores(self, array: Array) -> bool:
    """Whether ``array`` holds attention scores (of one or more layers).

    Its last dimension is ``seq`` and its size a multiple of half a layer's
    scores, or (the first query half of ``layers.attention``'s causal split,
    which sees the first half of the keys) ``seq / 2`` and a quarter.
    """
    if not array.dims or array.dims[-1] not in (self.seq, self.seq // 2):
      return False
    block = self.scores // 2 if array.dims[-1] == self.seq else self.scores // 4
    return math.prod(array.dims) % block == 0


def dot_flops(module: Module, op: Instruction) -> int:
  """``2 · prod(output) · prod(contracting)`` for a dot; ``2 · output
  elements · rhs elements / output features`` for a convolution."""
  lhs, rhs = (module.array(n) for n in op.operands[:2])
  out = math.prod(op.arrays[0].dims)
  if op.opcode == 'dot':
    return 2 * out * math.prod(lhs.dims[d] for d in op.dims('lhs_contracting_dims'))
  labels = re.search(r'dim_labels=\w+_(\w+)->', op.attributes).group(1)
  return 2 * out * math.prod(rhs.dims) // rhs.dims[labels.index('o')]


def dot_kind(module: Module, op: Instruction, dims: Dims) -> str:
  """``adapter`` (the rank among the contracting or non-batch output sizes),
  ``lm_head`` (the vocabulary among them), ``attention`` (batched), else
  ``projection``. Convolutions are ``projection``."""
  if op.opcode != 'dot':
    return 'projection'
  lhs = module.array(op.operands[0])
  contracting = [lhs.dims[d] for d in op.dims('lhs_contracting_dims')]
  batch = len(op.dims('lhs_batch_dims'))
  sizes = contracting + list(op.arrays[0].dims[batch:])
  if dims.rank in sizes:
    return 'adapter'
  if dims.vocab in sizes:
    return 'lm_head'
  return 'attention' if batch else 'projection'


# ---------------------------------------------------------------------------
# Classifying an op and counting its bytes.

DOTS = {'dot', 'convolution'}
MOVE = {'transpose', 'copy', 'slice', 'concatenate', 'pad', 'reverse', 'reshape'}
INDEX = {'dynamic-slice', 'dynamic-update-slice', 'gather', 'scatter'}
REDUCE = {'reduce', 'reduce-window', 'select-and-scatter', 'sort'}
COLLECTIVE = re.compile(
  r'^(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter|'
  r'collective-broadcast|send|recv)'
)
TRIVIAL = FREE | {'broadcast', 'iota'}


def inner_ops(module: Module, op: Instruction) -> list[Instruction]:
  """The ops of a fusion's computation (nested fusions entered), else ``[op]``."""
  if op.opcode != 'fusion':
    return [op]
  ops = []
  for inner in module.fused(op).instructions:
    ops += inner_ops(module, inner) if inner.opcode == 'fusion' else [inner]
  return ops


def root_ops(module: Module, op: Instruction) -> list[Instruction]:
  """A fusion's root (each element of a tuple root), else ``[op]``."""
  if op.opcode != 'fusion':
    return [op]
  root = module.fused(op).root
  return (
    [module.by_name[n] for n in root.operands] if root.opcode == 'tuple' else [root]
  )


def category(module: Module, op: Instruction) -> str:
  """The op's category (module docstring), from the set ``S`` of its
  non-trivial opcodes (a fusion's, inside it): a dot in ``S`` → dot; a
  collective → collective; a custom call → custom-call; a reduce at the
  root → reduction; ``S ⊆ MOVE ∪ INDEX ∪ {convert}`` → convert if it has
  one, else slice/gather if ``S`` meets ``INDEX``, else layout; anything
  else → elementwise."""
  ops = {i.opcode for i in inner_ops(module, op)} - TRIVIAL
  if ops & DOTS:
    return 'dot'
  if any(COLLECTIVE.match(o) for o in ops):
    return 'collective'
  if 'custom-call' in ops:
    return 'custom-call'
  if any(r.opcode in REDUCE for r in root_ops(module, op)):
    return 'reduction'
  if ops and ops <= MOVE | INDEX | {'convert'}:
    if 'convert' in ops:
      return 'convert'
    return 'slice/gather' if ops & INDEX else 'layout'
  return 'elementwise'


def _read_bytes(fused: Computation, name: str, size: int) -> int:
  """Bytes read of the fusion parameter ``name`` (``size`` bytes): the
  slices taken of it when every use is a dynamic-slice or gather of it,
  none when it is only the buffer of in-place dynamic-update-slices, else
  all of it."""
  users = [i for i in fused.instructions if name in i.operands]
  if users and all(u.opcode in ('dynamic-slice', 'gather') for u in users):
    return sum(u.bytes for u in users if u.operands[0] == name)
  if users and all(
    u.opcode == 'dynamic-update-slice' and u.operands[0] == name for u in users
  ):
    return 0
  return size


def _written_bytes(module: Module, op: Instruction) -> int:
  """The result's bytes; for a dynamic-update-slice (root) its update's."""
  return sum(
    module.by_name[r.operands[1]].bytes
    if r.opcode == 'dynamic-update-slice'
    else r.bytes
    for r in root_ops(module, op)
  )


def op_bytes(module: Module, op: Instruction) -> int:
  """Bytes an op reads and writes (``_read_bytes``, ``_written_bytes``)."""
  operand_bytes = [module.by_name[n].bytes for n in op.operands]
  if op.opcode == 'fusion':
    fused = module.fused(op)
    params = {
      int(i.args): i.name for i in fused.instructions if i.opcode == 'parameter'
    }
    reads = sum(
      _read_bytes(fused, params[k], size) for k, size in enumerate(operand_bytes)
    )
  elif op.opcode in ('dynamic-slice', 'gather'):
    reads = op.bytes + sum(operand_bytes[1:])
  elif op.opcode == 'dynamic-update-slice':
    reads = sum(operand_bytes[1:])
  else:
    reads = sum(operand_bytes)
  return reads + _written_bytes(module, op)


def touches_scores(module: Module, op: Instruction, dims: Dims) -> bool:
  """Whether the op reads or writes an attention-score array."""
  arrays = [*op.arrays, *(a for n in op.operands for a in module.by_name[n].arrays)]
  return any(dims.is_scores(a) for a in arrays)


def converts(module: Module, op: Instruction, dims: Dims) -> list[tuple[str, int]]:
  """``(label, output bytes)`` of each convert in ``op``: labels like
  ``'bf16->f32 kernel'``, where the input is shaped like a frozen kernel,
  ``scores`` (attention scores) or ``activation`` (anything else)."""
  found = []
  for inner in inner_ops(module, op):
    if inner.opcode == 'convert':
      source = module.array(inner.operands[0])
      kind = (
        'kernel'
        if source.dims in dims.kernels
        else 'scores'
        if dims.is_scores(source)
        else 'activation'
      )
      found.append((f'{source.dtype}->{inner.arrays[0].dtype} {kind}', inner.bytes))
  return found


def rewrites_buffer(module: Module, op: Instruction) -> bool:
  """Whether a fusion holds a dynamic-update-slice whose buffer is not one
  of its parameters (e.g. ``convert`` of it): not written in place, so the
  whole buffer is read and written at each run. XLA:CPU makes these of
  bfloat16 loop-carried stacks (it updates them in float32)."""
  if op.opcode != 'fusion':
    return False
  return any(
    i.opcode == 'dynamic-update-slice'
    and module.by_name[i.operands[0]].opcode != 'parameter'
    for i in inner_ops(module, op)
  )


def other_flops(module: Module, op: Instruction) -> int:
  """XLA's count for a non-dot op, roughly: one FLOP per result element of
  each op in it that computes (not ``TRIVIAL``, ``MOVE`` or ``INDEX``)."""
  return sum(
    math.prod(a.dims)
    for i in inner_ops(module, op)
    if i.opcode not in TRIVIAL | MOVE | INDEX
    for a in i.arrays
  )


def classify(module: Module, op: Instruction, dims: Dims) -> tuple[str, int]:
  """``(category, FLOPs of one run)``, dots as ``dot:KIND`` (``dot_kind``;
  a fusion of dots of several kinds under the kind with the most FLOPs)."""
  name = category(module, op)
  if name != 'dot':
    return name, 0
  by_kind = {}
  for dot in inner_ops(module, op):
    if dot.opcode in DOTS:
      kind = dot_kind(module, dot, dims)
      by_kind[kind] = by_kind.get(kind, 0) + dot_flops(module, dot)
  return 'dot:' + max(by_kind, key=by_kind.get), sum(by_kind.values())


# ---------------------------------------------------------------------------
# The breakdown.


def _add(entry: dict, **values: int) -> dict:
  """Adds ``values`` into ``entry`` (missing keys start at 0)."""
  for key, value in values.items():
    entry[key] = entry.get(key, 0) + value
  return entry


def breakdown(text: str, dims: Dims, top: int = 10) -> dict:
  """Counts, FLOPs and bytes per category and phase of an HLO module.

  Returns ``categories``: ``{category: {ops, runs, flops, bytes,
  scores_bytes, by_phase: {phase: {runs, flops, bytes}}}}`` (``ops``
  counts HLO instructions, ``runs`` their runs per step, loop bodies times
  their trip count; ``scores_bytes`` the bytes of ops that touch attention
  scores); ``converts``: ``{label: {where: {runs, bytes}}}`` (``label``
  from ``converts``; the converted arrays' bytes; ``where`` is ``written``
  for a convert op or convert fusion, which writes its result to memory,
  ``fused`` for one inside another op); ``rewritten``: ``{ops, runs,
  bytes}`` of the fusions that ``rewrites_buffer``; ``largest``: the ``top``
  ops by bytes per step; and the totals ``dot_flops``, ``bytes`` (per step)
  and ``dot_flops_once``, ``other_flops_once``, ``bytes_once`` (each
  instruction once, as XLA's ``cost_analysis`` counts loop bodies).
  """
  module = parse_module(text)
  categories, found, ops, once = {}, {}, [], {}
  rewritten = {'ops': 0, 'runs': 0, 'bytes': 0}
  for run in executed(module):
    name, flops = classify(module, run.op, dims)
    size = op_bytes(module, run.op)
    other = 0 if flops else other_flops(module, run.op)
    _add(once, dot_flops_once=flops, other_flops_once=other, bytes_once=size)
    step = {'runs': run.times, 'flops': flops * run.times, 'bytes': size * run.times}
    scores = step['bytes'] if touches_scores(module, run.op, dims) else 0
    row = _add(categories.setdefault(name, {'by_phase': {}}), ops=1, **step)
    _add(row, scores_bytes=scores)
    _add(row['by_phase'].setdefault(run.phase, {}), **step)
    for label, converted in converts(module, run.op, dims):
      where = 'written' if name == 'convert' else 'fused'
      entry = found.setdefault(label, {}).setdefault(where, {})
      _add(entry, runs=run.times, bytes=converted * run.times)
    if rewrites_buffer(module, run.op):
      _add(rewritten, ops=1, runs=run.times, bytes=step['bytes'])
    ops.append(_describe(module, run, name, size))
  ops.sort(key=lambda o: -o['bytes'])
  return {
    'categories': categories,
    'converts': found,
    'rewritten': rewritten,
    'largest': ops[:top],
    'dot_flops': sum(r['flops'] for r in categories.values()),
    'bytes': sum(r['bytes'] for r in categories.values()),
    **once,
  }


def _describe(module: Module, run: Executed, name: str, size: int) -> dict:
  """A row of the largest-ops list: the op, its inner opcodes and shapes."""
  inner = [i.opcode for i in inner_ops(module, run.op) if i.opcode not in TRIVIAL]
  shape = lambda a: f'{a.dtype}{list(a.dims)}'.replace(' ', '')
  return {
    'op': run.op.name,
    'category': name,
    'phase': run.phase,
    'runs': run.times,
    'bytes': size * run.times,
    'result': ' '.join(shape(a) for a in run.op.arrays),
    'operands': ' '.join(shape(module.array(n)) for n in run.op.operands),
    'inner': ','.join(dict.fromkeys(inner)),
  }


# ---------------------------------------------------------------------------
# Compiling a setting for abstract arguments.


def abstract_step(setting: str, size: str, dtype: str = 'bfloat16'):
  """``(train_step, abstract (state, frozen, ids), shape)``: nothing is
  materialised (``jax.eval_shape`` of ``lora_step.jax_step``'s builder)."""
  import jax

  shape = lora_step.Shape(**lora_step.SIZES[size])
  train_step, arguments = lora_step.jax_step(setting, shape, dtype)
  return train_step, jax.eval_shape(arguments), shape


def dims_of(shape: lora_step.Shape, frozen) -> Dims:
  """``Dims`` of a benchmark shape; kernels are the frozen leaves of two or
  more dimensions, stacked and per layer."""
  import jax

  kernels = {tuple(x.shape) for x in jax.tree.leaves(frozen) if len(x.shape) >= 2}
  kernels |= {k[1:] for k in kernels if len(k) >= 3}
  return Dims(
    rank=lora_step.RANK,
    vocab=shape.vocab_size,
    seq=shape.seq,
    scores=shape.batch * shape.num_heads * shape.seq**2,
    kernels=frozenset(kernels),
  )


def analyse(setting: str, size: str, dtype: str = 'bfloat16') -> dict:
  """One setting's breakdown, XLA's totals beside it, and the converts of
  the program before optimization."""
  import jax

  train_step, (state, frozen, ids), shape = abstract_step(setting, size, dtype)
  start = time.perf_counter()
  lowered = train_step.lower(state, frozen, ids)
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  memory = compiled.memory_analysis()
  dims = dims_of(shape, frozen)
  program = breakdown(lowered.as_text(dialect='hlo'), dims)
  return {
    'setting': setting,
    'size': size,
    'shape': dataclasses.asdict(shape),
    'lower_compile_s': seconds,
    'xla_flops': cost['flops'],
    'xla_bytes_accessed': cost['bytes accessed'],
    'temp_bytes': memory.temp_size_in_bytes,
    'argument_bytes': memory.argument_size_in_bytes,
    'device': jax.devices()[0].device_kind,
    'program_converts': program['converts'],
    'program_dot_flops': program['dot_flops'],
    **breakdown(compiled.as_text(), dims),
  }


def compile_seconds(setting: str, size: str, dtype: str = 'bfloat16') -> dict:
  """Wall and CPU seconds (all threads of this process) of
  ``train_step.lower(abstract args).compile()``."""
  train_step, arguments, _ = abstract_step(setting, size, dtype)
  wall, cpu = time.perf_counter(), time.process_time()
  train_step.lower(*arguments).compile()
  return {'wall_s': time.perf_counter() - wall, 'cpu_s': time.process_time() - cpu}


def time_compiles(
  settings: list[str], size: str, repeats: int, dtype: str = 'bfloat16'
) -> dict:
  """Each setting's compile seconds in a fresh process per sample (rounds
  of the settings in turn, compilation cache off), with the 1-minute load
  average before each; medians of wall and CPU seconds."""
  env = {**os.environ, 'JAX_ENABLE_COMPILATION_CACHE': 'false'}
  samples = {s: [] for s in settings}
  for _ in range(repeats):
    for setting in settings:
      command = [sys.executable, '-m', 'benchmarks.hlo_breakdown', '--size', size,
                 '--dtype', dtype, '--compile-one', setting]  # fmt: skip
      load = os.getloadavg()[0]
      done = subprocess.run(
        command, capture_output=True, text=True, env=env, check=True
      )
      sample = {**json.loads(done.stdout.strip().splitlines()[-1]), 'load_1min': load}
      samples[setting].append(sample)
      print(f'compile {setting}: {sample}', file=sys.stderr)
  median = lambda v, key: statistics.median(x[key] for x in v)
  return {
    s: {'median_wall_s': median(v, 'wall_s'), 'median_cpu_s': median(v, 'cpu_s'),
        'samples': v}
    for s, v in samples.items()
  }  # fmt: skip


def compile_ratios(timing: dict, over: str, under: str) -> dict:
  """``over / under``: of the median wall and CPU seconds, and the median of
  the rounds' wall ratios (each round's two compiles ran back to back)."""
  a, b = timing[over], timing[under]
  rounds = [
    x['wall_s'] / y['wall_s'] for x, y in zip(a['samples'], b['samples'], strict=True)
  ]
  return {
    'wall': a['median_wall_s'] / b['median_wall_s'],
    'cpu': a['median_cpu_s'] / b['median_cpu_s'],
    'wall_per_round': statistics.median(rounds),
  }


# ---------------------------------------------------------------------------
# Report.

CATEGORY_ORDER = (
  'dot:projection', 'dot:adapter', 'dot:attention', 'dot:lm_head', 'elementwise',
  'reduction', 'layout', 'convert', 'slice/gather', 'collective', 'custom-call',
)  # fmt: skip


def gb(size: float) -> str:
  """Bytes as GB: one decimal from 1 GB, else three significant digits."""
  value = size / 1e9
  return f'{value:,.1f}' if value >= 1 else f'{value:.3g}'


def table(row: dict) -> list[str]:
  """One setting's Markdown table: a line per category."""
  head = ('category | HLO ops | runs/step | GFLOP | GB | % of GB | GB on scores | '
          'GB fwd | GB bwd | GB opt | GB other')  # fmt: skip
  lines = [f'| {head} |', '|---' * 11 + '|']
  for name in CATEGORY_ORDER:
    c = row['categories'].get(name)
    if c is None:
      continue
    phases = ' | '.join(gb(c['by_phase'].get(p, {}).get('bytes', 0)) for p in PHASES)
    lines.append(
      f'| {name} | {c["ops"]} | {c["runs"]:,} | {c["flops"] / 1e9:,.1f} | '
      f'{gb(c["bytes"])} | {100 * c["bytes"] / row["bytes"]:.1f} | '
      f'{gb(c["scores_bytes"])} | {phases} |'
    )
  return lines


def setting_section(row: dict) -> list[str]:
  xla_once = row['dot_flops_once'] + row['other_flops_once']
  rewritten = row['rewritten']
  lines = [
    f'### {row["setting"]}',
    '',
    f'Dot FLOPs per step, counted from shapes: {row["dot_flops"] / 1e12:.2f} T '
    f'(before optimization: {row["program_dot_flops"] / 1e12:.2f} T). Loop bodies '
    f'once, as XLA counts: dots {row["dot_flops_once"] / 1e12:.3f} T + other '
    f'{row["other_flops_once"] / 1e12:.3f} T = {xla_once / 1e12:.3f} T against '
    f'cost_analysis {row["xla_flops"] / 1e12:.3f} T '
    f'({xla_once / row["xla_flops"]:.4f}×); bytes {gb(row["bytes_once"])} GB '
    f'against {gb(row["xla_bytes_accessed"])} GB. Bytes per step: '
    f'{gb(row["bytes"])} GB, of which {gb(rewritten["bytes"])} GB in the '
    f'{rewritten["ops"]} fusions that rewrite a whole loop-carried buffer at '
    f"each of their {rewritten['runs']:,} runs (not in place). XLA's "
    f'memory_analysis: {row["temp_bytes"] / 2**30:.2f} GiB of temporaries, '
    f'{row["argument_bytes"] / 2**30:.2f} GiB of arguments.',
    '',
    *table(row),
    '',
    'Converts: runs and GB converted per step (optimized HLO: written to '
    'memory by a convert op, or fused into another op; the program: before '
    'optimization, each its own op):',
    '',
    '| convert | written | fused | in the program |',
    '|---|---|---|---|',
  ]
  after, before = row['converts'], row['program_converts']
  cell = lambda v: f'{v["runs"]:,}, {gb(v["bytes"])}' if v else '–'
  for label in sorted(set(after) | set(before)):
    mine = after.get(label, {})
    program = before.get(label, {}).get('written')
    cells = [cell(mine.get('written')), cell(mine.get('fused')), cell(program)]
    lines.append(f'| {label} | {" | ".join(cells)} |')
  lines += ['', 'Largest ops by bytes per step:', '',
            '| op | category | phase | runs | GB | result ← operands | inside |',
            '|---|---|---|---|---|---|---|']  # fmt: skip
  for o in row['largest']:
    lines.append(
      f'| {o["op"]} | {o["category"]} | {o["phase"]} | {o["runs"]} | '
      f'{gb(o["bytes"])} | {o["result"]} ← {o["operands"]} | {o["inner"]} |'
    )
  return [*lines, '']


def compile_section(timing: dict) -> list[str]:
  lines = ['## Compile time (`lower(abstract args).compile()`, fresh processes)', '']
  if {'jax_lora_weight', 'jax_lora_factored'} <= set(timing):
    r = compile_ratios(timing, 'jax_lora_factored', 'jax_lora_weight')
    lines += [
      f'Factored / weight-space: **{r["cpu"]:.2f}× in CPU seconds**, '
      f"{r['wall']:.2f}× in wall seconds (median of the rounds' ratios "
      f'{r["wall_per_round"]:.2f}×).',
      '',
    ]
  lines += [
    '| setting | median wall s | median CPU s | samples: wall s / CPU s (1-min load) |',
    '|---|---|---|---|',
  ]
  for setting, t in timing.items():
    samples = ', '.join(
      f'{x["wall_s"]:.1f} / {x["cpu_s"]:.1f} ({x["load_1min"]:.1f})'
      for x in t['samples']
    )
    lines.append(
      f'| {setting} | {t["median_wall_s"]:.1f} | {t["median_cpu_s"]:.1f} | {samples} |'
    )
  return [*lines, '']


def markdown(report: dict) -> str:
  lines = [
    f'## Generated: {report["device"]}, jax {report["jax"]}, {report["date"]}',
    '',
    f'`{report["command"]}`',
    '',
  ]
  if report.get('compile'):
    lines += compile_section(report['compile'])
  for row in report['rows']:
    lines += setting_section(row)
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', choices=sorted(lora_step.SIZES), default='smoke')
  parser.add_argument('--settings', default=','.join(lora_step.JAX_SETTINGS))
  parser.add_argument('--compile-repeats', type=int, default=0)
  parser.add_argument('--dtype', choices=('bfloat16', 'float32'), default='bfloat16')
  parser.add_argument(
    '--out',
    help='JSON path (the Markdown beside it); default '
    'benchmarks/results/hlo_breakdown.json at the reference size, else '
    'hlo_breakdown_SIZE.json',
  )
  parser.add_argument('--compile-one', help=argparse.SUPPRESS)  # Child process.
  args = parser.parse_args(argv)
  if args.compile_one:
    print(json.dumps(compile_seconds(args.compile_one, args.size, args.dtype)))
    return 0
  import jax

  settings = args.settings.split(',')
  machine = platform.processor() or platform.machine()
  report = {
    'size': args.size,
    'dtype': args.dtype,
    'jax': jax.__version__,
    'device': f'{jax.devices()[0].device_kind} ({machine}, {os.cpu_count()} CPUs)',
    'date': datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC'),
    'command': 'python -m benchmarks.hlo_breakdown '
    + ' '.join(sys.argv[1:] if argv is None else argv),
    'rows': [analyse(s, args.size, args.dtype) for s in settings],
  }
  if args.compile_repeats:
    report['compile'] = time_compiles(
      settings, args.size, args.compile_repeats, args.dtype
    )
  suffix = '' if args.size == 'reference' else f'_{args.size}'
  out = pathlib.Path(args.out or f'benchmarks/results/hlo_breakdown{suffix}.json')
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2))
  write_markdown(out.with_suffix('.md'), markdown(report))
  print(markdown(report))
  return 0


def write_markdown(path: pathlib.Path, generated: str) -> None:
  """Writes ``generated`` to ``path``, after the text that an existing file
  has above its first ``## Generated`` heading (a reading written by hand)."""
  kept = path.read_text().split('## Generated', 1)[0] if path.exists() else ''
  path.write_text(kept + generated)


if __name__ == '__main__':
  sys.exit(main())
