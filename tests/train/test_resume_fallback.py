"""Resume validates the newest checkpoint and falls back to the previous valid one; writes are fsynced."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
from rich.console import Console

import lorakit.io
from lorakit.adapters import inject_lora
from lorakit.config import TrainConfig, load_config
from lorakit.errors import LorakitError
from lorakit.train.checkpoint import newest_usable_checkpoint, save_checkpoint
from lorakit.train.optim import build_optimizer
from tests.conftest import save_tiny_model_dir, tiny_model
from tests.train.test_train_cli import write_chat_data, write_config


def _saved(tmp_path: Path, steps=(1, 2, 3)) -> Path:
    model = tiny_model("llama").train()
    inject_lora(model, ["q_proj"], r=2, alpha=4)
    opt = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    for step in steps:
        save_checkpoint(tmp_path, step, model, opt, {"epoch": 0, "batch_index": step}, keep=5)
    return tmp_path / "checkpoints"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _drop_key(path: Path) -> None:
    state = json.loads(path.read_text())
    del state["batch_index"]
    path.write_text(json.dumps(state))


@pytest.mark.parametrize("damage, needle", [
    (lambda d: _truncate(d / "trainable.safetensors"), "damaged"),
    (lambda d: (d / "optimizer.safetensors").write_bytes(b"\xff" * 40), "damaged"),
    (lambda d: (d / "rng.safetensors").unlink(), "damaged"),
    (lambda d: _drop_key(d / "trainer_state.json"), "no 'batch_index'"),
    (lambda d: (d / "optimizer.json").write_text("{"), "damaged"),
])
def test_damaged_newest_falls_back_with_a_warning(tmp_path: Path, damage, needle) -> None:
    root = _saved(tmp_path)
    damage(root / "step-3")
    warnings: list[str] = []
    found = newest_usable_checkpoint(tmp_path, warnings.append)
    assert found is not None and found.step == 2
    assert len(warnings) == 1 and "step-3" in warnings[0] and needle in warnings[0]


def test_no_usable_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    root = _saved(tmp_path, steps=(1, 2))
    for d in root.iterdir():
        _truncate(d / "trainable.safetensors")
    with pytest.raises(LorakitError, match="no usable checkpoint.*step-2.*step-1"):
        newest_usable_checkpoint(tmp_path, lambda _: None)
    assert newest_usable_checkpoint(tmp_path / "elsewhere", lambda _: None) is None


def test_checkpoint_files_and_directory_are_fsynced_before_the_rename(tmp_path: Path, monkeypatch) -> None:
    synced: set[int] = set()
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.add(os.fstat(fd).st_ino)
        real_fsync(fd)

    def replace(src, dst) -> None:
        if Path(src).is_dir():  # publishing a directory: all of it must be on disk first
            inodes = {os.stat(os.path.join(d, n)).st_ino for d, _, fs in os.walk(src) for n in fs}
            inodes |= {os.stat(d).st_ino for d, _, _ in os.walk(src)}
            assert inodes and inodes <= synced, "unsynced files before the rename"
        real_replace(src, dst)

    monkeypatch.setattr(lorakit.io.os, "fsync", fsync)
    monkeypatch.setattr(lorakit.io.os, "replace", replace)
    _saved(tmp_path, steps=(1,))
    assert os.stat(tmp_path / "checkpoints").st_ino in synced  # the rename itself is durable


def test_train_resume_skips_a_truncated_checkpoint_and_cleans_temps(tmp_path: Path) -> None:
    from lorakit.train.loop import train

    save_tiny_model_dir(tmp_path / "model")
    write_chat_data(tmp_path / "train.jsonl", n=16)
    config = write_config(tmp_path, "run", max_steps=4, save_every=2, eval_every=0, keep_checkpoints=3)
    train(load_config(config), quiet=True)
    ckpts = tmp_path / "run" / "checkpoints"
    _truncate(ckpts / "step-4" / "trainable.safetensors")
    stale = ckpts / ".step-6.abc123xy.tmp"
    stale.mkdir()
    (stale / "trainable.safetensors").write_bytes(b"")
    buf = io.StringIO()
    result = train(load_config(config, ["train.max_steps=6"]), resume=True, console=Console(file=buf, width=300))
    out = buf.getvalue()
    assert "warning: checkpoint" in out and "step-4 is damaged" in out, out
    assert "resumed from" in out and "(step 2)" in out
    assert result.steps == 6 and not stale.exists()
