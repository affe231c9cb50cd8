"""The linter and the formatter, as configured in pyproject.toml, pass over the whole repository."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('command', [['check'], ['format', '--check']])
def test_ruff(command):
  result = subprocess.run(
    [sys.executable, '-m', 'ruff', *command, ROOT], cwd=ROOT, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
