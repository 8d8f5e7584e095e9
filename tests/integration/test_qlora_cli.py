"""QLoRA end to end through the CLI: training, the adapter's recorded quantization, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lorakit.adapters import load_adapter
from lorakit.models.load import load_model, quant_spec
from tests.conftest import run_cli, save_tiny_model_dir
from tests.train.test_train_cli import train_losses, write_chat_data


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_qlora_training_through_the_cli(tmp_path):
    """A tiny model trained with QLoRA: loss goes down, the adapter records the quantization and round-trips."""
    save_tiny_model_dir(tmp_path / "model")
    write_chat_data(tmp_path / "train.jsonl")
    cfg = write_yaml(tmp_path / "qlora.yaml", {
        "model": {"name": str(tmp_path / "model"), "dtype": "fp32"},
        "adapter": {"method": "qlora", "r": 8, "alpha": 16, "dropout": 0.0},
        "quantization": {"compute_dtype": "fp32"},
        "data": {"train": str(tmp_path / "train.jsonl"), "max_length": 64, "eval_ratio": 0.25},
        "train": {"max_steps": 30, "batch_size": 4, "lr": 2e-2, "log_every": 1, "precision": "fp32", "warmup_steps": 2},
        "output_dir": str(tmp_path / "run"),
    })
    proc = run_cli("train", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert "quantized 14 linear layers to nf4" in proc.stdout
    losses = train_losses(tmp_path / "run")
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (28, 29, 30)) / 3
    assert last < 0.7 * first, (first, last)
    meta = json.loads((tmp_path / "run" / "adapter" / "lorakit.json").read_text())
    assert meta["method"] == "qlora"
    assert meta["quantization"]["method"] == "nf4" and meta["quantization"]["blocksize"] == 64
    assert meta["quantization"]["double_quant"] is True
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["quantization"]["method"] == "nf4"

    # the adapter loads onto a freshly quantized base and reproduces the trained model's eval loss
    from lorakit.config import load_config as lc
    from lorakit.data import build_datasets, make_batches, pack_examples
    from lorakit.train.loop import evaluate
    from lorakit.train.loss import fast_loss_sum

    run_cfg = lc(tmp_path / "run" / "config.yaml")
    loaded = load_model(str(tmp_path / "model"), "fp32", quantization=quant_spec(run_cfg.quantization))
    load_adapter(loaded.model, tmp_path / "run" / "adapter")
    data = build_datasets(run_cfg.data, loaded.tokenizer, run_cfg.seed)
    items = pack_examples(data.eval, run_cfg.data.max_length, run_cfg.seed)
    batches = make_batches(items, 4, loaded.tokenizer.pad_token_id, run_cfg.seed, 0, shuffle=False)
    import contextlib

    loss = evaluate(loaded.model, fast_loss_sum, batches, contextlib.nullcontext)
    recorded = json.loads((tmp_path / "run" / "eval.json").read_text())["eval_loss"]
    assert loss == pytest.approx(recorded, rel=1e-5)
    # and onto the full-precision base, where it still helps (the base differs by the quantization error)
    full = load_model(str(tmp_path / "model"), "fp32").model
    base_loss = evaluate(full, fast_loss_sum, batches, contextlib.nullcontext)
    load_adapter(full, tmp_path / "run" / "adapter")
    assert evaluate(full, fast_loss_sum, batches, contextlib.nullcontext) < base_loss


def test_qlora_errors(tmp_path):
    save_tiny_model_dir(tmp_path / "model")
    write_chat_data(tmp_path / "train.jsonl")
    cfg = write_yaml(tmp_path / "bad.yaml", {
        "model": {"name": str(tmp_path / "model")},
        "adapter": {"method": "full"},
        "quantization": {"method": "nf4"},
        "data": {"train": str(tmp_path / "train.jsonl")},
        "output_dir": str(tmp_path / "run"),
    })
    proc = run_cli("train", str(cfg))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "a quantized base cannot be trained" in proc.stderr
    assert not (tmp_path / "run").exists()
