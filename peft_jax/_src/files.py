"""Files written whole or not at all."""

import os
from collections.abc import Callable

from peft_jax._src.base import PeftError


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def replace_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
  """Writes ``path`` through ``write(tmp)`` into a temporary file beside it,
  flushed to disk, then renamed over ``path``: a crash leaves the old file
  or the new one, never a part. The file gets the mode a plain ``open``
  would give it (``0o666`` less the umask).

  Raises:
    PeftError: when ``path``'s directory does not exist.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise PeftError(f'cannot write {path}: its directory {folder} does not exist')
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    write(tmp)
    with open(tmp, 'rb+') as f:
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
  """``replace_atomically`` for a text file."""

  def write(tmp: str) -> None:
    with open(tmp, 'w') as f:
      f.write(text)

  replace_atomically(path, write)
