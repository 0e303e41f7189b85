"""``crdtmail demo`` runs from the command line, reports convergence and exits 0 only when everything agrees."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_and_converges(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "crdtmail.cli", "demo", "--dir", str(tmp_path / "demo"), "--duration", "4",
         "--count", "120"],
        cwd=ROOT, env={**os.environ}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "converged: yes" in result.stdout
    assert "phone-1:" in result.stdout and "phone-2:" in result.stdout
    assert (tmp_path / "demo" / "Maildir" / "cur").is_dir()
    again = subprocess.run([sys.executable, "-m", "crdtmail.cli", "demo", "--dir", str(tmp_path / "demo")],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "holds an earlier demo" in again.stderr
