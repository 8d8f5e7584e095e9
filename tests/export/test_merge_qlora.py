"""A QLoRA adapter merged: the NF4 / int8 base dequantized into fp32 first."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.adapters import inject_lora, lora_layers, unwrap_lora
from lorakit.errors import LorakitError
from lorakit.quant import NF4Linear, quantize_model_linears
from tests.conftest import tiny_model

FP32 = torch.float32


def test_merge_of_a_qlora_adapter_dequantizes_into_fp32():
    model = tiny_model("llama")
    quantize_model_linears(model, "nf4", compute_dtype=FP32)
    inject_lora(model, ["all-linear"], r=4, alpha=8)
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B.weight, std=0.05)
    ids = torch.arange(12)[None]
    with torch.no_grad():
        before = model(ids).logits
    name, layer = next(lora_layers(model))
    with pytest.raises(LorakitError, match="quantized base layer"):
        layer.merge()  # never silently back into 4 bits
    unwrap_lora(model)
    assert not any(isinstance(m, NF4Linear) for m in model.modules() if m is not model.lm_head)
    merged = model.get_submodule(name)
    assert type(merged) is nn.Linear and merged.weight.dtype == FP32
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-4)


