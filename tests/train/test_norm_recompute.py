"""train.recompute_norms: backward recomputes norm outputs instead of keeping them; the same bits, less kept."""

from __future__ import annotations

import gc

import pytest
import torch

from lorakit.adapters import inject_lora, lora_parameters
from lorakit.adapters.fused_mlp import fuse_lora_mlps, recompute_mlps
from lorakit.train import norm_recompute
from lorakit.train.support import cpu_bf16_supported
from tests.conftest import tiny_model

HIDDEN = 64  # tiny_model's hidden size


def adapted(arch: str, targets: list[str], dropout: float, fused: bool, full: bool = False) -> torch.nn.Module:
    model = tiny_model(arch)
    if full:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        inject_lora(model, targets, r=4, alpha=8, dropout=dropout)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in lora_parameters(model):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        if fused:
            fuse_lora_mlps(model)
    return model.train()


def run(model: torch.nn.Module, ids: torch.Tensor, autocast: bool, recompute: bool) -> tuple[torch.Tensor, list, int]:
    """Logits, the gradients of every trainable parameter, and the bytes kept for backward (each storage once)."""
    params = [p for p in model.parameters() if p.requires_grad]
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        t = norm_recompute.pack_active(t)
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    hooks = norm_recompute.install(model) if recompute else []
    torch.manual_seed(7)  # dropout masks
    try:
        with norm_recompute.recomputing() if recompute else torch.enable_grad():
            with torch.autograd.graph.saved_tensors_hooks(pack, norm_recompute.unpack), torch.autocast(
                    "cpu", dtype=torch.bfloat16, enabled=autocast):
                out = model(input_ids=ids).logits
    finally:
        for h in hooks:
            h.remove()
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad((out * upstream).sum(), params)
    return out.detach(), list(grads), sum(kept.values())


CASES = [  # arch, targets, dropout, fused MLP, full fine-tuning
    ("llama", ["all-linear"], 0.0, True, False),
    ("llama", ["all-linear"], 0.1, False, False),
    ("llama", ["q_proj", "v_proj"], 0.0, False, False),
    ("qwen2", ["all-linear"], 0.1, True, False),
    ("gpt2", ["all-linear"], 0.0, False, False),
    ("llama", [], 0.0, False, True),
]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("arch", "targets", "dropout", "fused", "full"), CASES,
                         ids=["llama-fused", "llama-dropout", "llama-qv", "qwen2-fused", "gpt2", "llama-full"])
def test_the_same_bits_and_less_kept(arch, targets, dropout, fused, full, autocast) -> None:
    if autocast and not cpu_bf16_supported():
        pytest.skip("no bf16 on this CPU")
    model = adapted(arch, targets, dropout, fused, full)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    want, want_grads, kept = run(model, ids, autocast, recompute=False)
    got, got_grads, kept_less = run(model, ids, autocast, recompute=True)
    assert torch.equal(got, want)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert torch.equal(a, b)
    if full:  # the norms' weights train: their own backward keeps the normalized input anyway
        return
    # what is no longer kept: per layer, the attention's input and (when an MLP projection has an adapter)
    # the MLP's input, each as the copy its consumers keep (bf16 under autocast, the fp32 output otherwise);
    # not the first layer's attention input: its norm reads the frozen embedding, keeps nothing, and a
    # recipe would keep the (fp32) embedding output instead
    per_norm = ids.numel() * HIDDEN * (2 if autocast else 4)
    norms = 2 if any(t in ("all-linear", "gate_proj", "up_proj") for t in targets) else 1
    assert kept - kept_less == (2 * norms - 1) * per_norm, (kept, kept_less)


def test_with_mlp_recompute_and_the_outputs_are_not_kept_alive() -> None:
    """Both levers together, and the registry holds no norm output: a freed output's address may be reused."""
    model = adapted("llama", ["all-linear"], 0.0, True)
    recompute_mlps(model, 2)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    want, want_grads, _ = run(model, ids, False, recompute=False)
    got, got_grads, _ = run(model, ids, False, recompute=True)
    assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(got_grads, want_grads, strict=True))

    hooks = norm_recompute.install(model)
    try:
        with norm_recompute.recomputing():
            out = model(input_ids=ids).logits
            gc.collect()
            registry = norm_recompute._active
            assert registry is not None and len(registry.outputs) <= 1  # only the final norm's output is alive
    finally:
        for h in hooks:
            h.remove()
    out.sum().backward()
    assert norm_recompute._active is None
