"""Every shipped example config loads and validates, and its data files exist and parse."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.config import load_config
from lorakit.data import detect_format, load_records

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples").glob("*/*.yaml"))


def test_there_are_examples() -> None:
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_config_is_valid(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # example paths are relative to the repository root
    cfg = load_config(path)
    files = cfg.data.train_files + [f for f in (cfg.data.eval, cfg.data.test) if f]
    assert files
    for file in files:
        records = load_records(file)
        assert records and detect_format(records, file)
