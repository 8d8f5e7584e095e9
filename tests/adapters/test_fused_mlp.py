"""The fused SwiGLU MLP (_SwiGLULoRA) computes what Hugging Face's MLP over LoRALinear layers computes, keeping less.

The reference is the unfused path: the model's own MLP forward through LoRALinear, whose
numerics tests/adapters/test_peft_interop.py checks against PEFT.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from lorakit.adapters import (
    fused_mlp,
    inject_lora,
    load_adapter,
    lora_layers,
    lora_parameters,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from lorakit.adapters.fused_mlp import fuse_lora_mlps, fusable, unfuse_lora_mlps
from tests.conftest import tiny_model

INTER, HIDDEN = 128, 64  # tiny_model's intermediate_size and hidden_size


def adapted_model(targets: list[str], dropout: float = 0.0, arch: str = "llama") -> nn.Module:
    """A tiny model with LoRA on `targets`, A and B random (B = 0 would hide B's gradient path)."""
    model = tiny_model(arch)
    inject_lora(model, targets, r=4, alpha=8, dropout=dropout)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.train()


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts forwards of the fused Function."""
    counter: list[int] = []
    apply = fused_mlp._SwiGLULoRA.apply

    def counting(*args):
        counter.append(1)
        return apply(*args)

    monkeypatch.setattr(fused_mlp._SwiGLULoRA, "apply", counting)
    return counter


def outputs_and_grads(model: nn.Module, run: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...] = (),
                      seed: int = 7) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """run()'s output and the gradients of `inputs` and every LoRA weight, for a fixed random upstream gradient."""
    torch.manual_seed(seed)  # the dropout masks
    out = run()
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    params = list(inputs) + lora_parameters(model)
    grads = torch.autograd.grad((out * weights).sum(), params, allow_unused=True)
    return out.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor], tol: float) -> None:
    for i, (a, b) in enumerate(zip(got, want)):
        scale = float(b.abs().max()) + 1e-12
        assert float((a - b).abs().max()) <= tol * scale, f"tensor {i}: max diff {float((a - b).abs().max())}"


TARGETS = [["all-linear"], ["up_proj"], ["gate_proj", "down_proj"], ["down_proj", "q_proj"]]


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("targets", TARGETS, ids=["all", "up", "gate+down", "down+q"])
def test_output_and_gradients_match_the_unfused_mlp(targets: list[str], p: float, calls: list[int]) -> None:
    model = adapted_model(targets, dropout=p)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(0), requires_grad=True)
    want_out, want = outputs_and_grads(model, lambda: mlp(x), (x,))
    assert fuse_lora_mlps(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    calls.clear()  # fuse_lora_mlps runs each MLP once on a probe
    got_out, got = outputs_and_grads(model, lambda: mlp(x), (x,))
    assert calls, "the fused Function did not run"
    assert_close([got_out] + got, [want_out] + want, 1e-5)
    if p > 0:  # the masks are really drawn: another seed gives another output
        other, _ = outputs_and_grads(model, lambda: mlp(x), (x,), seed=8)
        assert (other - got_out).abs().max() > 1e-3


def test_whole_model_with_gradient_checkpointing_and_dropout(input_ids: torch.Tensor, calls: list[int]) -> None:
    model = adapted_model(["all-linear"], dropout=0.2)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    run = lambda: model(input_ids=input_ids, use_cache=False).logits  # noqa: E731
    want_out, want = outputs_and_grads(model, run)
    fuse_lora_mlps(model)
    calls.clear()
    got_out, got = outputs_and_grads(model, run)
    assert len(calls) == 4  # 2 layers, each run again in backward by the checkpoint
    assert_close([got_out] + got, [want_out] + want, 1e-5)


def test_bf16_autocast_stays_close_to_the_unfused_path(input_ids: torch.Tensor) -> None:
    model = adapted_model(["all-linear"])

    def run() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=input_ids).logits.float()

    want_out, want = outputs_and_grads(model, run)
    fuse_lora_mlps(model)
    got_out, got = outputs_and_grads(model, run)
    assert all(g.dtype == torch.float32 for g in got)
    assert_close([got_out], [want_out], 2e-2)
    for a, b in zip(got, want):  # bf16 sums in another order: compare as vectors
        assert float((a - b).norm()) <= 5e-2 * float(b.norm())


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_fewer_bytes_kept_for_backward(p: float) -> None:
    """Per token: silu's output and the product h (2 x intermediate_size fp32 values) are no longer kept."""
    model = adapted_model(["all-linear"], dropout=p)
    mlp = model.model.layers[0].mlp
    x = torch.randn(4, 32, HIDDEN, requires_grad=True)
    params = {t.untyped_storage().data_ptr() for t in model.parameters()}

    def saved_bytes() -> int:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:  # weights are alive anyway
                storages[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mlp(x).sum().backward()
        return sum(storages.values())

    unfused = saved_bytes()
    fuse_lora_mlps(model)
    fused = saved_bytes()
    tokens = 4 * 32
    assert unfused - fused >= 2 * tokens * INTER * 4, (unfused, fused)
    assert fused < 0.65 * unfused, (unfused, fused)


def test_state_dict_and_adapter_files_do_not_change(tmp_path, input_ids: torch.Tensor) -> None:
    model = adapted_model(["all-linear"])
    keys = list(model.state_dict())
    save_adapter(model, tmp_path / "before", "tiny")
    fuse_lora_mlps(model)
    assert list(model.state_dict()) == keys
    save_adapter(model, tmp_path / "after", "tiny")
    before, after = (tmp_path / d / "adapter_model.safetensors" for d in ("before", "after"))
    assert before.read_bytes() == after.read_bytes()
    fresh = tiny_model("llama")
    inject_lora(fresh, ["all-linear"], r=4, alpha=8)
    fuse_lora_mlps(fresh)
    load_adapter(fresh, tmp_path / "after")
    with torch.no_grad():
        assert torch.equal(fresh.eval()(input_ids=input_ids).logits, model.eval()(input_ids=input_ids).logits)
    assert unfuse_lora_mlps(model) == 2 and not any("forward" in vars(m) for m in model.modules())


def test_original_forward_when_not_training_adapters(input_ids: torch.Tensor, calls: list[int]) -> None:
    model = adapted_model(["all-linear"])
    fuse_lora_mlps(model)
    calls.clear()
    with torch.no_grad():
        unmerged = model(input_ids=input_ids).logits
        merge_lora(model)
        merged = model(input_ids=input_ids).logits
    model(input_ids=input_ids)  # grad enabled, but merged
    unmerge_lora(model)
    for p in lora_parameters(model):
        p.requires_grad_(False)
    model(input_ids=input_ids)  # grad enabled, but nothing to train
    assert not calls
    for p in lora_parameters(model):
        p.requires_grad_(True)
    model(input_ids=input_ids)
    assert len(calls) == 2
    assert (merged - unmerged).abs().max() <= 1e-5


def test_only_plain_linear_silu_mlps_with_an_adapter_are_fused() -> None:
    assert fuse_lora_mlps(adapted_model(["q_proj", "v_proj"])) == []  # no adapter in the MLP
    assert fuse_lora_mlps(adapted_model(["all-linear"], arch="gpt2")) == []  # GELU MLP of Conv1D layers
    assert len(fuse_lora_mlps(adapted_model(["all-linear"], arch="qwen2"))) == 2
    model = adapted_model(["all-linear"])
    mlp = model.model.layers[0].mlp
    mlp.act_fn = nn.GELU()
    assert not fusable(mlp)
    mlp.act_fn = nn.SiLU()
    assert fusable(mlp)
    mlp.forward = lambda x: mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) + mlp.up_proj(x))  # another formula
    assert not fusable(mlp)
    del mlp.forward
    type(mlp).forward, original = (lambda self, x: self.down_proj(self.up_proj(x) * 2)), type(mlp).forward
    try:
        assert not fusable(mlp)  # the probe forward disagrees with down(silu(gate(x)) * up(x))
    finally:
        type(mlp).forward = original


def test_quantized_base_is_not_fused() -> None:
    from lorakit.quant import quantize_model_linears

    model = tiny_model("llama")
    quantize_model_linears(model, "nf4", compute_dtype=torch.float32)
    inject_lora(model, ["all-linear"], r=4, alpha=8)
    assert any(hasattr(layer.base_layer, "dequantized_weight") for _, layer in lora_layers(model))
    assert fuse_lora_mlps(model) == []


def test_dora_layers_are_not_fused() -> None:
    model = tiny_model("llama")
    inject_lora(model, ["all-linear"], r=4, alpha=8, use_dora=True)
    assert fuse_lora_mlps(model) == []


@pytest.mark.parametrize(("p", "autocast"), [(0.0, False), (0.1, False), (0.1, True)])
def test_recompute_gives_the_same_bits_and_keeps_less(p: float, autocast: bool) -> None:
    """recompute_mlps: gate and up are redone in backward from x and the kept x A^T; the gradients are the same bits."""
    from lorakit.adapters.fused_mlp import recompute_mlps
    from lorakit.train.support import cpu_bf16_supported

    if autocast and not cpu_bf16_supported():
        pytest.skip("no bf16 on this CPU")

    model = adapted_model(["all-linear"], dropout=p)
    fuse_lora_mlps(model)
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    params = {t.untyped_storage().data_ptr() for t in model.parameters()}

    def run_saving() -> tuple[torch.Tensor, list[torch.Tensor], int]:
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(
                "cpu", dtype=torch.bfloat16, enabled=autocast):
            out, grads = outputs_and_grads(model, lambda: model(input_ids=x).logits)
        return out, grads, sum(saved.values())

    want, want_grads, kept = run_saving()
    assert recompute_mlps(model, 1) == 1  # the first layer's MLP
    got, got_grads, kept_less = run_saving()
    assert torch.equal(got, want)
    for a, b in zip(got_grads, want_grads):
        assert torch.equal(a, b)
    assert kept - kept_less == 2 * x.numel() * INTER * (2 if autocast else 4), (kept, kept_less)
