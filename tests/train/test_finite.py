"""Non-finite gradients stop training; nothing non-finite is ever written as a checkpoint or adapter."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from lorakit.adapters import inject_lora
from lorakit.adapters.state import save_adapter
from lorakit.config import TrainConfig
from lorakit.errors import LorakitError
from lorakit.losses import full_loss_sum
from lorakit.train.checkpoint import save_checkpoint
from lorakit.train.loop import train_step
from lorakit.train.optim import build_optimizer
from tests.conftest import tiny_model
from tests.train.test_units import _batch


def _lora_model():
    model = tiny_model("llama").train()
    inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    return model, build_optimizer(model, TrainConfig(), torch.device("cpu"))


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_non_finite_grad_norm_with_finite_loss_stops_before_the_step(max_grad_norm: float) -> None:
    model, opt = _lora_model()
    param = next(p for n, p in model.named_parameters() if p.requires_grad)
    param.register_hook(lambda g: g * float("nan"))  # the loss stays finite, one gradient does not
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(LorakitError, match=r"gradient norm became nan at step 7"):
        train_step(model, full_loss_sum, [_batch()], opt, max_grad_norm, contextlib.nullcontext, 7)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n]), n


def test_checkpoint_with_nan_weights_is_not_written(tmp_path: Path) -> None:
    model, opt = _lora_model()
    save_checkpoint(tmp_path, 1, model, opt, {"epoch": 0, "batch_index": 1}, keep=3)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad)[0, 0] = float("nan")
    with pytest.raises(LorakitError, match="NaN/inf"):
        save_checkpoint(tmp_path, 2, model, opt, {"epoch": 0, "batch_index": 2}, keep=3)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-1"]


def test_adapter_with_inf_weights_is_not_written(tmp_path: Path) -> None:
    model, _ = _lora_model()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n)[0, 0] = float("inf")
    with pytest.raises(LorakitError, match="not writing adapter"):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
