"""Every notebook in notebooks/ runs top to bottom without error."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted(
  (pathlib.Path(__file__).resolve().parents[1] / 'notebooks').glob('*.ipynb')
)


@pytest.mark.filterwarnings('ignore::DeprecationWarning')
@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
@pytest.mark.slow
def test_notebook_runs(path):
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(notebook, timeout=300, kernel_name='python3').execute(
    cwd=str(path.parent)
  )
