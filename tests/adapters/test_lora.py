"""The LoRA layer and its injection, on tiny Llama / Qwen2 / Mistral / GPT-2 models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lorakit.adapters import (
    LoRALinear,
    count_parameters,
    find_targets,
    inject_lora,
    lora_layers,
    merge_lora,
    scale_lora,
    unmerge_lora,
    unwrap_lora,
)
from lorakit.errors import LorakitError
from tests.conftest import tiny_model

ARCHS = ["llama", "qwen2", "mistral", "gpt2"]


def _randomize_b(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_adapter_changes_nothing(arch: str, input_ids: torch.Tensor) -> None:
    model = tiny_model(arch)
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
    inject_lora(model, ["all-linear"], r=4, alpha=8)
    with torch.no_grad():
        after = model(input_ids=input_ids).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_equals_unmerged_and_is_idempotent(arch: str, input_ids: torch.Tensor) -> None:
    model = tiny_model(arch)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject_lora(model, ["all-linear"], r=4, alpha=8)
    _randomize_b(model)
    with torch.no_grad():
        unmerged = model(input_ids=input_ids).logits
        merge_lora(model)
        merged = model(input_ids=input_ids).logits
        weights_once = {n: p.detach().clone() for n, p in model.named_parameters()}
        merge_lora(model)  # a second merge is a no-op
        weights_twice = {n: p.detach().clone() for n, p in model.named_parameters()}
        unmerge_lora(model)
        unmerge_lora(model)
        restored = model(input_ids=input_ids).logits
    assert (merged - unmerged).abs().max().item() <= 1e-5
    assert all(torch.equal(weights_once[n], weights_twice[n]) for n in weights_once)
    assert (restored - unmerged).abs().max().item() <= 1e-5
    for name, layer in lora_layers(model):
        original = base_weights[f"{name}.weight"]
        assert torch.allclose(layer.base_layer.weight, original, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_only_lora_params_train_and_count_is_r_in_plus_out(arch: str, input_ids: torch.Tensor) -> None:
    model = tiny_model(arch)
    r = 4
    names = inject_lora(model, ["all-linear"], r=r, alpha=8)
    _randomize_b(model)
    model.train()
    model(input_ids=input_ids).logits.sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    expected = sum(r * (layer.in_features + layer.out_features) for _, layer in lora_layers(model))
    trainable, total = count_parameters(model)
    assert trainable == expected
    assert len(names) == len(list(lora_layers(model)))
    assert total > trainable


def test_all_linear_excludes_output_head() -> None:
    model = tiny_model("llama")
    names = find_targets(model, ["all-linear"])
    assert "lm_head" not in names
    assert len(names) == 2 * 7  # q k v o gate up down per layer
    gpt2 = tiny_model("gpt2")
    assert "lm_head" not in find_targets(gpt2, ["all-linear"])


def test_target_matching_exact_suffix_and_regex() -> None:
    model = tiny_model("llama")
    assert find_targets(model, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert find_targets(model, ["model.layers.1.mlp.up_proj"]) == ["model.layers.1.mlp.up_proj"]
    assert find_targets(model, ["mlp.down_proj"]) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert find_targets(model, [r"model\.layers\.0\.self_attn\.(q|v)_proj"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    assert "lm_head" in find_targets(model, ["lm_head"])  # asked for by name, it is allowed
    with pytest.raises(LorakitError, match="matched no linear layer"):
        find_targets(model, ["proj"])


def test_no_match_lists_available_names() -> None:
    model = tiny_model("llama")
    with pytest.raises(LorakitError) as err:
        inject_lora(model, ["c_attn"], r=4, alpha=8)
    message = str(err.value)
    assert "q_proj (2)" in message and "down_proj (2)" in message and "lm_head (1)" in message
    with pytest.raises(LorakitError, match="not a valid regex"):
        find_targets(model, ["q_proj("])


def test_scaling_rslora_and_inits() -> None:
    base = nn.Linear(32, 16)
    assert LoRALinear(base, r=8, alpha=16).scaling == 2.0
    assert LoRALinear(nn.Linear(32, 16), r=16, alpha=16, use_rslora=True).scaling == pytest.approx(16 / math.sqrt(16))
    torch.manual_seed(0)
    kaiming = LoRALinear(nn.Linear(1000, 16), r=64, alpha=16)
    bound = 1 / math.sqrt(1000)  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    assert kaiming.lora_A.weight.abs().max() <= bound
    assert kaiming.lora_A.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(kaiming.lora_B.weight) == 0
    gauss = LoRALinear(nn.Linear(1000, 16), r=64, alpha=16, init="gaussian")
    assert gauss.lora_A.weight.std().item() == pytest.approx(1 / 64, rel=0.05)
    with pytest.raises(LorakitError):
        LoRALinear(nn.Linear(4, 4), r=0, alpha=1)


def test_dropout_only_on_lora_path() -> None:
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, r=4, alpha=4, dropout=0.5).train()
    x = torch.randn(64, 16)
    # B = 0: the LoRA path contributes nothing, so dropout must not touch the output.
    assert torch.equal(layer(x), base(x))
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    outs = [layer(x) for _ in range(2)]
    assert not torch.equal(outs[0], outs[1])  # dropout active on the LoRA path in train mode
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_gpt2_conv1d_merge_uses_transposed_layout(input_ids: torch.Tensor) -> None:
    model = tiny_model("gpt2")
    inject_lora(model, ["c_attn", "c_fc"], r=4, alpha=8)
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(layer, LoRALinear) and layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (64, 192)
    _randomize_b(model)
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        unwrap_lora(model)
        got = model(input_ids=input_ids).logits
    assert not list(lora_layers(model))
    assert (expected - got).abs().max().item() <= 1e-5


def test_bf16_base_keeps_fp32_adapter() -> None:
    model = tiny_model("llama").to(torch.bfloat16)
    inject_lora(model, ["q_proj"], r=4, alpha=8)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.lora_A.weight.dtype == torch.float32
    assert layer.base_layer.weight.dtype == torch.bfloat16
    out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert out.dtype == torch.bfloat16


def test_merge_refuses_nan() -> None:
    layer = LoRALinear(nn.Linear(8, 8), r=2, alpha=2)
    with torch.no_grad():
        layer.lora_B.weight.fill_(float("nan"))
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(LorakitError, match="NaN"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged


def test_double_injection_is_refused() -> None:
    model = tiny_model("llama")
    inject_lora(model, ["q_proj"], r=2, alpha=2)
    with pytest.raises(LorakitError, match="already has a LoRA adapter"):
        inject_lora(model, ["q_proj"], r=2, alpha=2)


@pytest.mark.parametrize("merged", [False, True])
def test_scale_equals_b_times_scale_and_rescales(merged: bool, input_ids: torch.Tensor) -> None:
    """scale s == the same adapter with B multiplied by s, unmerged and merged, after earlier scales."""
    model, reference = tiny_model("llama"), tiny_model("llama")  # same seed: same base weights
    inject_lora(model, ["all-linear"], r=4, alpha=8)
    inject_lora(reference, ["all-linear"], r=4, alpha=8)
    _randomize_b(model)
    if merged:
        merge_lora(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scale_lora(model, 1.0)  # the current scale: nothing moves, not even by rounding
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    for scale in (0.5, 2.0, 0.25):
        scale_lora(model, scale)
        assert all(layer.merged == merged and layer.scale == scale for _, layer in lora_layers(model))
        with torch.no_grad():
            for (_, layer), (_, ref) in zip(lora_layers(model), lora_layers(reference)):
                assert ref.scaling == layer.scaling / scale == 2.0
                ref.lora_A.weight.copy_(layer.lora_A.weight)
                ref.lora_B.weight.copy_(layer.lora_B.weight * scale)
            got, expected = model(input_ids=input_ids).logits, reference(input_ids=input_ids).logits
        assert (got - expected).abs().max().item() <= 1e-5, scale
    scale_lora(model, 1.0)
    layer = next(layer for _, layer in lora_layers(model))
    assert layer.scaling == 2.0 and "(scale" not in layer.extra_repr()
    with pytest.raises(LorakitError, match="finite"):
        layer.set_scale(float("nan"))


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_autocast_keeps_one_compute_dtype_copy_of_a_shared_input(p: float) -> None:
    """q, k and v under bf16 autocast keep one bf16 copy of their common input for backward, not the fp32 input
    (nor a copy each), and give the gradients of plain autograd through the same bf16 ops (PEFT's formulation)."""
    from lorakit.train.support import cpu_bf16_supported

    if not cpu_bf16_supported():
        pytest.skip("no bf16 on this CPU")
    layers = [LoRALinear(nn.Linear(64, n), r=4, alpha=8, dropout=p) for n in (48, 32, 32)]  # q, k, v
    for i, layer in enumerate(layers):
        layer.base_layer.requires_grad_(False)
        nn.init.normal_(layer.lora_B.weight, std=0.1, generator=torch.Generator().manual_seed(i))
    x = torch.randn(3, 10, 64, requires_grad=True)
    storages: dict[int, tuple[torch.dtype, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.shape == x.shape and t.dtype != torch.bool:  # (dropout masks are 1-byte, one per layer)
            storages[t.untyped_storage().data_ptr()] = (t.dtype, t.untyped_storage().nbytes())
        return t

    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sum(layer(x).float().square().sum() for layer in layers)
    out.backward()
    assert list(storages.values()) == [(torch.bfloat16, x.numel() * 2)]
    got = [t.grad.clone() for layer in layers for t in (layer.lora_A.weight, layer.lora_B.weight)] + [x.grad.clone()]

    x.grad = None
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total = 0
        for layer in layers:
            layer.zero_grad()
            y = layer.base_layer(x)
            keep = torch.rand(x.shape) < 1 - p if p > 0 else None  # the mask LoRALinear draws after the base matmul
            h = x.to(torch.bfloat16) * keep / (1 - p) if keep is not None else x.to(torch.bfloat16)
            delta = (h @ layer.lora_A.weight.to(torch.bfloat16).T @ layer.lora_B.weight.to(torch.bfloat16).T) * 2.0
            total = total + (y + delta.to(y.dtype)).float().square().sum()
    total.backward()
    want = [t.grad for layer in layers for t in (layer.lora_A.weight, layer.lora_B.weight)] + [x.grad]
    for g, w in zip(got, want):
        assert float((g - w).norm()) <= 1e-2 * float(w.norm())
