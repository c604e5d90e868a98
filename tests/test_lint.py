"""The code passes its linter (ruff, configured in pyproject.toml): run with the suite, so CI runs it."""

import subprocess
import sys

from tests.conftest import REPO


def test_ruff_passes():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
