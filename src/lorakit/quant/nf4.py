"""NF4 blockwise 4-bit quantization (QLoRA, Dettmers et al. 2023, arXiv:2305.14314), and FP4.

NF4Tensor holds either 4-bit code (`quant_type` "nf4" or "fp4", see fp4.py): both share the
blocking, packing, absmax and double quantization; only the 16-value table and the rounding
differ. Everything said below about NF4's bytes holds for FP4 too (FP4 tests in
tests/quant/test_quant_fp4.py).

Plain PyTorch, same result on CPU and CUDA, bit-compatible with bitsandbytes:

- The packed codes and the fp32 absmax are bit-identical to
  `bitsandbytes.functional.quantize_4bit(x, quant_type="nf4")` on CPU (its torch kernel in
  backends/default/ops.py): values are scaled by `x * (1 / absmax)` (a true division in a
  ragged last block), clamped to [-1, 1] and bucketized on the fp32 midpoints of the code,
  so a value exactly on a midpoint takes the lower code. Two codes per byte, the first
  element in the high nibble. (bitsandbytes' CUDA kernel is separate code, a decision
  tree on float-literal midpoints; it was not compared, no GPU was at hand.)
- With double quantization the absmax codes, their per-256 scales and the offset are
  bit-identical to bitsandbytes on CPU too (see `dynamic8.py`).
- The packed buffer holds exactly ceil(numel / 2) bytes, like bitsandbytes' (the last
  block is padded with zeros only while quantizing), so it can be handed to bitsandbytes
  unchanged.

One deliberate difference: a block that is all zeros stores absmax 0 here; bitsandbytes
stores 0 for a full block but 1e-38 for a ragged last block. Both dequantize to zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorakit.errors import LorakitError
from lorakit.quant.checks import check_weight
from lorakit.quant.dynamic8 import DQ_BLOCKSIZE, dequantize_dynamic8, quantize_dynamic8
from lorakit.quant.fp4 import FP4_CODE, fp4_codes

BLOCKSIZES = (32, 64, 128, 256)

# The 16 NF4 values, exactly bitsandbytes' float32 table (`get_4bit_type("nf4")`).
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2  # (15,) fp32, the rounding boundaries
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}  # 4-bit code -> its 16 values by bit pattern

_table_cache: dict[tuple[str, torch.device], torch.Tensor] = {}


def _cached(name: str, device: torch.device, build) -> torch.Tensor:
    key = (name, device)
    if key not in _table_cache:
        _table_cache[key] = build().to(device)
    return _table_cache[key]


def byte_table(device: torch.device | str = "cpu", quant_type: str = "nf4") -> torch.Tensor:
    """(256, 2) fp32: byte b -> (code[b >> 4], code[b & 15]); one gather decodes a byte."""
    check_quant_type(quant_type)
    code = CODES[quant_type]

    def build() -> torch.Tensor:
        b = torch.arange(256)
        return torch.stack((code[b >> 4], code[b & 15]), dim=1)

    return _cached(f"bytes-{quant_type}", torch.device(device), build)


def check_quant_type(quant_type: str) -> None:
    if quant_type not in CODES:
        raise LorakitError(f"4-bit quant_type {quant_type!r} is not known; use nf4 or fp4")


# Code assignment without a binary search. Cut [-1, 1] into 64 equal cells; each cell holds
# at most one midpoint (cells are 0.031 wide, midpoints >= 0.080 apart), so
#     code(x) = #midpoints below x = below[cell(x)] + (x > midpoint_in[cell(x)])
# which is exactly torch.bucketize(x, NF4_MIDPOINTS) (ties go low), ~6x faster on CPU.
# No midpoint is within 1.6e-3 of a cell edge, so the few-ulp rounding of cell(x) for an x
# right at an edge picks a neighbour cell whose answer is the same. Checked at import.
_CELLS = 64
_edges = torch.linspace(-1, 1, _CELLS + 1, dtype=torch.float64)
_CELL_BELOW = (NF4_MIDPOINTS.double()[None, :] < _edges[:-1, None]).sum(1).to(torch.uint8)  # (64,)
_CELL_MID = torch.full((_CELLS,), 2.0)  # (64,) fp32; 2.0 = no midpoint in this cell
_mid_cells = ((NF4_MIDPOINTS.double() + 1) * (_CELLS / 2)).floor().long()
_CELL_MID[_mid_cells] = NF4_MIDPOINTS
if _mid_cells.unique().numel() != NF4_MIDPOINTS.numel():
    raise RuntimeError("two NF4 midpoints share a cell; use more cells")
if (NF4_MIDPOINTS.double()[:, None] - _edges[None, :]).abs().min() < 1e-4:
    raise RuntimeError("an NF4 midpoint sits on a cell edge; use another cell count")


def nf4_codes(scaled: torch.Tensor) -> torch.Tensor:
    """Nearest NF4 code (uint8, same shape) of values in [-1, 1]; ties take the lower code."""
    flat = scaled.reshape(-1)
    cell = ((flat + 1.0) * (_CELLS / 2)).to(torch.int32).clamp_(0, _CELLS - 1)  # (n,)
    below = _cached("cell_below", flat.device, lambda: _CELL_BELOW).index_select(0, cell)  # (n,) uint8
    mid = _cached("cell_mid", flat.device, lambda: _CELL_MID).index_select(0, cell)  # (n,) fp32
    return below.add_(flat > mid).view(scaled.shape)


def check_blocksize(blocksize: int) -> None:
    """32..256: smaller blocks track outliers better but cost more absmax bytes per weight."""
    if blocksize not in BLOCKSIZES:
        raise LorakitError(
            f"4-bit (NF4/FP4) blocksize {blocksize!r} is not supported; use one of {', '.join(map(str, BLOCKSIZES))} "
            "(64 is the QLoRA default)"
        )


@dataclass
class NF4Tensor:
    """An NF4-quantized tensor: its buffers plus the metadata to rebuild it.

    data          uint8 (ceil(numel/2),)  two codes per byte, first element in the high nibble
    quant_type    "nf4" | "fp4"           which 16-value table the codes index
    absmax        fp32 (blocks,)          per-block absmax, or uint8 codes with double quant
    absmax_scale  fp32 (ceil(blocks/256),) or None   second-level scales (double quant)
    absmax_offset fp32 ()  or None        mean subtracted before double quantization
    """

    data: torch.Tensor
    absmax: torch.Tensor
    absmax_scale: torch.Tensor | None
    absmax_offset: torch.Tensor | None
    shape: torch.Size
    blocksize: int
    quant_type: str = "nf4"

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    def numel(self) -> int:
        return math.prod(self.shape)

    def buffers(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (None ones left out)."""
        named = {
            "data": self.data,
            "absmax": self.absmax,
            "absmax_scale": self.absmax_scale,
            "absmax_offset": self.absmax_offset,
        }
        return {k: v for k, v in named.items() if v is not None}

    @property
    def nbytes(self) -> int:
        """Bytes of all stored buffers, measured (the constant NF4/dynamic maps are not stored)."""
        return sum(t.numel() * t.element_size() for t in self.buffers().values())

    @property
    def bits_per_param(self) -> float:
        """8 * nbytes / numel: ~4.127 with double quant at blocksize 64, 4.5 without."""
        return 8 * self.nbytes / self.numel()

    def dequantize_absmax(self) -> torch.Tensor:
        """(blocks,) fp32 absmax, undoing double quantization when present."""
        return _absmax_fp32(self.absmax, self.absmax_scale, self.absmax_offset)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor in `dtype` and its original shape (computed in fp32, then cast)."""
        return dequantize_nf4_buffers(
            self.data, self.absmax, self.absmax_scale, self.absmax_offset, self.shape, self.blocksize, dtype,
            quant_type=self.quant_type,
        )

    def to(self, device: torch.device | str) -> NF4Tensor:
        moved = {k: v.to(device) for k, v in self.buffers().items()}
        return NF4Tensor(
            data=moved["data"],
            absmax=moved["absmax"],
            absmax_scale=moved.get("absmax_scale"),
            absmax_offset=moved.get("absmax_offset"),
            shape=self.shape,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
        )

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (shape and blocksize as int64 tensors, `fp4` 1 for FP4): fits a state_dict or safetensors."""
        out = dict(self.buffers())
        out["shape"] = torch.tensor(list(self.shape), dtype=torch.int64)
        out["blocksize"] = torch.tensor(self.blocksize, dtype=torch.int64)
        if self.quant_type == "fp4":  # absent for NF4, so older NF4 dicts read the same
            out["fp4"] = torch.tensor(1, dtype=torch.int64)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> NF4Tensor:
        missing = [k for k in ("data", "absmax", "shape", "blocksize") if k not in d]
        if missing:
            raise LorakitError(
                f"NF4 tensor dict is missing {', '.join(missing)} (has {', '.join(sorted(d)) or 'nothing'}); "
                "save it with NF4Tensor.to_dict()"
            )
        if ("absmax_scale" in d) != ("absmax_offset" in d):
            raise LorakitError("NF4 tensor dict has only one of absmax_scale/absmax_offset; it needs both or neither")
        shape = torch.Size(int(s) for s in d["shape"].tolist())
        blocksize = int(d["blocksize"])
        check_blocksize(blocksize)
        quant_type = "fp4" if "fp4" in d and int(d["fp4"]) else "nf4"
        t = cls(d["data"], d["absmax"], d.get("absmax_scale"), d.get("absmax_offset"), shape, blocksize, quant_type)
        t._validate()
        return t

    def _validate(self) -> None:
        absmax_dtype = torch.uint8 if self.double_quant else torch.float32
        if self.data.dtype != torch.uint8 or self.absmax.dtype != absmax_dtype:
            raise LorakitError(
                f"NF4 tensor buffers have dtypes data={self.data.dtype}, absmax={self.absmax.dtype}; expected "
                f"uint8 and {absmax_dtype} (double_quant={self.double_quant}); the file is not an NF4 tensor"
            )
        n = self.numel()
        blocks = math.ceil(n / self.blocksize)
        expect = {"data": math.ceil(n / 2), "absmax": blocks}
        if self.double_quant:
            expect["absmax_scale"] = math.ceil(blocks / DQ_BLOCKSIZE)
            expect["absmax_offset"] = 1
        wrong = [f"{k} has {self.buffers()[k].numel()}" for k, v in expect.items() if self.buffers()[k].numel() != v]
        if wrong:
            raise LorakitError(
                f"NF4 tensor of shape {tuple(self.shape)} (blocksize {self.blocksize}) does not fit its buffers: "
                f"{', '.join(wrong)} values, expected {expect}; the file is corrupt or from another shape"
            )

    def __repr__(self) -> str:
        return (
            f"NF4Tensor(quant_type={self.quant_type}, shape={tuple(self.shape)}, blocksize={self.blocksize}, "
            f"double_quant={self.double_quant}, "
            f"device={self.device}, bits_per_param={self.bits_per_param:.3f})"
        )


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize any float tensor to NF4 (on its own device); the input is left untouched."""
    return quantize_4bit(weight, blocksize, double_quant, "nf4")


def quantize_fp4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize any float tensor to bitsandbytes' FP4 (see fp4.py); the input is left untouched."""
    return quantize_4bit(weight, blocksize, double_quant, "fp4")


def quantize_4bit(weight: torch.Tensor, blocksize: int, double_quant: bool, quant_type: str) -> NF4Tensor:
    """NF4 or FP4 (`quant_type`), blockwise absmax, optionally double-quantized absmax."""
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    check_weight(weight, f"quantize_{quant_type}")
    data, absmax = _quantize_codes(weight.detach(), blocksize, quant_type)
    scale = offset = None
    if double_quant:
        # QLoRA's double quantization, as bitsandbytes does it: center on the mean, 8-bit codes.
        offset = absmax.mean()  # () fp32
        absmax, scale = quantize_dynamic8(absmax - offset)
    return NF4Tensor(data, absmax, scale, offset, torch.Size(weight.shape), blocksize, quant_type)


_CHUNK_BLOCKS = 1 << 14  # blocks per pass: at blocksize 64, 1M weights and ~16 MB of temporaries


def _quantize_codes(weight: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> packed codes uint8 (ceil(n/2),), absmax fp32 (blocks,).

    Blocks are independent, so the work goes in chunks of _CHUNK_BLOCKS blocks: the fp32
    temporaries (about 16 bytes per weight) stay a few MB whatever the layer's size, which
    keeps the peak of a layer-by-layer quantized load near the quantized size.
    """
    flat = weight.reshape(-1)  # (n,); any float dtype, converted chunk by chunk
    n = flat.numel()
    n_blocks = math.ceil(n / blocksize)
    to_codes = fp4_codes if quant_type == "fp4" else nf4_codes
    packed = torch.empty(math.ceil(n / 2), dtype=torch.uint8, device=flat.device)  # (ceil(n/2),)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=flat.device)  # (nb,)
    for b0 in range(0, n_blocks, _CHUNK_BLOCKS):
        b1 = min(n_blocks, b0 + _CHUNK_BLOCKS)
        lo, hi = b0 * blocksize, min(n, b1 * blocksize)
        part = flat[lo:hi].float()  # (m,); a view when the weight is fp32
        ragged = hi - lo != (b1 - b0) * blocksize  # only the last chunk can be
        if ragged:
            part = F.pad(part, (0, (b1 - b0) * blocksize - (hi - lo)))  # zeros never change an absmax
        blocks = part.view(b1 - b0, blocksize)  # (cb, bs); read only: it may be the caller's weight
        amax = blocks.abs().amax(dim=1)  # (cb,) fp32
        safe = amax.clamp(min=1e-38).unsqueeze(1)  # (cb, 1); keeps all-zero blocks finite
        scaled = blocks * (1.0 / safe)  # (cb, bs), a new tensor
        if ragged:
            scaled[-1] = blocks[-1] / safe[-1]  # bitsandbytes divides in the ragged block; keep its rounding
        scaled.clamp_(-1.0, 1.0)
        codes = to_codes(scaled).view(-1)  # (cb * bs,) uint8, even length; padding codes are those of 0.0
        pairs = (codes[0::2] << 4) | codes[1::2]  # (cb * bs / 2,)
        byte_lo = lo // 2  # blocksize is even, so chunks start on a byte
        packed[byte_lo : byte_lo + min(pairs.numel(), packed.numel() - byte_lo)] = pairs[: packed.numel() - byte_lo]
        absmax[b0:b1] = amax
    return packed, absmax


def _absmax_fp32(
    absmax: torch.Tensor,
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    code_map: torch.Tensor | None = None,
) -> torch.Tensor:
    if scale is None:
        return absmax
    return dequantize_dynamic8(absmax, scale, code_map) + offset  # (blocks,) fp32, in bitsandbytes' order


def dequantize_nf4_buffers(
    data: torch.Tensor,
    absmax: torch.Tensor,
    absmax_scale: torch.Tensor | None,
    absmax_offset: torch.Tensor | None,
    shape: tuple[int, ...] | torch.Size,
    blocksize: int,
    dtype: torch.dtype = torch.float32,
    tables: tuple[torch.Tensor, torch.Tensor] | None = None,
    quant_type: str = "nf4",
) -> torch.Tensor:
    """Dequantize from raw buffers (what NF4Linear calls, also inside torch.compile).

    code * absmax is computed in fp32 and then cast, like bitsandbytes, so the result is
    bit-identical to `bitsandbytes.functional.dequantize_4bit` on CPU in fp32/bf16/fp16
    (except where bitsandbytes 0.50's vectorized CPU kernel is wrong: a last dim that is a
    multiple of 16 but not of the blocksize, e.g. (64, 64) at blocksize 128). `tables` is
    (byte_table(device, quant_type), dynamic_map(device)); traced code must pass it (NF4Linear
    keeps them as buffers) instead of touching the lazily filled per-device cache. Only without
    `tables` is `quant_type` read: the byte table already says which code the bytes index.
    """
    n = math.prod(shape)
    pairs, code_map = tables if tables is not None else (byte_table(data.device, quant_type), None)
    scales = _absmax_fp32(absmax, absmax_scale, absmax_offset, code_map)  # (nb,) fp32
    n_blocks = scales.numel()
    # gather one 8-byte (hi, lo) pair per byte: an int64 view of the (256, 2) fp32 table is
    # several times faster than a row gather of the 2-float table
    values = pairs.view(torch.int64).view(-1).index_select(0, data.int()).view(torch.float32)  # (2 * ceil(n/2),)
    if values.numel() != n_blocks * blocksize:
        values = F.pad(values[:n], (0, n_blocks * blocksize - n))  # ragged last block
    out = values.view(n_blocks, blocksize).mul_(scales.unsqueeze(1))  # (nb, bs) fp32, in place: one big alloc less
    return out.view(-1)[:n].view(shape).to(dtype)
