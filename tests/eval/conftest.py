"""A tiny model LoRA-trained once per session, shared by the generation and evaluation tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli, save_tiny_model_dir
from tests.train.test_train_cli import write_chat_data


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model LoRA-trained until it answers 'what comes after X?' with 'after X comes Y.'"""
    root = tmp_path_factory.mktemp("gen")
    save_tiny_model_dir(root / "model")
    write_chat_data(root / "train.jsonl", n=16)
    cfg = {
        "model": {"name": str(root / "model"), "dtype": "fp32"},
        "adapter": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"train": str(root / "train.jsonl"), "max_length": 128, "eval_ratio": 0.0,
                 "system_prompt": "answer briefly"},
        "train": {"max_steps": 300, "batch_size": 4, "lr": 2e-2, "log_every": 10, "precision": "fp32",
                  "warmup_steps": 2},
        "output_dir": str(root / "run"),
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_cli("train", str(root / "cfg.yaml"))
    assert proc.returncode == 0, proc.stderr
    return root
