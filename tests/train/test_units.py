"""Schedule, loss path and checkpoint pieces of the training loop."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lorakit.adapters import inject_lora
from lorakit.config import TrainConfig
from lorakit.losses import full_loss_sum
from lorakit.train.checkpoint import load_checkpoint, save_checkpoint
from lorakit.train.loss import check_fast_loss, fast_loss_sum
from lorakit.train.optim import build_optimizer, lr_at
from tests.conftest import tiny_model


def test_lr_schedules() -> None:
    cfg = TrainConfig(lr=1.0, warmup_steps=10, schedule="cosine")
    lrs = [lr_at(s, 110, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.5)
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    lin = TrainConfig(lr=2.0, warmup_ratio=0.0, schedule="linear")
    assert lr_at(0, 4, lin) == 2.0 and lr_at(2, 4, lin) == pytest.approx(1.0)
    assert lr_at(50, 100, TrainConfig(lr=3.0, schedule="constant", warmup_ratio=0.0)) == 3.0


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 40), generator=g)
    labels = ids.clone()
    labels[:, :15] = -100
    labels[1, 30:] = -100
    return {"input_ids": ids, "labels": labels}


def _lora_model() -> torch.nn.Module:
    """A tiny Llama with LoRA on every linear layer, B nonzero (B = 0 would hide the LoRA gradients)."""
    model = tiny_model("llama").train()
    inject_lora(model, ["all-linear"], r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def test_fast_loss_equals_full_logits_loss_and_grads() -> None:
    model = _lora_model()
    batch = _batch()
    fast, n_fast = fast_loss_sum(model, batch)
    fast.backward()
    g_fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    full, n_full = full_loss_sum(model, batch)
    full.backward()
    g_full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert n_fast == n_full == int((batch["labels"][:, 1:] != -100).sum())
    assert torch.allclose(fast, full, rtol=1e-5)
    assert g_fast.keys() == g_full.keys()
    assert all(torch.allclose(g_fast[k], g_full[k], atol=1e-6, rtol=1e-4) for k in g_fast)
    assert check_fast_loss(model, batch)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_frozen_head_gradient_in_the_forward_matches_the_checkpointed_head(autocast: bool,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """_FrozenHeadCE (a frozen head: its gradient taken chunk by chunk in the forward) against the checkpointed
    chunks it replaces: the same loss bits, gradients equal but for where the loss scale is applied; several chunks."""
    from lorakit.train import loss as loss_mod
    from lorakit.train.support import cpu_bf16_supported

    if autocast and not cpu_bf16_supported():
        pytest.skip("no bf16 on this CPU")
    monkeypatch.setattr(loss_mod, "LOGIT_ELEMENTS", 16 * 128)  # 16 rows per chunk: several chunks
    model = _lora_model()
    batch = _batch()

    def run(frozen_path: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        calls: list[int] = []
        apply = loss_mod._FrozenHeadCE.apply
        monkeypatch.setattr(loss_mod._FrozenHeadCE, "apply", lambda *a: calls.append(1) or apply(*a))
        monkeypatch.setattr(loss_mod, "_frozen", lambda head: frozen_path)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            total, n = fast_loss_sum(model, batch)
        (total / n).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        assert len(calls) == int(frozen_path)
        return total.detach(), grads, n

    fused, g_fused, n = run(True)
    plain, g_plain, _ = run(False)
    assert n > 16 and torch.equal(fused, plain)
    assert g_fused.keys() == g_plain.keys() and g_fused
    for k in g_fused:
        scale = float(g_plain[k].abs().max())  # bf16: the logits' gradient is rounded to bf16 before / after scaling
        torch.testing.assert_close(g_fused[k], g_plain[k], rtol=1e-2 if autocast else 1e-5,
                                   atol=(2e-2 if autocast else 1e-6) * scale)
    trainable = tiny_model("llama").train()  # full fine-tuning: the head trains, the checkpointed path is taken
    calls: list[int] = []
    apply = loss_mod._FrozenHeadCE.apply
    monkeypatch.setattr(loss_mod._FrozenHeadCE, "apply", lambda *a: calls.append(1) or apply(*a))
    monkeypatch.setattr(loss_mod, "_frozen", lambda head: not any(p.requires_grad for p in head.parameters()))
    fast_loss_sum(trainable, batch)[0].backward()
    assert calls == [] and trainable.get_output_embeddings().weight.grad is not None


def test_checkpoint_round_trip_restores_weights_optimizer_and_rng(tmp_path: Path) -> None:
    model = tiny_model("llama").train()
    inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    opt = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    for _ in range(2):
        loss, _ = full_loss_sum(model, _batch())
        loss.backward()
        opt.step()
        opt.zero_grad()
    torch.manual_seed(123)
    save_checkpoint(tmp_path, 2, model, opt, {"epoch": 0, "batch_index": 2}, keep=1)
    expected_rand = torch.rand(3)
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    saved_opt = opt.state_dict()

    other = tiny_model("llama").train()
    inject_lora(other, ["q_proj", "v_proj"], r=4, alpha=8)
    other_opt = build_optimizer(other, TrainConfig(), torch.device("cpu"))
    state = load_checkpoint(tmp_path / "checkpoints" / "step-2", other, other_opt)
    assert state["step"] == 2 and state["batch_index"] == 2
    assert torch.equal(torch.rand(3), expected_rand)
    for n, p in other.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, saved[n])
    for idx, st in other_opt.state_dict()["state"].items():
        for key, value in st.items():
            assert torch.equal(value, saved_opt["state"][idx][key])
    assert (tmp_path / "checkpoints" / "step-2" / "adapter" / "adapter_model.safetensors").exists()
    save_checkpoint(tmp_path, 4, model, opt, {"epoch": 0, "batch_index": 4}, keep=1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-4"]
