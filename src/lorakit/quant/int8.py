"""Per-row symmetric int8 weight quantization (absmax, as LLM.int8()'s weight side).

Each output row (dim 0; a 1-D tensor is one row) gets one fp32 scale = absmax / 127, and
its values are stored as round(w * 127 / absmax) in [-127, 127] (round half to even;
bitsandbytes' `int8_vectorwise_quant` formula, so the codes match it). -128 is never used,
so the grid is symmetric. An all-zero row gets scale 0 and codes 0 instead of dividing by
zero. Twice NF4's memory, a quarter of its error: for when 4 bits hurt quality.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.errors import LorakitError
from lorakit.quant.checks import check_weight


def _rows(shape: torch.Size) -> int:
    """Rows that get their own scale: dim 0 of a matrix (or conv weight); a vector or scalar is one row."""
    return shape[0] if len(shape) >= 2 else 1


@dataclass
class Int8Tensor:
    """data int8 (original shape), scale fp32 (rows,): one scale per output row (dim 0)."""

    data: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def numel(self) -> int:
        return self.data.numel()

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    @property
    def bits_per_param(self) -> float:
        """8 + 32 / row length."""
        return 8 * self.nbytes / self.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8_buffers(self.data, self.scale, dtype)

    def to(self, device: torch.device | str) -> Int8Tensor:
        return Int8Tensor(self.data.to(device), self.scale.to(device))

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"data": self.data, "scale": self.scale}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> Int8Tensor:
        missing = [k for k in ("data", "scale") if k not in d]
        if missing:
            raise LorakitError(
                f"int8 tensor dict is missing {', '.join(missing)} (has {', '.join(sorted(d)) or 'nothing'}); "
                "save it with Int8Tensor.to_dict()"
            )
        data, scale = d["data"], d["scale"]
        rows = _rows(data.shape)
        if data.dtype != torch.int8 or scale.numel() != rows:
            raise LorakitError(
                f"int8 tensor dict does not fit: data {data.dtype} {tuple(data.shape)}, scale {tuple(scale.shape)}; "
                f"expected int8 data and {rows} scales"
            )
        return cls(data, scale)

    def __repr__(self) -> str:
        return f"Int8Tensor(shape={tuple(self.shape)}, device={self.device}, bits_per_param={self.bits_per_param:.3f})"


def quantize_int8(weight: torch.Tensor) -> Int8Tensor:
    """Quantize any float tensor per row of dim 0 (on its own device); the input is left untouched."""
    check_weight(weight, "quantize_int8")
    rows = _rows(weight.shape)
    w = weight.detach().reshape(rows, -1)  # (rows, cols), any float dtype
    cols = w.shape[1]
    data = torch.empty(rows, cols, dtype=torch.int8, device=w.device)
    absmax = torch.empty(rows, dtype=torch.float32, device=w.device)
    step = max(1, (1 << 20) // max(1, cols))  # rows per pass: ~1M weights, so temporaries stay a few MB
    for r0 in range(0, rows, step):
        part = w[r0 : r0 + step].float()  # (chunk, cols)
        amax = part.abs().amax(dim=1)  # (chunk,)
        inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))  # 0 for all-zero rows
        data[r0 : r0 + step] = torch.round(part * inv.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
        absmax[r0 : r0 + step] = amax
    return Int8Tensor(data.view(weight.shape), absmax / 127.0)


def dequantize_int8_buffers(
    data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """data * scale per row, in fp32, then cast: (original shape) in `dtype`."""
    rows = scale.numel()
    out = data.reshape(rows, -1).float() * scale.unsqueeze(1)  # (rows, cols) fp32
    return out.view(data.shape).to(dtype)
