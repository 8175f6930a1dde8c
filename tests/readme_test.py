"""Every code block of the README runs as written.

Python blocks are executed in a fresh namespace inside a temporary directory;
those that load the real SmolLM2 (``smollm2_path()``) are marked slow.
Shell blocks are checked without running their (minutes-long) jobs: each
``make`` target exists in the Makefile, and each ``python -m module`` command
parses with the module's own argument parser, its ``--config`` builds and
its ``--only`` methods exist. ``text`` blocks are diagrams.
"""

import importlib
import pathlib
import re
import shlex

import pytest

from experiments.configs import common

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / 'README.md').read_text()
BLOCKS = re.findall(r'^```(\w*)\n(.*?)^```', README, flags=re.MULTILINE | re.DOTALL)


def blocks(language):
  return [code for lang, code in BLOCKS if lang == language]


def test_every_block_declares_its_language():
  assert BLOCKS
  assert {lang for lang, _ in BLOCKS} <= {'python', 'bash', 'text'}


@pytest.mark.parametrize(
  'index',
  [
    pytest.param(i, marks=[pytest.mark.slow] if 'smollm2_path()' in code else [])
    for i, code in enumerate(blocks('python'))
  ],
)
def test_python_block_runs(index, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  exec(compile(blocks('python')[index], f'README python block {index}', 'exec'), {})
  assert capsys.readouterr().out  # Every block shows its result.


def shell_commands():
  for code in blocks('bash'):
    for line in code.splitlines():
      command = line.split('#', 1)[0].strip()
      if command:
        yield command


@pytest.mark.parametrize('command', list(shell_commands()))
def test_shell_command_is_valid(command):
  words = shlex.split(command)
  if words[0] == 'make':
    targets = re.findall(r'^([\w-]+):', (ROOT / 'Makefile').read_text(), re.MULTILINE)
    assert words[1] in targets
    return
  assert words[:2] == ['python', '-m'], command
  module = importlib.import_module(words[2])
  args = words[3:]
  with pytest.raises(SystemExit) as exit_info:
    module.main([*args, '--help'])  # argparse parses, prints usage, exits 0
  assert exit_info.value.code == 0
  if '--config' in args:
    path, _, arg = args[args.index('--config') + 1].partition(':')
    module = common.load_module(str(ROOT / path))
    assert module.get_config(arg or None).steps > 0
    if '--only' in args:
      assert set(args[args.index('--only') + 1].split(',')) <= set(module.METHODS)
