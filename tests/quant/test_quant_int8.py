"""Per-row int8: reconstruction bound, zero rows, shapes, size, save/load."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.quant import Int8Tensor, quantize_int8


@pytest.mark.parametrize("shape", [(7, 33), (1, 5), (5,), (2, 3, 4), ()])
def test_reconstruction_within_half_a_step(shape):
    torch.manual_seed(0)
    w = torch.randn(shape)
    q = quantize_int8(w)
    rows = shape[0] if len(shape) >= 2 else 1
    assert q.data.dtype == torch.int8 and q.data.shape == w.shape
    assert q.scale.dtype == torch.float32 and q.scale.shape == (rows,)
    out = q.dequantize()
    assert out.shape == w.shape
    step = q.scale.view(-1, *([1] * (w.dim() - 1))) if w.dim() >= 2 else q.scale
    assert bool(((out - w).abs() <= step / 2 + 1e-7).all())
    assert int(q.data.abs().max()) == 127  # each row's absmax maps to +-127 exactly


def test_zero_rows_do_not_divide_by_zero():
    w = torch.randn(4, 6)
    w[1] = 0
    q = quantize_int8(w)
    assert q.scale[1].item() == 0 and bool((q.data[1] == 0).all())
    out = q.dequantize()
    assert bool(torch.isfinite(out).all()) and bool((out[1] == 0).all())
    assert bool((quantize_int8(torch.zeros(3, 3)).dequantize() == 0).all())


def test_codes_are_symmetric_and_rounded_to_nearest():
    w = torch.tensor([[1.0, -1.0, 0.5, -0.25, 0.0]])
    q = quantize_int8(w)
    assert q.data.tolist() == [[127, -127, 64, -32, 0]]  # 63.5 -> 64, -31.75 -> -32


def test_size_and_dtypes():
    q = quantize_int8(torch.randn(64, 256))
    assert q.nbytes == 64 * 256 + 64 * 4
    assert q.bits_per_param == pytest.approx(8 + 32 / 256)
    assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_save_load_and_errors():
    q = quantize_int8(torch.randn(6, 10))
    back = Int8Tensor.from_dict(q.to_dict())
    assert torch.equal(back.dequantize(), q.dequantize())
    assert q.to("meta").device.type == "meta"
    with pytest.raises(LorakitError, match="missing scale"):
        Int8Tensor.from_dict({"data": q.data})
    with pytest.raises(LorakitError, match="expected int8 data and 6 scales"):
        Int8Tensor.from_dict({"data": q.data, "scale": q.scale[:3]})
    with pytest.raises(LorakitError, match="floating-point"):
        quantize_int8(torch.ones(3, 3, dtype=torch.int32))
