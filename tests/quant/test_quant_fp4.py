"""FP4: bit-for-bit parity with bitsandbytes' quantize_fp4 / dequantize_fp4 on CPU, and FP4 layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.quant import NF4Linear, NF4Tensor, quantize_fp4, quantize_model_linears
from lorakit.quant.fp4 import FP4_CODE, FP4_ORDER

bnbf = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(33, 17), (64, 64), (100, 37), (1, 5), (3, 1), (256, 256), (2, 3, 70)]


def test_table_and_order_are_bitsandbytes():
    ref = bnbf.get_4bit_type("fp4", device="cpu")
    assert torch.equal(FP4_CODE, ref)
    assert torch.equal(FP4_ORDER.long(), torch.argsort(ref))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_matches_bitsandbytes(shape, blocksize, double_quant, dtype):
    torch.manual_seed(sum(shape) + blocksize)
    x = (torch.randn(shape) * 0.05).to(dtype)
    special = torch.tensor([0.0, -0.0, 1e-9, -1e-9, 0.05, -0.05, 0.0])  # small values hit both zero codes
    n = min(x.numel(), special.numel())
    x.view(-1)[:n] = special[:n].to(dtype)
    packed, state = bnbf.quantize_fp4(x, blocksize=blocksize, compress_statistics=double_quant)
    q = quantize_fp4(x, blocksize=blocksize, double_quant=double_quant)
    assert torch.equal(q.data, packed.view(-1))
    assert torch.equal(q.absmax, state.absmax)
    if double_quant:
        assert torch.equal(q.absmax_scale, state.state2.absmax)
        assert torch.equal(q.absmax_offset, state.offset)


@pytest.mark.parametrize("shape", [(33, 17), (64, 64), (100, 37), (128, 256)])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_matches_bitsandbytes(shape, double_quant, out_dtype):
    torch.manual_seed(0)
    x = torch.randn(shape)
    packed, state = bnbf.quantize_fp4(x, blocksize=64, compress_statistics=double_quant)
    state.dtype = out_dtype
    ref = bnbf.dequantize_fp4(packed, state).reshape(shape)
    assert torch.equal(quantize_fp4(x, 64, double_quant).dequantize(out_dtype), ref)


def test_every_code_round_trips_and_both_zeros_decode_to_zero():
    codes = torch.arange(16).repeat(4)  # one block of 64, absmax 1
    q = quantize_fp4(FP4_CODE[codes], blocksize=64, double_quant=False)
    assert torch.equal(q.dequantize(), FP4_CODE[codes])
    assert FP4_CODE[0] == 0 and FP4_CODE[8] == 0


def test_fp4_is_worse_than_nf4_on_normal_weights():
    # the QLoRA paper's premise: for normally distributed weights NF4's quantiles beat FP4's grid
    from lorakit.quant import quantize_nf4

    torch.manual_seed(0)
    x = torch.randn(512, 512)
    fp4 = (quantize_fp4(x, 64, False).dequantize() - x).abs().mean()
    nf4 = (quantize_nf4(x, 64, False).dequantize() - x).abs().mean()
    assert nf4 < 0.9 * fp4


def test_dict_round_trip_keeps_the_code():
    q = quantize_fp4(torch.randn(40, 24), 32, True)
    back = NF4Tensor.from_dict(q.to_dict())
    assert back.quant_type == "fp4" and torch.equal(back.dequantize(), q.dequantize())


def test_fp4_linear_and_model_replacement():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    layer = NF4Linear.from_linear(lin, 64, True, torch.float32, quant_type="fp4")
    x = torch.randn(3, 64)
    w = quantize_fp4(lin.weight.detach(), 64, True).dequantize()
    assert torch.equal(layer(x), torch.nn.functional.linear(x, w, lin.bias))
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    assert quantize_model_linears(model, "fp4", 32, False, torch.float32) == 2
    assert all(m.quant_type == "fp4" for m in model.modules() if isinstance(m, NF4Linear))


def test_an_adapter_trained_on_an_fp4_base_records_and_reloads_it(tmp_path):
    from lorakit.adapters.state import AdapterMeta

    q = {"method": "fp4", "blocksize": 32, "double_quant": False, "compute_dtype": "bfloat16"}
    spec = AdapterMeta.from_dict({"quantization": q}, tmp_path / "lorakit.json").quant_spec()
    assert (spec.method, spec.blocksize, spec.double_quant, spec.compute_dtype) == ("fp4", 32, False, torch.bfloat16)
