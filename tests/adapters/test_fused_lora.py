"""The LoRA kernel (lora_delta_forward / lora_delta_backward, as _LoRAPath) computes what dropout + two linears
compute, forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.adapters.lora import LoRALinear, LoRASpec, _LoRAPath


def reference(x, a, b, scaling, mask, keep):
    h = x * mask / keep if mask is not None else x
    return (h @ a.T @ b.T) * scaling


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_against_the_unfused_formula(p: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    torch.manual_seed(11)
    out = _LoRAPath.apply(x, a, b, LoRASpec(1.7, p, torch.float64))
    torch.manual_seed(11)
    mask = (torch.rand(x.shape) < 1 - p) if p > 0 else None
    ref = reference(x, a, b, 1.7, mask, 1 - p)
    assert torch.allclose(out, ref)
    grads = torch.autograd.grad((out * torch.arange(4.0, dtype=torch.float64)).sum(), (x, a, b))
    ref_grads = torch.autograd.grad((ref * torch.arange(4.0, dtype=torch.float64)).sum(), (x, a, b))
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got, want)
    if p == 0:
        assert torch.autograd.gradcheck(lambda x, a, b: _LoRAPath.apply(x, a, b, LoRASpec(1.7, 0.0, torch.float64)), (x, a, b))


def test_layer_in_training_matches_the_plain_path_without_dropout() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), r=4, alpha=8, dropout=0.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 16, requires_grad=True)
    fused = layer(x)  # grad enabled: the fused path
    (gx,) = torch.autograd.grad(fused.sum(), x)
    gA = torch.autograd.grad(layer(x).sum(), layer.lora_A.weight)[0]
    with torch.no_grad():
        plain = layer(x)  # no grad: the plain path
    assert torch.allclose(fused, plain, atol=1e-6)
    manual = layer.base_layer.weight.T.sum(1) + (layer.lora_B.weight @ layer.lora_A.weight).T.sum(1) * layer.scaling
    assert torch.allclose(gx, manual.expand_as(gx), atol=1e-5)
    assert gA.abs().sum() > 0


def test_dropout_only_in_training_and_bf16_autocast() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 32), r=4, alpha=8, dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 32)
    layer.eval()
    with torch.enable_grad():
        a, b = layer(x), layer(x)
    assert torch.equal(a, b)  # eval: no dropout even on the fused path
    layer.train()
    with torch.enable_grad():
        c, d = layer(x), layer(x)
    assert not torch.equal(c, d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_A.weight.grad.abs().sum() > 0
