"""TrainState: the run's progress through a checkpoint's trainer_state.json, in the format it always had."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from lorakit.adapters import inject_lora
from lorakit.config import TrainConfig
from lorakit.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from lorakit.train.optim import build_optimizer
from tests.conftest import tiny_model

# trainer_state.json's keys as the loop wrote them before TrainState existed (two hand-built dicts).
OLD_KEYS = ["epoch", "batch_index", "best_eval_loss", "tokens", "trained_tokens", "elapsed", "early_stop",
            "step", "python_rng", "world_size"]


def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = tiny_model("llama").train()
    inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    return model, build_optimizer(model, TrainConfig(), torch.device("cpu"))


def test_train_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    model, opt = _model_and_optimizer()
    early = {"metric": "fact", "patience": 2, "best": 0.5, "best_step": 4, "bad": 1, "stopped_at": None}
    state = TrainState(step=6, epoch=1, batch_index=3, best_eval_loss=1.25, tokens=900, trained_tokens=300,
                       elapsed=12.5, early_stop=early)
    save_checkpoint(tmp_path, state.step, model, opt, state.fields(), keep=2)
    path = tmp_path / "checkpoints" / "step-6"
    assert list(json.loads((path / "trainer_state.json").read_text())) == OLD_KEYS  # the on-disk format is unchanged
    other, other_opt = _model_and_optimizer()
    assert TrainState.read(load_checkpoint(path, other, other_opt)) == state


def test_a_run_without_an_eval_loss_keeps_infinity_as_before(tmp_path: Path) -> None:
    model, opt = _model_and_optimizer()
    save_checkpoint(tmp_path, 2, model, opt, TrainState(step=2, batch_index=2).fields(), keep=1)
    text = (tmp_path / "checkpoints" / "step-2" / "trainer_state.json").read_text()
    assert '"best_eval_loss": Infinity' in text
    other, other_opt = _model_and_optimizer()
    read = TrainState.read(load_checkpoint(tmp_path / "checkpoints" / "step-2", other, other_opt))
    assert read.best_eval_loss == math.inf and read.early_stop is None


def test_an_older_trainer_state_without_counters_reads_with_defaults(tmp_path: Path) -> None:
    model, opt = _model_and_optimizer()
    save_checkpoint(tmp_path, 3, model, opt, {"epoch": 0, "batch_index": 3}, keep=1)  # only what read_checkpoint needs
    other, other_opt = _model_and_optimizer()
    read = TrainState.read(load_checkpoint(tmp_path / "checkpoints" / "step-3", other, other_opt))
    assert read == TrainState(step=3, epoch=0, batch_index=3)
