"""The one formatter: every Python file is as `pyink .` (configured in pyproject.toml) writes it."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_repository_is_formatted_with_pyink():
  result = subprocess.run(
      [sys.executable, "-m", "pyink", "--check", "."], cwd=REPO, capture_output=True, text=True, check=False
  )
  assert result.returncode == 0, f"Run `pyink .` in the repository root:\n{result.stderr[-3000:]}"
