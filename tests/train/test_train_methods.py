"""`lorakit train` with adapter.method ia3 and selective: the loss falls, the files are right, resume is exact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import run_cli
from tests.train.test_train_cli import chat_workspace, train_losses, write_config


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chat_workspace(tmp_path_factory, "train-methods")


def test_ia3_trains_with_the_kl_anchor_saves_peft_format_resumes_and_generates(workspace: Path) -> None:
    kl = {"kl_to_base": {"weight": 1.0, "on": "all"}}  # the reference pass switches the IA3 layers off
    cfg = write_config(workspace, "ia3", {"method": "ia3"}, **kl, max_steps=24, save_every=12, eval_every=0, lr=5e-2)
    proc = run_cli("train", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert "fused SwiGLU MLP off: IA3 layers run unfused" in proc.stdout
    run = workspace / "ia3"
    losses = train_losses(run)
    assert sum(losses[s] for s in range(21, 25)) < 0.9 * sum(losses[s] for s in range(1, 5))
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"] == ["down_proj"]
    assert json.loads((run / "adapter" / "lorakit.json").read_text())["method"] == "ia3"
    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert len(weights) == 6 and all(k.endswith(".ia3_l") for k in weights)
    assert any((w - 1).abs().max() > 1e-3 for w in weights.values())  # the vectors moved off their ones
    assert "IA3 vectors on" in (run / "report.html").read_text()

    shutil.copytree(run, workspace / "ia3-resumed")  # resume from step 12: steps 13-24 repeat the run
    shutil.rmtree(workspace / "ia3-resumed" / "checkpoints" / "step-24")
    cfg = write_config(workspace, "ia3-resumed", {"method": "ia3"}, **kl, max_steps=24, save_every=12, eval_every=0,
                        lr=5e-2)
    resumed = run_cli("train", str(cfg), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    got = train_losses(workspace / "ia3-resumed")
    for step in range(13, 25):
        assert abs(got[step] - losses[step]) <= 1e-6, (step, got[step], losses[step])

    from lorakit.adapters.ia3 import ia3_layers
    from lorakit.eval.generate import GenerationSettings, generate, load_for_inference

    im = load_for_inference(None, run / "adapter")  # generate / eval / compare / chat load it this way
    assert len(list(ia3_layers(im.model))) == 6 and im.template == "auto"
    assert len(generate(im, ["what comes after"], GenerationSettings(max_new_tokens=3))) == 1


def test_selective_trains_exactly_the_matched_tensors(workspace: Path) -> None:
    adapter = {"method": "selective", "trainable": [r"model\.layers\.1\.mlp\.", r"norm\.weight$"]}
    proc = run_cli("train", str(write_config(workspace, "sel", adapter, max_steps=12, save_every=12, eval_every=0,
                                              lr=1e-2)))
    assert proc.returncode == 0, proc.stderr
    assert "selective: 8 parameter tensors train: model.layers.0.input_layernorm.weight" in proc.stdout
    run = workspace / "sel"
    manifest = json.loads((run / "adapter" / "selective.json").read_text())
    expected = {f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up", "down")} | {
        f"model.layers.{i}.{n}.weight" for i in (0, 1) for n in ("input_layernorm", "post_attention_layernorm")} | {
        "model.norm.weight"}
    assert set(manifest["tensors"]) == expected
    trained = load_file(str(run / "adapter" / "selective.safetensors"))
    base = load_file(str(workspace / "model" / "model.safetensors"))
    for name, tensor in trained.items():
        assert not (tensor == base[name]).all(), name  # each one moved
    assert set(load_file(str(run / "checkpoints" / "step-12" / "trainable.safetensors"))) == expected
    assert "8 tensors" in (run / "report.html").read_text()

    from lorakit.config import load_config
    from lorakit.errors import LorakitError
    from lorakit.train.loop import train

    kl = load_config(write_config(workspace, "sel-kl", adapter, kl_to_base={"weight": 1.0}, max_steps=2))
    with pytest.raises(LorakitError, match="selective fine-tuning trains base weights and has none"):
        train(kl, quiet=True)
