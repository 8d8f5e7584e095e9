"""merged_weight: the one merge (LoRALinear.merge, unwrap_lora, `lorakit merge`), pure, fp32, NaN refused by name."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from lorakit.adapters import LoRALinear, inject_lora, lora_layers, merge_lora, unwrap_lora
from lorakit.adapters.lora import LoRAFactor, merged_weight
from lorakit.errors import LorakitError
from lorakit.quant.linear import quantize_model_linears
from tests.conftest import tiny_model


def _factor(out_f: int = 6, in_f: int = 5, r: int = 2, scaling: float = 0.5, adapter: str = "") -> LoRAFactor:
    g = torch.Generator().manual_seed(0)
    return LoRAFactor(torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g), scaling, adapter)


def test_adds_each_scaled_update_and_leaves_the_input_alone() -> None:
    weight = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    before = weight.clone()
    f, g = _factor(), _factor(scaling=-2.0)
    merged = merged_weight(weight, [f, g], "layer")
    expected = weight + 0.5 * f.B @ f.A - 2.0 * g.B @ g.A  # reference: the formula written out
    assert torch.allclose(merged, expected, atol=1e-6)
    assert torch.equal(weight, before)
    conv = merged_weight(weight.T.contiguous(), [f], "layer", fan_in_fan_out=True)  # GPT-2 Conv1D layout (in, out)
    assert torch.allclose(conv, (weight + 0.5 * f.B @ f.A).T, atol=1e-6)


def test_nan_is_refused_naming_the_adapter_and_layer() -> None:
    f = _factor(adapter="runs/a/adapter")
    f.B[0, 0] = float("nan")
    with pytest.raises(LorakitError, match=r"merging adapter runs/a/adapter into model\.layers\.3\.mlp\.up_proj gives NaN"):
        merged_weight(torch.zeros(6, 5), [f], "model.layers.3.mlp.up_proj")


def test_wrong_shape_is_refused_naming_the_layer() -> None:
    with pytest.raises(LorakitError, match=r"q_proj has an update of shape \(6, 5\).*another model"):
        merged_weight(torch.zeros(4, 5), [_factor()], "q_proj")


def _poison(model: nn.Module, name: str) -> None:
    with torch.no_grad():
        model.get_submodule(name).lora_B.weight.fill_(float("nan"))


def test_merge_lora_names_the_broken_layer_and_leaves_it_unmerged() -> None:
    model = tiny_model("llama")
    inject_lora(model, ["q_proj"], r=2, alpha=4)
    name = "model.layers.1.self_attn.q_proj"
    _poison(model, name)
    with pytest.raises(LorakitError, match=f"into {re.escape(name)} gives NaN"):
        merge_lora(model)
    assert not model.get_submodule(name).merged


@pytest.mark.parametrize("quantized", [False, True])
def test_unwrap_names_the_broken_layer(quantized: bool) -> None:
    model = tiny_model("llama")
    if quantized:
        quantize_model_linears(model, "nf4", compute_dtype=torch.float32)
    inject_lora(model, ["v_proj"], r=2, alpha=4)
    name = "model.layers.0.self_attn.v_proj"
    _poison(model, name)
    with pytest.raises(LorakitError, match=f"into {re.escape(name)} gives NaN"):
        unwrap_lora(model)


def test_layer_factor_is_its_update() -> None:
    layer = LoRALinear(nn.Linear(5, 6), r=2, alpha=3)
    nn.init.normal_(layer.lora_B.weight)
    f = layer.factor()
    assert f.scaling == layer.scaling == 1.5
    assert torch.equal(f.delta(), (layer.lora_B.weight @ layer.lora_A.weight).detach() * 1.5)
    layer.set_scale(2.0)
    assert layer.factor().scaling == 3.0 and [n for n, _ in lora_layers(nn.Sequential(layer))] == ["0"]
