"""Training options change how, not what: checkpointing, accumulation, compile, bf16, TensorBoard."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest

from lorakit.config import load_config
from lorakit.errors import LorakitError
from lorakit.train.loop import train
from lorakit.train.support import cpu_bf16_supported
from tests.train.test_train_cli import chat_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chat_workspace(tmp_path_factory, "options")


def run(root: Path, name: str, *overrides: str):
    cfg = load_config(None, [
        f"model.name={root / 'model'}", "model.dtype=fp32", f"data.train={root / 'train.jsonl'}",
        "data.max_length=64", "data.eval_ratio=0.25", "adapter.r=4", "adapter.alpha=8", "adapter.dropout=0",
        "train.max_steps=6", "train.batch_size=4", "train.lr=1e-2", "train.precision=fp32", "train.log_every=1",
        "train.warmup_steps=0", f"output_dir={root / name}", "seed=5", *overrides,
    ])
    return train(cfg, quiet=True)


def test_gradient_checkpointing_gives_the_same_losses(workspace: Path) -> None:
    plain = run(workspace, "plain")
    ckpt = run(workspace, "ckpt", "train.gradient_checkpointing=true")
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-5)
    assert ckpt.eval_loss == pytest.approx(plain.eval_loss, rel=1e-5)


def test_fused_mlp_gives_the_same_losses(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropout on: the fused MLP draws the same masks in the same order as the unfused one."""
    import json

    from lorakit.adapters import fused_mlp

    calls: list[int] = []
    apply = fused_mlp._SwiGLULoRA.apply
    monkeypatch.setattr(fused_mlp._SwiGLULoRA, "apply", lambda *a: calls.append(1) or apply(*a))
    unfused = run(workspace, "unfused", "adapter.dropout=0.1", "train.fused_mlp=false")
    assert not calls
    fused = run(workspace, "fused", "adapter.dropout=0.1")
    assert len(calls) > 2 * 6  # more than the install probes: every training step
    assert fused.losses == pytest.approx(unfused.losses, rel=1e-5)
    assert fused.eval_loss == pytest.approx(unfused.eval_loss, rel=1e-5)
    start = json.loads((workspace / "fused" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["fused_mlps"] == 2


def test_gradient_accumulation_equals_the_bigger_batch() -> None:
    """2 micro-batches of 2 rows = 1 batch of 4 rows: same loss, same update (loss averaged over all tokens)."""
    import copy

    import torch

    from lorakit.adapters import inject_lora, lora_parameters
    from lorakit.train.loop import train_step
    from lorakit.train.loss import fast_loss_sum
    from tests.conftest import tiny_model

    torch.manual_seed(0)
    model = tiny_model("llama")
    inject_lora(model, ["all-linear"], r=4, alpha=8)
    for p in lora_parameters(model):
        torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, :12] = -100  # rows train different numbers of tokens: a per-micro-batch mean would differ
    whole = {"input_ids": ids, "labels": labels}
    halves = [{"input_ids": ids[:2], "labels": labels[:2]}, {"input_ids": ids[2:], "labels": labels[2:]}]
    twin = copy.deepcopy(model)
    import contextlib

    results = []
    for m, micro in ((model, [whole]), (twin, halves)):
        opt = torch.optim.AdamW(lora_parameters(m), lr=1e-2)
        loss, norm, _ = train_step(m, fast_loss_sum, micro, opt, 1.0, contextlib.nullcontext, 1)
        results.append((loss, norm, [p.detach().clone() for p in lora_parameters(m)]))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-5)
    for a, b in zip(results[0][2], results[1][2]):
        assert torch.allclose(a, b, atol=1e-6)


def test_torch_compile_gives_the_same_losses(workspace: Path) -> None:
    plain = run(workspace, "plain-c", "train.max_steps=3")
    compiled = run(workspace, "compiled", "train.max_steps=3", "train.compile=true")
    assert compiled.losses == pytest.approx(plain.losses, rel=1e-4)


@pytest.mark.skipif(not cpu_bf16_supported(), reason="this CPU has no fast bf16")
def test_bf16_autocast_trains_close_to_fp32(workspace: Path) -> None:
    fp32 = run(workspace, "fp32")
    bf16 = run(workspace, "bf16", "train.precision=bf16")
    assert bf16.losses[0] == pytest.approx(fp32.losses[0], rel=0.03)  # same batch, bf16 rounding
    assert bf16.losses[-1] < bf16.losses[0]
    import json

    start = next(json.loads(line) for line in (workspace / "bf16" / "metrics.jsonl").read_text().splitlines())
    assert start["precision"] == "torch.bfloat16"


def test_tensorboard_without_the_package_is_a_clear_error(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(LorakitError, match="pip install tensorboard"):
        run(workspace, "tb-missing", "train.tensorboard=true")


def test_tensorboard_writes_event_files(workspace: Path) -> None:
    pytest.importorskip("tensorboard")
    run(workspace, "tb", "train.tensorboard=true", "train.max_steps=2")
    assert list((workspace / "tb" / "tensorboard").glob("events.out.tfevents.*"))


def test_metrics_report_memory(workspace: Path) -> None:
    import json

    run(workspace, "mem", "train.max_steps=2")
    events = [json.loads(line) for line in (workspace / "mem" / "metrics.jsonl").read_text().splitlines()]
    train_events = [e for e in events if e["event"] == "train"]
    assert all(e["rss_mb"] > 50 and e["peak_rss_mb"] >= e["rss_mb"] for e in train_events)


def test_packing_probe_accepts_isolating_models_and_rejects_leaky_ones() -> None:
    import torch

    from lorakit.quant import quantize_model_linears
    from lorakit.train.support import packing_works
    from tests.conftest import tiny_model

    cpu = torch.device("cpu")
    assert packing_works(tiny_model("llama"), cpu)
    bf16_nf4 = tiny_model("llama").to(torch.bfloat16)  # rounding noise alone must not fail the probe
    quantize_model_linears(bf16_nf4, "nf4", compute_dtype=torch.bfloat16)
    assert packing_works(bf16_nf4, cpu)

    class Leaky(torch.nn.Module):
        """Ignores position_ids: the packed second sequence attends to the first."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_model("llama")

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def forward(self, input_ids, position_ids=None, use_cache=False):
            return self.inner(input_ids=input_ids, use_cache=use_cache)

    assert not packing_works(Leaky(), cpu)


def test_frozen_lower_blocks_are_replayed_with_the_same_results(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LoRA on block 1 only: block 0's output is recorded in epoch 1 and replayed after, same losses."""
    import json

    import torch
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    calls: list[int] = []
    forward = LlamaDecoderLayer.forward
    monkeypatch.setattr(LlamaDecoderLayer, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    upper = r"adapter.target_modules=['model\.layers\.1\.(self_attn|mlp)\.\w+_proj']"
    steps = ["train.max_steps=0", "train.epochs=3", "train.batch_size=2"]  # packed rows: several per epoch
    plain = run(workspace, "unreplayed", upper, *steps, "train.cache_frozen=false")
    plain_calls, calls[:] = len(calls), []
    replayed = run(workspace, "replayed", upper, *steps)
    assert replayed.frozen_replays > 0 and plain.frozen_replays == 0
    assert len(calls) < plain_calls  # block 0 was skipped in epochs 2 and 3
    assert replayed.losses == pytest.approx(plain.losses, rel=1e-5)
    assert replayed.eval_loss == pytest.approx(plain.eval_loss, rel=1e-5)
    from safetensors.torch import load_file

    a = load_file(workspace / "unreplayed" / "adapter" / "adapter_model.safetensors")
    b = load_file(workspace / "replayed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    summary = json.loads((workspace / "replayed" / "eval.json").read_text())
    assert summary["frozen_block_replays"] == replayed.frozen_replays


def test_frozen_blocks_are_not_replayed_where_it_would_change_the_result() -> None:
    """All blocks adapted, a trainable embedding (prompt tuning), or dropout below: no cache."""
    from lorakit.adapters import inject_lora
    from lorakit.train.frozen_cache import frozen_block_cache
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    inject_lora(model, [r"model\.layers\.1\.mlp\.\w+_proj"], r=4, alpha=8)
    cache = frozen_block_cache(model)
    assert cache is not None and cache.k == 1
    cache.remove()
    model.get_input_embeddings().weight.requires_grad_(True)
    assert frozen_block_cache(model) is None
    model.get_input_embeddings().weight.requires_grad_(False)
    model.model.layers[0].self_attn.attention_dropout = 0.1
    assert frozen_block_cache(model) is None
    everywhere = tiny_model("llama")
    for p in everywhere.parameters():
        p.requires_grad_(False)
    inject_lora(everywhere, ["all-linear"], r=4, alpha=8)
    assert frozen_block_cache(everywhere) is None


def test_memory_levers_give_the_same_losses(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 23's levers (grouped-K/V attention with one mask, norm outputs and MLPs recomputed, the allocator
    setting, the frozen head's gradient in the forward and its smaller chunks) against the loop without them: the same fp32 losses, dropout on."""
    from lorakit.adapters import fused_mlp
    from lorakit.train import loop

    recomputed: list[int] = []
    counting = fused_mlp.recompute_mlps
    monkeypatch.setattr(loop, "recompute_mlps", lambda model, n: recomputed.append(counting(model, n)) or recomputed[-1])
    after = run(workspace, "levers", "adapter.dropout=0.1", "train.memory_budget_gb=0.001")
    assert recomputed == [2]  # both layers: no budget this small is met
    monkeypatch.setattr(loop, "gqa_attention", lambda model: None)
    monkeypatch.setattr(loop, "low_fragmentation", contextlib.nullcontext)
    from lorakit.train import loss as loss_mod

    monkeypatch.setattr(loss_mod, "_frozen", lambda head: False)  # the head's chunks checkpointed, as before
    monkeypatch.setattr(loss_mod, "LOGIT_ELEMENTS", 1 << 40)  # ... 1024 rows each, as before
    before = run(workspace, "no-levers", "adapter.dropout=0.1", "train.recompute_norms=false")
    assert after.losses == pytest.approx(before.losses, rel=1e-5, abs=1e-5)
    assert after.eval_loss == pytest.approx(before.eval_loss, rel=1e-5)


def test_recomputed_norms_give_the_same_losses(workspace: Path) -> None:
    """train.recompute_norms (on by default) against off: the same bits, dropout on."""
    on = run(workspace, "norms-on", "adapter.dropout=0.1")
    off = run(workspace, "norms-off", "adapter.dropout=0.1", "train.recompute_norms=false")
    assert on.losses == off.losses and on.eval_loss == off.eval_loss


def test_memory_plan_recomputes_only_what_the_budget_needs() -> None:
    from lorakit.train.memory_plan import kept_bytes_per_token, plan
    from tests.conftest import tiny_model

    model = tiny_model("llama")  # 2 layers, hidden 64, intermediate 128, 4 heads, 2 K/V heads
    per_layer, gate_up = kept_bytes_per_token(model.config, 4)
    assert gate_up == 2 * 128 * 4
    assert per_layer == 2 * 64 * 4 + (2 * 64 + 2 * 32) * 4 + gate_up  # residual twice, q/out, k/v, g/u
    assert kept_bytes_per_token(model.config, 4, norms_recomputed=False)[0] == per_layer + 2 * 64 * 4
    tokens = 2**20  # 1 MiB per byte per token
    roomy = plan(model, 2, tokens, 4, 1000.0, 100.0)
    assert roomy.recompute_layers == 0 and roomy.estimate_mb == roomy.keep_all_mb
    one = plan(model, 2, tokens, 4, 1000.0, (roomy.keep_all_mb - 1) / 1024)
    assert one.recompute_layers == 1 and one.estimate_mb < one.keep_all_mb
    assert plan(model, 2, tokens, 4, 1000.0, 0.5).recompute_layers == 2
