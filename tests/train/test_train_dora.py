"""`lorakit train` with adapter.method dora: the loss falls, the adapter is PEFT's DoRA format, resume is exact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import run_cli
from tests.train.test_train_cli import chat_workspace, train_losses, write_config

DORA = {"method": "dora"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chat_workspace(tmp_path_factory, "train-dora")


def test_dora_trains_saves_peft_format_and_resumes_exactly(workspace: Path) -> None:
    proc = run_cli("train", str(write_config(workspace, "dora", DORA, max_steps=24, save_every=12, eval_every=0)))
    assert proc.returncode == 0, proc.stderr
    assert "fused SwiGLU MLP off: DoRA layers run unfused" in proc.stdout
    run = workspace / "dora"
    losses = train_losses(run)
    assert sum(losses[s] for s in range(21, 25)) < 0.7 * sum(losses[s] for s in range(1, 5))
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    assert json.loads((run / "adapter" / "lorakit.json").read_text())["method"] == "dora"
    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert sum(k.endswith(".lora_magnitude_vector") for k in weights) == 14
    trainable = load_file(str(run / "checkpoints" / "step-24" / "trainable.safetensors"))
    assert sum(k.endswith(".magnitude") for k in trainable) == 14  # the magnitude trains and is checkpointed

    # Resume from step 12 (the newer checkpoint removed): steps 13-24 repeat the uninterrupted run.
    shutil.copytree(run, workspace / "dora-resumed")
    shutil.rmtree(workspace / "dora-resumed" / "checkpoints" / "step-24")
    cfg = write_config(workspace, "dora-resumed", DORA, max_steps=24, save_every=12, eval_every=0)
    resumed = run_cli("train", str(cfg), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "step 12" in resumed.stdout
    got = train_losses(workspace / "dora-resumed")
    for step in range(13, 25):
        assert abs(got[step] - losses[step]) <= 1e-6, (step, got[step], losses[step])


def test_qdora_trains_on_an_nf4_base(workspace: Path) -> None:
    path = write_config(workspace, "qdora", DORA, max_steps=16, save_every=0, eval_every=0)
    cfg = yaml.safe_load(path.read_text())
    cfg["quantization"] = {"method": "nf4", "compute_dtype": "fp32"}
    path.write_text(yaml.safe_dump(cfg))
    proc = run_cli("train", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "quantized 14 linear layers to nf4" in proc.stdout
    losses = train_losses(workspace / "qdora")
    assert sum(losses[s] for s in range(13, 17)) < 0.8 * sum(losses[s] for s in range(1, 5))
    meta = json.loads((workspace / "qdora" / "adapter" / "lorakit.json").read_text())
    assert meta["method"] == "dora" and meta["quantization"]["method"] == "nf4"
    assert json.loads((workspace / "qdora" / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
