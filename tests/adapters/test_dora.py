"""DoRA (Liu et al. 2024): forward, gradients, merge and files against PEFT's implementation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lorakit.adapters import inject_lora, load_adapter, lora_layers, lora_parameters, save_adapter, unwrap_lora
from lorakit.adapters.lora import LoRALinear
from lorakit.adapters.state import adapter_info
from lorakit.errors import LorakitError
from tests.conftest import tiny_model

peft = pytest.importorskip("peft")


def _randomize(model: nn.Module, seed: int = 5) -> None:
    """Nonzero A, B and a magnitude away from ||W||, so every DoRA term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.1)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
            if layer.magnitude is not None:
                layer.magnitude.mul_(1 + 0.1 * torch.randn(layer.magnitude.shape, generator=g))


def _copy_to_peft(ours: LoRALinear, theirs: nn.Module) -> None:
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
        theirs.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)


class _Holder(nn.Module):
    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _pair(fan_in_fan_out: bool = False, dropout: float = 0.0):
    """(our DoRA layer, PEFT's DoRA layer) on copies of one seeded base, with equal random factors."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    if fan_in_fan_out:
        base = Conv1D(24, 16)  # in 16, out 24, weight (in, out)
        nn.init.normal_(base.weight, std=0.2)
        nn.init.normal_(base.bias, std=0.2)
    else:
        base = nn.Linear(16, 24)
    ours = LoRALinear(base, r=4, alpha=8, dropout=dropout, use_dora=True)
    _randomize(nn.Sequential(ours))
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["proj"], use_dora=True,
                     fan_in_fan_out=fan_in_fan_out)
    theirs = get_peft_model(_Holder(copy.deepcopy(base)), cfg).base_model.model.proj
    _copy_to_peft(ours, theirs)
    return ours, theirs


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_forward_and_gradients_match_peft(fan_in_fan_out: bool) -> None:
    ours, theirs = _pair(fan_in_fan_out)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = ours(x1), theirs(x2)
    assert (y1 - y2).abs().max().item() <= 1e-5
    w = torch.randn(y1.shape, generator=torch.Generator().manual_seed(3))
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    pairs = [(ours.lora_A.weight, theirs.lora_A["default"].weight), (ours.lora_B.weight, theirs.lora_B["default"].weight),
             (ours.magnitude, theirs.lora_magnitude_vector["default"].weight), (x1, x2)]
    for a, b in pairs:
        assert a.grad is not None and b.grad is not None
        assert (a.grad - b.grad).abs().max().item() <= 1e-5 * max(1.0, b.grad.abs().max().item())


def test_dropout_draws_as_peft_does() -> None:
    """Training with dropout: the base term and the B A term both see dropout(x), one mask, as in PEFT."""
    ours, theirs = _pair(dropout=0.3)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(11)
    y1 = ours(x)
    torch.manual_seed(11)
    y2 = theirs(x)
    assert (y1 - y2).abs().max().item() <= 1e-5
    torch.manual_seed(12)
    assert (ours(x) - y1).abs().max().item() > 1e-3  # the mask did change the output


def test_fresh_dora_layer_is_the_base() -> None:
    base = nn.Linear(16, 24)
    layer = LoRALinear(base, r=4, alpha=8, use_dora=True)
    assert torch.allclose(layer.magnitude, base.weight.norm(dim=1))
    x = torch.randn(2, 16)
    assert (layer(x) - base(x)).abs().max().item() <= 1e-6
    assert {id(p) for p in layer.adapter_parameters()} == {id(layer.lora_A.weight), id(layer.lora_B.weight), id(layer.magnitude)}


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merge_and_unmerge_are_exact(fan_in_fan_out: bool) -> None:
    ours, theirs = _pair(fan_in_fan_out)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ours(x)
        original = ours.base_layer.weight.detach().clone()
        ours.merge()
        ours.merge()  # idempotent
        assert (ours(x) - expected).abs().max().item() <= 1e-5
        theirs.merge()  # PEFT's merged weight is the reference
        assert (ours.base_layer.weight - theirs.base_layer.weight).abs().max().item() <= 1e-5
        ours.unmerge()
        ours.unmerge()
        assert (ours.base_layer.weight - original).abs().max().item() <= 1e-5
        assert (ours(x) - expected).abs().max().item() <= 1e-5


def test_unwrap_gives_a_plain_model_with_the_same_logits(input_ids) -> None:
    model = tiny_model("llama")
    inject_lora(model, ["all-linear"], r=4, alpha=8, use_dora=True)
    _randomize(model)
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        unwrap_lora(model)
        got = model(input_ids=input_ids).logits
    assert not any(True for _ in lora_layers(model))
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("arch", "targets"), [("llama", ["all-linear"]), ("qwen2", ["q_proj", "v_proj"]),
                                               ("gpt2", ["c_attn", "c_proj"])])
def test_peft_loads_what_lorakit_saves(arch: str, targets: list[str], tmp_path: Path, input_ids) -> None:
    ours = tiny_model(arch)
    inject_lora(ours, targets, r=4, alpha=16, use_dora=True)
    _randomize(ours)
    with torch.no_grad():
        expected = ours(input_ids=input_ids).logits
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=f"tiny-{arch}")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "adapter")
    with torch.no_grad():
        got = theirs(input_ids=input_ids).logits
    assert (got - expected).abs().max().item() <= 1e-5
    assert adapter_info(tmp_path / "adapter").method == "dora"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_lorakit_loads_what_peft_saves(arch: str, tmp_path: Path, input_ids) -> None:
    from peft import LoraConfig, get_peft_model

    targets = ["c_attn", "c_fc"] if arch == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=targets, use_dora=True, fan_in_fan_out=arch == "gpt2")
    theirs = get_peft_model(tiny_model(arch), cfg)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    theirs.eval()
    with torch.no_grad():
        expected = theirs(input_ids=input_ids).logits
    theirs.save_pretrained(tmp_path / "peft-adapter")
    ours = tiny_model(arch)
    info = load_adapter(ours, tmp_path / "peft-adapter")
    with torch.no_grad():
        got = ours(input_ids=input_ids).logits
    assert (got - expected).abs().max().item() <= 1e-5
    assert info.method == "dora" and all(layer.use_dora for _, layer in lora_layers(ours))
    assert info.num_params == sum(p.numel() for n, p in theirs.named_parameters() if "lora_" in n)


def test_round_trip_trainable_and_damaged_files(tmp_path: Path, input_ids) -> None:
    from safetensors.torch import load_file, save_file

    model = tiny_model("llama")
    inject_lora(model, ["q_proj", "v_proj"], r=2, alpha=4, use_dora=True)
    _randomize(model)
    assert len(lora_parameters(model)) == 3 * 4
    save_adapter(model, tmp_path / "a")
    fresh = tiny_model("llama")
    load_adapter(fresh, tmp_path / "a", trainable=True)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=input_ids).logits, model(input_ids=input_ids).logits)
    assert all(p.requires_grad for p in lora_parameters(fresh))
    weights = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = next(k for k in weights if k.endswith("lora_magnitude_vector"))
    del weights[key]
    save_file(weights, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(LorakitError, match="no lora_magnitude_vector"):
        load_adapter(tiny_model("llama"), tmp_path / "a")


def test_qdora_on_nf4_equals_dora_on_the_dequantized_weight(input_ids) -> None:
    from lorakit.quant.linear import quantize_model_linears

    quantized = tiny_model("llama")
    quantize_model_linears(quantized, "nf4", 64, True, torch.float32)
    plain = tiny_model("llama")
    with torch.no_grad():  # the plain model gets the dequantized weights: the same base
        for name, module in quantized.named_modules():
            if hasattr(module, "dequantized_weight"):
                plain.get_submodule(name).weight.copy_(module.dequantized_weight(torch.float32))
    for model in (quantized, plain):
        inject_lora(model, ["all-linear"], r=4, alpha=8, use_dora=True)
        _randomize(model)
    for (_, q), (_, p) in zip(lora_layers(quantized), lora_layers(plain)):
        assert torch.allclose(q.magnitude, p.magnitude, atol=1e-5)
    with torch.no_grad():
        assert (quantized(input_ids=input_ids).logits - plain(input_ids=input_ids).logits).abs().max().item() <= 1e-4
    quantized.train()
    loss = quantized(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    assert all(p.grad is not None for p in lora_parameters(quantized))


def test_merge_refuses_dora_with_other_adapters() -> None:
    from lorakit.adapters.lora import LoRAFactor, merged_weight

    w = torch.randn(6, 4)
    dora = LoRAFactor(torch.randn(2, 4), torch.randn(6, 2), 1.0, adapter="d", magnitude=w.norm(dim=1))
    plain = LoRAFactor(torch.randn(2, 4), torch.randn(6, 2), 1.0, adapter="p")
    with pytest.raises(LorakitError, match="DoRA adapter"):
        merged_weight(w, [plain, dora], "layer")


def test_serve_refuses_dora(tmp_path: Path) -> None:
    from lorakit.serve.multi_lora import AdapterBank

    model = tiny_model("llama")
    inject_lora(model, ["q_proj"], r=2, alpha=4, use_dora=True)
    save_adapter(model, tmp_path / "d")
    with pytest.raises(LorakitError, match="serve does not batch DoRA adapters yet; merge it with lorakit merge"):
        AdapterBank(tiny_model("llama")).add("d", tmp_path / "d")


def test_serve_engine_refuses_dora_before_loading_the_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lorakit.models.load
    from lorakit.config import ServeConfig
    from lorakit.serve.engine import Engine

    model = tiny_model("llama")
    inject_lora(model, ["q_proj"], r=2, alpha=4, use_dora=True)
    save_adapter(model, tmp_path / "d", base_model_name_or_path="tiny")
    monkeypatch.setattr(lorakit.models.load, "load_model", lambda *a, **k: pytest.fail("the base was loaded"))
    with pytest.raises(LorakitError, match="serve does not batch DoRA adapters yet"):
        Engine(None, [("d", tmp_path / "d")], ServeConfig(), "fp32")
