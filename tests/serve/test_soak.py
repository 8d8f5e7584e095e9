"""A shortened load soak (bench/serve_soak.py): random, malformed and dropped requests against one server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_soak_leaves_no_rows_no_errors_and_flat_memory(tmp_path: Path) -> None:
    out = tmp_path / "soak.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_soak.py"), "--requests", "300",
                           "--concurrency", "12", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAILED" not in out.read_text()
