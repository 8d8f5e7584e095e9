"""NF4 quantization: code table, packing, rounding, error, size, save/load, input errors."""

from __future__ import annotations

import io
import math

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.quant import NF4_CODE, NF4Tensor, quantize_nf4
from lorakit.quant.dynamic8 import quantize_dynamic8
from lorakit.quant.nf4 import NF4_MIDPOINTS

QLORA_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def test_code_values_are_the_qlora_table():
    assert NF4_CODE.dtype == torch.float32
    assert torch.equal(NF4_CODE, torch.tensor(QLORA_NF4, dtype=torch.float32))
    assert bool((NF4_CODE[1:] > NF4_CODE[:-1]).all())


def test_packing_first_element_in_high_nibble():
    codes = torch.arange(16).repeat(4)  # 64 values, one block, absmax 1
    q = quantize_nf4(NF4_CODE[codes], blocksize=64, double_quant=False)
    assert q.data.tolist()[:8] == [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]
    assert q.absmax.tolist() == [1.0]
    assert torch.equal(q.dequantize(), NF4_CODE[codes])  # code values round-trip exactly
    two = quantize_nf4(torch.tensor([1.0, -1.0]), double_quant=False)
    assert two.data.tolist() == [0xF0]


def test_odd_length_pads_the_low_nibble_with_the_zero_code():
    q = quantize_nf4(torch.tensor([0.5, -1.0, 1.0]), double_quant=False)
    assert q.data.numel() == 2  # ceil(3 / 2) bytes, like bitsandbytes
    assert q.data[1].item() == (15 << 4) | 7  # 1.0 -> 15, padding 0.0 -> 7


def test_midpoint_ties_round_to_the_lower_code():
    mids = NF4_MIDPOINTS  # exact fp32 midpoints; absmax 1 keeps them unchanged by scaling
    x = torch.cat([torch.tensor([1.0]), mids, torch.zeros(64 - 1 - mids.numel())])
    q = quantize_nf4(x, blocksize=64, double_quant=False)
    codes = torch.stack((q.data >> 4, q.data & 15), 1).view(-1)
    assert codes[1:16].tolist() == list(range(15))
    just_above = torch.nextafter(mids, torch.tensor(2.0))
    q2 = quantize_nf4(torch.cat([torch.tensor([1.0]), just_above]), double_quant=False)
    codes2 = torch.stack((q2.data >> 4, q2.data & 15), 1).view(-1)
    assert codes2[1:16].tolist() == list(range(1, 16))


@pytest.mark.parametrize("shape", [(33, 17), (64, 64), (100, 37), (1, 5), (7,), (), (2, 3, 50)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_shapes_sizes_and_roundtrip(shape, double_quant):
    torch.manual_seed(0)
    x = torch.randn(shape)
    q = quantize_nf4(x, blocksize=64, double_quant=double_quant)
    n = max(x.numel(), 1)
    blocks = math.ceil(n / 64)
    assert q.shape == x.shape and q.numel() == x.numel()
    assert q.data.dtype == torch.uint8 and q.data.numel() == math.ceil(n / 2)
    expected = math.ceil(n / 2) + (blocks + 4 * math.ceil(blocks / 256) + 4 if double_quant else 4 * blocks)
    assert q.nbytes == expected
    out = q.dequantize(torch.bfloat16)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    absmax = q.dequantize_absmax()  # each value is off by at most half a code gap of its block
    per_value = absmax.repeat_interleave(64)[:n].view(x.shape)
    assert bool(((q.dequantize() - x).abs() <= 0.161 * per_value + 1e-6).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_input_dtypes_quantize_their_fp32_values(dtype):
    torch.manual_seed(0)
    x = torch.randn(40, 24).to(dtype)
    a, b = quantize_nf4(x), quantize_nf4(x.float())
    assert torch.equal(a.data, b.data) and torch.equal(a.absmax, b.absmax)


def test_input_is_not_modified():
    torch.manual_seed(0)
    x = torch.randn(64, 65)
    before = x.clone()
    quantize_nf4(x)
    assert torch.equal(x, before)


def test_mean_abs_error_on_gaussian_weights():
    torch.manual_seed(0)
    x = torch.randn(1024, 1024)
    for double_quant in (False, True):
        err = (quantize_nf4(x, 64, double_quant).dequantize() - x).abs().mean().item()
        assert err == pytest.approx(0.0728, rel=0.02)


def test_bits_per_param():
    x = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    assert 4.12 <= quantize_nf4(x, 64, double_quant=True).bits_per_param <= 4.135
    assert quantize_nf4(x, 64, double_quant=False).bits_per_param == 4.5


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_other_blocksizes(blocksize):
    x = torch.randn(96, 80, generator=torch.Generator().manual_seed(0))
    q = quantize_nf4(x, blocksize=blocksize)
    assert q.blocksize == blocksize and q.absmax.numel() == math.ceil(x.numel() / blocksize)
    assert (q.dequantize() - x).abs().mean().item() < 0.1


def test_double_quant_absmax_is_close():
    x = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    exact = quantize_nf4(x, double_quant=False).absmax
    approx = quantize_nf4(x, double_quant=True).dequantize_absmax()
    assert (approx - exact).abs().max().item() < 0.01 * exact.max().item()


def test_dynamic8_all_zero_block_and_ragged_tail():
    x = torch.cat([torch.zeros(256), torch.linspace(-2, 3, 300)])
    codes, scales = quantize_dynamic8(x)
    assert codes.shape == (556,) and scales.shape == (3,)
    assert scales[0].item() == 0 and bool((codes[:256] == 0).all())


def test_all_zero_weight():
    q = quantize_nf4(torch.zeros(3, 70))
    assert bool((q.dequantize() == 0).all())


def test_save_and_load_dict():
    x = torch.randn(33, 17, generator=torch.Generator().manual_seed(0))
    for double_quant in (False, True):
        q = quantize_nf4(x, double_quant=double_quant)
        d = q.to_dict()
        assert all(isinstance(v, torch.Tensor) for v in d.values())
        buf = io.BytesIO()
        torch.save(d, buf)
        buf.seek(0)
        back = NF4Tensor.from_dict(torch.load(buf))
        assert back.shape == q.shape and back.blocksize == q.blocksize and back.double_quant == double_quant
        assert torch.equal(back.dequantize(), q.dequantize())


def test_safetensors_roundtrip(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    q = quantize_nf4(torch.randn(10, 70, generator=torch.Generator().manual_seed(0)))
    safetensors.save_file(q.to_dict(), tmp_path / "w.safetensors")
    back = NF4Tensor.from_dict(safetensors.load_file(tmp_path / "w.safetensors"))
    assert torch.equal(back.dequantize(), q.dequantize())


def test_from_dict_errors_name_the_problem():
    d = quantize_nf4(torch.randn(8, 8)).to_dict()
    with pytest.raises(LorakitError, match="missing absmax"):
        NF4Tensor.from_dict({k: v for k, v in d.items() if k != "absmax"})
    with pytest.raises(LorakitError, match="does not fit"):
        NF4Tensor.from_dict({**d, "shape": torch.tensor([16, 16])})


def test_to_device_keeps_metadata():
    q = quantize_nf4(torch.randn(8, 8))
    m = q.to("meta")
    assert m.device.type == "meta" and m.shape == q.shape and m.double_quant
    assert q.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_bit_for_bit():
    x = torch.randn(300, 257, generator=torch.Generator().manual_seed(0))
    cpu, gpu = quantize_nf4(x), quantize_nf4(x.cuda())
    for name, t in cpu.buffers().items():
        assert torch.equal(t, gpu.buffers()[name].cpu()), name
    assert torch.equal(cpu.dequantize(), gpu.dequantize().cpu())


@pytest.mark.parametrize("blocksize", [0, 48, 512, 4096])
def test_bad_blocksize(blocksize):
    with pytest.raises(LorakitError, match=rf"blocksize {blocksize}.*32, 64, 128, 256"):
        quantize_nf4(torch.randn(4, 4), blocksize=blocksize)


def test_bad_inputs():
    with pytest.raises(LorakitError, match="floating-point"):
        quantize_nf4(torch.ones(4, 4, dtype=torch.int64))
    with pytest.raises(LorakitError, match="empty"):
        quantize_nf4(torch.empty(0, 4))
    bad = torch.randn(4, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(LorakitError, match="1 NaN/inf"):
        quantize_nf4(bad)


def test_fast_code_assignment_equals_bucketize_near_every_boundary():
    from lorakit.quant.nf4 import nf4_codes

    edges = torch.linspace(-1, 1, 65)
    points = [torch.linspace(-1, 1, 200_001), NF4_MIDPOINTS, edges]
    for anchors in (NF4_MIDPOINTS, edges):
        up = down = anchors
        for _ in range(3):  # a few ulps either side
            up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-2.0))
            points += [up, down]
    x = torch.cat(points).clamp(-1, 1)
    assert torch.equal(nf4_codes(x), torch.bucketize(x, NF4_MIDPOINTS).to(torch.uint8))


def test_from_dict_rejects_wrong_dtypes():
    d = quantize_nf4(torch.randn(8, 8), double_quant=False).to_dict()
    with pytest.raises(LorakitError, match="expected uint8 and torch.float32"):
        NF4Tensor.from_dict({**d, "absmax": d["absmax"].half()})


@pytest.mark.parametrize("shape", [(37, 29), (64, 64), (5, 1000)])
def test_chunked_quantization_equals_one_pass(monkeypatch, shape):
    """Chunking over blocks (to bound temporaries) changes no code and no absmax, ragged tail included."""
    import lorakit.quant.nf4 as nf4

    w = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    whole = quantize_nf4(w, 64)
    monkeypatch.setattr(nf4, "_CHUNK_BLOCKS", 3)
    chunked = quantize_nf4(w, 64)
    for key, value in whole.to_dict().items():
        assert torch.equal(chunked.to_dict()[key], value), key


def test_chunked_int8_equals_one_pass(monkeypatch):
    import lorakit.quant.int8 as int8

    w = torch.randn(300, 7000, generator=torch.Generator().manual_seed(4))  # 7000 cols -> 149 rows per pass
    whole_rows = []
    for r in range(0, 300, 100):
        whole_rows.append(int8.quantize_int8(w[r : r + 100]))
    q = int8.quantize_int8(w)
    assert torch.equal(q.data, torch.cat([t.data for t in whole_rows]))
    assert torch.equal(q.scale, torch.cat([t.scale for t in whole_rows]))
