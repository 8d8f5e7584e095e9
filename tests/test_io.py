"""Atomic writes follow the user's umask and leave nothing behind; stale temporaries are recognised."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lorakit.io import atomic_dir, atomic_write_text, remove_stale_temps, temp_file


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(tmp_path: Path, umask, mask: int) -> None:
    from lorakit.adapters import inject_lora
    from lorakit.adapters.state import save_adapter
    from tests.conftest import tiny_model

    umask(mask)
    atomic_write_text(tmp_path / "eval.json", "{}")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x.txt").write_text("x")
    model = tiny_model("llama")
    inject_lora(model, ["q_proj"], r=2, alpha=4)
    save_adapter(model, tmp_path / "adapter", meta={"template": "chatml"})
    plain_file, plain_dir = tmp_path / "plain.txt", tmp_path / "plain"
    plain_file.write_text("x")
    plain_dir.mkdir()
    assert _mode(tmp_path / "eval.json") == _mode(plain_file) == 0o666 & ~mask
    for d in (tmp_path / "out", tmp_path / "adapter"):
        assert _mode(d) == _mode(plain_dir) == 0o777 & ~mask
    for f in (tmp_path / "adapter").iterdir():
        assert _mode(f) == 0o666 & ~mask, f
    assert _mode(temp_file(tmp_path / "m.gguf")) == 0o666 & ~mask


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path: Path) -> None:
    keep = [tmp_path / "step-2", tmp_path / ".hidden", tmp_path / "notes.tmp"]
    for p in keep:
        p.mkdir()
    stale_dir = tmp_path / ".step-4.k2j3h4g5.tmp"
    stale_dir.mkdir()
    stale_file = temp_file(tmp_path / "eval.json")
    assert sorted(remove_stale_temps(tmp_path)) == sorted([stale_dir, stale_file])
    assert sorted(tmp_path.iterdir()) == sorted(keep)
