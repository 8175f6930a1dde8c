"""``QuantizedArray``: a frozen weight stored as grouped low-bit codes.

A frozen leaf ``w`` of logical shape ``(..., n, m)`` is stored as codes with
one scale (and, for GGUF's ``Q4_1``, one offset) per group of ``g``
consecutive entries along one axis, the *group axis* (the kernel's input
axis ``-2`` by default; ``-1`` for PyTorch-order GGUF tensors):

  w[..., i, j] = scales[..., i // g, j] · level(codes[..., i, j])
                 (+ offsets[..., i // g, j])

with ``level`` given by the kind:

  ``int8``  signed 8-bit codes, ``level(c) = c``, ``scale = absmax / 127``
            (GGUF ``Q8_0`` is this with ``g = 32`` and float16 scales).
  ``int4``  4-bit codes ``c ∈ [0, 16)``, ``level(c) = c − 8``,
            ``scale = absmax / 7`` (GGUF ``Q4_0`` with ``g = 32``).
  ``nf4``   4-bit codes, ``level(c) = NF4[c]``, QLoRA's 4-bit NormalFloat
            (Dettmers et al., 2023): the 16 quantiles of N(0, 1) scaled to
            ``[-1, 1]`` with an exact zero; ``scale = absmax`` per group
            (bitsandbytes' blocks of 64 along the input of ``W`` are our
            groups of 64 along axis ``-2`` of ``w = Wᵀ``).
  ``uint4`` 4-bit codes, ``level(c) = c``, with offsets: GGUF ``Q4_1``
            (``w = d·c + m``), read from files only.

4-bit codes are packed two per byte along the group axis (entry ``2k`` in
the low nibble, ``2k + 1`` in the high one). A ``QuantizedArray`` is a
pytree (codes, scales, offsets are its children), so it passes through
``jit``, ``scan`` (stacked layers slice their leading axis) and device
placement; every peft_jax function that names leaves (``by_rules``,
``describe``, ``adapted``) treats it as one leaf with the logical ``shape``
and ``dtype``.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from peft_jax._src.base import PeftError

KINDS = ('int8', 'int4', 'nf4')
# bitsandbytes' NF4 code book (QLoRA, Appendix E): Φ⁻¹ of 8 evenly spaced
# probabilities in [δ, 1/2) for the positive half, 7 for the negative half,
# δ = 1/2 (1/32 + 1/30) ... normalised by the largest; 0 exact.
NF4_LEVELS = np.array(
  [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.2461123913526535,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
  ],
  np.float32,
)
_FOUR_BIT = ('int4', 'nf4', 'uint4')
_LARGEST_LEVEL = {'int8': 127.0, 'int4': 7.0, 'nf4': 1.0}
DEQUANTIZED = 'peft_jax_dequantized'  # jax.ad_checkpoint name of w at its use


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=['codes', 'scales', 'offsets'],
  meta_fields=['kind', 'group_size', 'axis', 'dtype'],
)
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """A frozen weight stored as grouped codes (see the module docstring).

  Attributes:
    codes: ``int8`` (kind ``int8``) or ``uint8`` holding two 4-bit codes
      per byte along ``axis`` (shape: the logical one with that axis halved).
    scales: one per group: the logical shape with ``axis`` divided by
      ``group_size``.
    offsets: like ``scales`` (``uint4`` only), else ``None``.
    kind: ``int8``, ``int4``, ``nf4`` or ``uint4``.
    group_size: entries per scale along ``axis``.
    axis: the group axis, negative (so stacking layers in front keeps it).
    dtype: the dtype ``dequantize`` returns.
  """

  codes: Any
  scales: Any
  offsets: Any
  kind: str
  group_size: int
  axis: int
  dtype: Any

  def __repr__(self) -> str:
    return (
      f'QuantizedArray({self.kind}, shape={self.shape}, group_size='
      f'{self.group_size}, axis={self.axis}, dtype={jnp.dtype(self.dtype).name})'
    )

  @property
  def shape(self) -> tuple[int, ...]:
    shape = list(np.shape(self.codes))
    if self.kind in _FOUR_BIT:
      shape[self.axis] *= 2
    return tuple(shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  @property
  def sharding(self) -> Any:
    """The codes' sharding (``None`` for NumPy codes)."""
    return getattr(self.codes, 'sharding', None)

  @property
  def nbytes(self) -> int:
    """Bytes stored: codes, scales and offsets."""
    parts = (self.codes, self.scales, self.offsets)
    return sum(
      int(np.prod(np.shape(p))) * np.dtype(p.dtype).itemsize
      for p in parts
      if p is not None
    )

  @property
  def T(self) -> 'QuantizedArray':
    """The transposed matrix (2-D only): the group axis moves with it."""
    if self.ndim != 2:
      raise PeftError(f'QuantizedArray.T needs a matrix; got shape {self.shape}')
    swap = lambda x: None if x is None else x.T
    return dataclasses.replace(
      self,
      codes=swap(self.codes),
      scales=swap(self.scales),
      offsets=swap(self.offsets),
      axis=-1 if self.axis == -2 else -2,
    )

  def take_rows(self, index: np.ndarray) -> 'QuantizedArray':
    """Rows ``index`` of axis 0, which must not be the group axis."""
    if self.ndim + self.axis == 0:
      raise PeftError('take_rows would split the groups of a QuantizedArray')
    take = lambda x: None if x is None else x[index]
    return dataclasses.replace(
      self, codes=take(self.codes), scales=take(self.scales), offsets=take(self.offsets)
    )

  def astype(self, dtype) -> 'QuantizedArray':
    """The same codes, dequantized to ``dtype``."""
    return dataclasses.replace(self, dtype=jnp.dtype(dtype))


def is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedArray)


def _unpack(codes: jax.Array, axis: int) -> jax.Array:
  """Two 4-bit codes per byte along ``axis`` -> one code per entry."""
  codes = jnp.asarray(codes)
  pairs = jnp.stack([codes & 15, codes >> 4], axis=codes.ndim + axis + 1)
  shape = list(codes.shape)
  shape[axis] *= 2
  return pairs.reshape(shape)


def pack_four_bit(codes: np.ndarray, axis: int) -> np.ndarray:
  """One 4-bit code (0..15) per entry -> two per byte along ``axis``."""
  low = np.take(codes, np.arange(0, codes.shape[axis], 2), axis=axis)
  high = np.take(codes, np.arange(1, codes.shape[axis], 2), axis=axis)
  return (low | (high << 4)).astype(np.uint8)


def _levels(q: QuantizedArray) -> jax.Array:
  """``level(codes)`` in float32, of the logical shape."""
  if q.kind == 'int8':
    return jnp.asarray(q.codes).astype(jnp.float32)
  codes = _unpack(q.codes, q.axis)
  if q.kind == 'nf4':
    return jnp.asarray(NF4_LEVELS)[codes]
  levels = codes.astype(jnp.float32)
  return levels - 8.0 if q.kind == 'int4' else levels


def _grouped(x: jax.Array, axis: int, group_size: int) -> jax.Array:
  """``x`` with its ``axis`` split into ``(groups, group_size)``."""
  axis = x.ndim + axis
  return x.reshape(*x.shape[:axis], -1, group_size, *x.shape[axis + 1 :])


def dequantize(q: QuantizedArray) -> jax.Array:
  """The weight ``scales · level(codes) (+ offsets)`` in ``q.dtype``, of
  ``q.shape``, named ``DEQUANTIZED`` for ``jax.checkpoint`` policies."""
  levels = _grouped(_levels(q), q.axis, q.group_size)
  group = lambda x: jnp.expand_dims(jnp.asarray(x, jnp.float32), levels.ndim + q.axis)
  w = levels * group(q.scales)
  if q.offsets is not None:
    w = w + group(q.offsets)
  w = w.reshape(q.shape).astype(q.dtype)
  return checkpoint_name(w, DEQUANTIZED)


def quantize_array(
  w: Any, kind: str, *, group_size: int = 64, axis: int = -2
) -> QuantizedArray:
  """Round-to-nearest absmax quantization of ``w`` in groups along ``axis``.

  Args:
    w: a float array with at least ``-axis`` dimensions.
    kind: ``int8``, ``int4`` or ``nf4`` (see the module docstring).
    group_size: entries per scale; must divide ``w.shape[axis]`` (and be
      even for 4-bit kinds).
    axis: the group axis (negative); ``-2``, a kernel's input axis.

  Returns:
    The ``QuantizedArray`` (float32 scales), dequantizing to ``w.dtype``.
  """
  if kind not in KINDS:
    raise PeftError(
      f'unknown quantization kind {kind!r}; expected one of {", ".join(KINDS)}'
    )
  shape = np.shape(w)
  if not -len(shape) <= axis < 0:
    raise PeftError(f'quantization axis {axis} does not exist in shape {shape}')
  if group_size < 1 or shape[axis] % group_size or (kind != 'int8' and group_size % 2):
    raise PeftError(
      f'group_size={group_size} does not split axis {axis} of length {shape[axis]} '
      f'(shape {shape}) into groups{"" if kind == "int8" else " of even size"}; '
      'pick a divisor'
    )
  x = np.asarray(w, np.float32)
  grouped = _grouped(x, axis, group_size)
  group_axis = grouped.ndim + axis
  absmax = np.max(np.abs(grouped), axis=group_axis, keepdims=True)
  scales = absmax / _LARGEST_LEVEL[kind]
  normalized = grouped / np.where(scales == 0, 1.0, scales)
  if kind == 'nf4':  # the nearest level: between midpoints of neighbours
    codes = np.searchsorted((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2, normalized)
  else:
    top = _LARGEST_LEVEL[kind]
    codes = np.clip(np.rint(normalized), -top, top) + (8 if kind == 'int4' else 0)
  codes = codes.reshape(shape)
  codes = (
    codes.astype(np.int8)
    if kind == 'int8'
    else pack_four_bit(codes.astype(np.uint8), axis)
  )
  return QuantizedArray(
    codes=jnp.asarray(codes),
    scales=jnp.asarray(np.squeeze(scales, group_axis)),
    offsets=None,
    kind=kind,
    group_size=group_size,
    axis=axis,
    dtype=jnp.dtype(getattr(w, 'dtype', np.float32)),
  )
