"""`lorakit train` end to end on a tiny model: run directory, resume after SIGKILL, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli, save_tiny_model_dir

WORDS = ["red", "green", "blue", "fox", "dog", "paris", "world", "hello"]


def write_chat_data(path: Path, n: int = 48) -> Path:
    rows = []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(i * 3 + 1) % len(WORDS)]
        rows.append({"messages": [
            {"role": "user", "content": f"what comes after {a}?"},
            {"role": "assistant", "content": f"after {a} comes {b}."},
        ]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_workspace(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder with the tiny model (model/) and write_chat_data's rows (train.jsonl)."""
    root = tmp_path_factory.mktemp(name)
    save_tiny_model_dir(root / "model")
    write_chat_data(root / "train.jsonl")
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chat_workspace(tmp_path_factory, "train")


def write_config(root: Path, name: str, adapter: dict | None = None, **train_overrides) -> Path:
    """A LoRA training config over `root`'s workspace; `adapter` updates the adapter section."""
    cfg = {
        "model": {"name": str(root / "model"), "dtype": "fp32"},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["all-linear"], **(adapter or {})},
        "data": {"train": str(root / "train.jsonl"), "max_length": 64, "eval_ratio": 0.25, "packing": True},
        "train": {"max_steps": 12, "batch_size": 4, "lr": 2e-2, "log_every": 1, "eval_every": 4,
                  "save_every": 4, "precision": "fp32", "warmup_steps": 2, **train_overrides},
        "output_dir": str(root / name),
        "seed": 3,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_losses(run_dir: Path) -> dict[int, float]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in events if e["event"] == "train"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator choice is Linux-only")
def test_the_command_trains_with_tcmalloc_where_installed(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.memory import find_tcmalloc

    proc = run_cli("train", str(write_config(workspace, "alloc", max_steps=2, eval_every=0, save_every=0)))
    assert proc.returncode == 0, proc.stderr
    assert ("memory allocator: tcmalloc" if find_tcmalloc() else "memory allocator: glibc") in proc.stdout
    monkeypatch.setenv("LORAKIT_ALLOCATOR", "system")
    proc = run_cli("train", str(write_config(workspace, "alloc-system", max_steps=2, eval_every=0, save_every=0)))
    assert proc.returncode == 0, proc.stderr
    assert "memory allocator: glibc" in proc.stdout


def test_train_writes_the_run_directory_and_loss_falls(workspace: Path) -> None:
    proc = run_cli("train", str(write_config(workspace, "run1", max_steps=24)))
    assert proc.returncode == 0, proc.stderr
    run = workspace / "run1"
    for rel in ("config.yaml", "metrics.jsonl", "eval.json", "adapter/adapter_config.json",
                "adapter/adapter_model.safetensors", "adapter/lorakit.json", "adapter-best/adapter_model.safetensors",
                "checkpoints/step-24/trainable.safetensors", "checkpoints/step-24/optimizer.safetensors",
                "checkpoints/step-24/rng.safetensors", "checkpoints/step-24/trainer_state.json"):
        assert (run / rel).exists(), rel
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-20", "step-24"]  # keep_checkpoints=2
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kinds = {e["event"] for e in events}
    assert {"start", "train", "eval", "end"} <= kinds
    train = [e for e in events if e["event"] == "train"]
    assert len(train) == 24
    assert set(train[0]) >= {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed"}
    assert sum(e["loss"] for e in train[-4:]) / 4 < 0.7 * sum(e["loss"] for e in train[:4]) / 4
    summary = json.loads((run / "eval.json").read_text())
    assert summary["eval_loss"] is not None and summary["eval_ppl"] > 1
    assert yaml.safe_load((run / "config.yaml").read_text())["adapter"]["r"] == 4
    # Running again without --resume refuses and leaves the run alone.
    before = (run / "metrics.jsonl").read_text()
    proc = run_cli("train", str(workspace / "run1.yaml"))
    assert proc.returncode == 2 and "already holds a run; pass --resume" in proc.stderr
    assert "Traceback" not in proc.stderr and (run / "metrics.jsonl").read_text() == before


def test_shared_prefix_packing_trains_the_same_first_step(workspace: Path) -> None:
    """One batch holding every example: the same loss and gradient norm with and without sharing."""
    system = "You are the handbook assistant of a fictional colour and animal club; answer from its rules only."
    logs = {}
    for share in (True, False):
        path = write_config(workspace, f"share-{share}", max_steps=1, batch_size=64, eval_every=0, save_every=0)
        cfg = yaml.safe_load(path.read_text())
        cfg["adapter"]["dropout"] = 0.0
        cfg["data"].update(system_prompt=system, share_prefix=share, max_length=256)
        path.write_text(yaml.safe_dump(cfg))
        proc = run_cli("train", str(path))
        assert proc.returncode == 0, proc.stderr
        assert ("shared prefix:" in proc.stdout) == share, proc.stdout
        events = [json.loads(line) for line in (workspace / f"share-{share}" / "metrics.jsonl").read_text().splitlines()]
        logs[share] = next(e for e in events if e["event"] == "train")
    assert logs[True]["tokens"] < 0.6 * logs[False]["tokens"]  # the system turn is processed once per row
    assert abs(logs[True]["loss"] - logs[False]["loss"]) < 1e-5 * logs[False]["loss"]
    assert abs(logs[True]["grad_norm"] - logs[False]["grad_norm"]) < 1e-4 * logs[False]["grad_norm"]


def test_resume_after_sigkill_matches_uninterrupted_run(workspace: Path) -> None:
    steps = 60
    ref = run_cli("train", str(write_config(workspace, "full", max_steps=steps, save_every=5, eval_every=0)))
    assert ref.returncode == 0, ref.stderr
    expected = train_losses(workspace / "full")

    cfg = write_config(workspace, "killed", max_steps=steps, save_every=5, eval_every=0)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "train", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = workspace / "killed" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and any(p.name.startswith("step-") for p in ckpt.iterdir()):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(int(p.name.split("-")[1]) for p in ckpt.iterdir() if p.name.startswith("step-"))
    assert killed_at < steps

    resumed = run_cli("train", str(cfg), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    got = train_losses(workspace / "killed")
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(workspace: Path, monkeypatch) -> None:
    from lorakit.config import load_config
    from lorakit.errors import LorakitError
    from lorakit.train import loop

    calls = {"n": 0}
    real = loop.fast_loss_sum

    def poisoned(model, batch):  # the 5th micro-batch's loss is NaN, as after a blow-up
        calls["n"] += 1
        loss, n = real(model, batch)
        return (loss * float("nan") if calls["n"] == 5 else loss), n

    monkeypatch.setattr(loop, "fast_loss_sum", poisoned)
    cfg = load_config(write_config(workspace, "nan", max_steps=10, save_every=2, eval_every=0))
    with pytest.raises(LorakitError, match="loss became nan at step 5.*learning rate"):
        loop.train(cfg, quiet=True)
    assert [p.name for p in sorted((workspace / "nan" / "checkpoints").iterdir())] == ["step-2", "step-4"]


def test_the_training_set_is_packed_once(workspace: Path, monkeypatch) -> None:
    """build_datasets packs the train rows for its statistics; the loop trains on those same rows."""
    import lorakit.data
    from lorakit.config import load_config
    from lorakit.data import dataset
    from lorakit.train import loop

    sizes = []
    real = lorakit.data.pack_examples

    def counting(examples, *args, **kwargs):
        sizes.append(len(examples))
        return real(examples, *args, **kwargs)

    monkeypatch.setattr(dataset, "pack_examples", counting)
    monkeypatch.setattr(lorakit.data, "pack_examples", counting)
    cfg = load_config(write_config(workspace, "packed-once", max_steps=1, save_every=0, eval_every=0))
    loop.train(cfg, quiet=True)
    assert sizes == [36, 12]  # the 36 train rows once, then the 12 eval rows


def test_full_fine_tuning_writes_a_model(workspace: Path) -> None:
    cfg = write_config(workspace, "fullft", max_steps=3, save_every=0, eval_every=0)
    proc = run_cli("train", str(cfg), "--set", "adapter.method=full", "--set", "data.packing=false")
    assert proc.returncode == 0, proc.stderr
    assert (workspace / "fullft" / "model" / "model.safetensors").exists()
    assert (workspace / "fullft" / "model" / "tokenizer.json").exists()


def test_bad_data_row_is_named(workspace: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                   + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}) + "\n")
    cfg = write_config(workspace, "bad", max_steps=2)
    proc = run_cli("train", str(cfg), "--set", f"data.train={bad}", "--set", f"output_dir={tmp_path / 'badrun'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "bad.jsonl" in proc.stderr and "row 2" in proc.stderr
