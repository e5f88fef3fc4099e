"""The code is clean under the lint rules in pyproject.toml ([tool.ruff]): unused and undefined names,
pycodestyle errors and warnings, import order, lines up to 120 (`ruff check --fix` repairs most)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
