"""ruff is part of the suite, so CI enforces it."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def ruff(*args):
  return subprocess.run(
    [sys.executable, '-m', 'ruff', *args], cwd=ROOT, capture_output=True, text=True
  )


def test_ruff_check_is_clean():
  result = ruff('check', '.')
  assert result.returncode == 0, result.stdout


def test_ruff_format_is_clean():
  result = ruff('format', '--check', '.')
  assert result.returncode == 0, result.stdout
