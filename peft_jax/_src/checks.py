"""Validation of hyper-parameters and leaves, with one-line messages."""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax._src.base import PeftError


def positive_int(method: str, name: str, value: Any) -> int:
  """``value`` if it is an int > 0 (bools rejected)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise PeftError(
      f'{method}: {name}={value!r} must be an int, got {type(value).__name__}'
    )
  if value <= 0:
    raise PeftError(f'{method}: {name}={value} must be > 0')
  return int(value)


def real(method: str, name: str, value: Any) -> float:
  """``value`` as a float if it is a finite real number (bools, nan and ±inf
  rejected)."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
    raise PeftError(
      f'{method}: {name}={value!r} must be a number, got {type(value).__name__}'
    )
  if not math.isfinite(value):
    raise PeftError(f'{method}: {name}={value} must be a finite number')
  return float(value)


def positive(method: str, name: str, value: Any) -> float:
  """``value`` as a float if it is a real number > 0 (bools rejected)."""
  value = real(method, name, value)
  if not value > 0:
    raise PeftError(f'{method}: {name}={value} must be > 0')
  return value


def nonzero(method: str, name: str, value: Any) -> float:
  """``value`` as a float if it is a finite real number other than 0."""
  value = real(method, name, value)
  if value == 0:
    raise PeftError(f'{method}: {name}={value} must be nonzero')
  return value


def flag(method: str, name: str, value: Any) -> bool:
  if not isinstance(value, bool):
    raise PeftError(f'{method}: {name}={value!r} must be True or False')
  return value


def choice(method: str, name: str, value: Any, options) -> Any:
  if value not in options:
    raise PeftError(
      f'{method}: {name}={value!r} is not one of {", ".join(map(repr, options))}'
    )
  return value


def float_dtype(method: str, name: str, value: Any) -> jnp.dtype:
  """A floating dtype from a name (``'float32'``) or a dtype."""
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise PeftError(f'{method}: {name}={value!r} is not a floating dtype name')
  return dtype


def matrix(method: str, w: Any) -> tuple[int, int]:
  """``(d_in, d_out)`` of a 2-D kernel; raises for other ranks."""
  if np.ndim(w) != 2:
    raise PeftError(
      f'{method} expects a 2-D kernel (d_in, d_out); got shape {np.shape(w)}'
    )
  d_in, d_out = np.shape(w)
  return d_in, d_out


def vector(method: str, w: Any) -> int:
  """The length of a 1-D leaf (a bias); raises for other ranks."""
  if np.ndim(w) != 1:
    raise PeftError(f'{method} expects a 1-D leaf (a bias); got shape {np.shape(w)}')
  return np.shape(w)[0]


def rank_fits(method: str, rank: int, w: Any) -> tuple[int, int]:
  """``(d_in, d_out)`` of ``w`` if ``rank <= min(d_in, d_out)``."""
  d_in, d_out = matrix(method, w)
  if rank > min(d_in, d_out):
    raise PeftError(
      f'{method}: rank={rank} exceeds min(d_in, d_out)={min(d_in, d_out)} '
      f'of the kernel of shape {(d_in, d_out)}'
    )
  return d_in, d_out


def probability(method: str, p) -> float:
  """``p`` as a float if ``0 < p <= 1``."""
  p = real(method, 'p', p)
  if not 0 < p <= 1:
    raise PeftError(f'{method}: p={p} must be in (0, 1]')
  return p


def budget(p: float, shape) -> int:
  """``k = ⌊p · size⌋``, the SAM code's ``int(p · numel)``."""
  return int(p * math.prod(shape))


def concrete(x: Any) -> bool:
  """Whether ``x`` holds values now: an array, not a tracer or a shape struct."""
  return isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, jax.core.Tracer)


def nonfinite(x: Any) -> int:
  """The number of nan or ±inf entries of a concrete array (one reduction,
  on the host for NumPy arrays)."""
  xp = np if isinstance(x, np.ndarray) else jnp
  return int(xp.sum(~xp.isfinite(x)))
