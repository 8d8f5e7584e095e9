"""8-bit blockwise quantization with bitsandbytes' signed dynamic map.

Only used for NF4 double quantization (QLoRA, Dettmers et al. 2023, arXiv:2305.14314):
the per-block fp32 absmax values of an NF4 tensor are centered, then stored as one byte
each with one fp32 scale per 256 of them.

Why a re-implementation and not `import bitsandbytes`: lorakit must run where
bitsandbytes is not installed (or has no kernels for the device), and it must produce the
same bytes everywhere. The arithmetic below copies bitsandbytes' CPU kernel
(`quantize_cpu_impl` in csrc/cpu_ops.cpp, bitsandbytes 0.50) step by step, so the codes
and scales are bit-identical to `bitsandbytes.functional.quantize_blockwise` on CPU:

1. absmax per block of 256 (fp32); a block whose absmax is 0 stores code 0.
2. x * (1 / absmax), clamped to [-1, 1].
3. Snap to a 65536-point grid: i = trunc((x + 1) * 0.5 * 65535 + 0.5).
4. A 65536-entry table maps grid point i to the nearest code of the map (ties go low).

Step 3 is not exact nearest rounding: a value within ~1.5e-5 (in [-1, 1] units) of the
midpoint between two codes can land on the farther code (a few codes per thousand). That
is bitsandbytes' choice on CPU (older releases binary-searched the map instead); we keep
it so the bytes match. Its CUDA kernel searches the map directly, so bitsandbytes on CUDA
may differ in those codes (not compared here: no GPU). Either way the absmax moves by at
most one step of the 8-bit map, far below NF4's own error.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DQ_BLOCKSIZE = 256  # absmax values per second-level block, fixed by bitsandbytes
_GRID = 65536  # points of the [-1, 1] grid in step 3

_map_cache: dict[torch.device, torch.Tensor] = {}
_grid_cache: dict[torch.device, torch.Tensor] = {}


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' dynamic 8-bit map (Dettmers 2015, arXiv:1511.04561): (256,) fp32, sorted.

    Same torch fp32 arithmetic as `bitsandbytes.functional.create_dynamic_map`, hence the
    same float32 values: for each exponent 10^-6 .. 10^0, the midpoints of a linspace over
    [0.1, 1] with 2^i + 1 (signed) points, mirrored for the sign, plus 0 and 1.
    """
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    parts: list[torch.Tensor] = []

    def add(n_boundaries: int, exponent: int) -> None:
        boundaries = torch.linspace(0.1, 1, n_boundaries, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        parts.append((10 ** (-(max_exponent_bits - 1) + exponent)) * means)
        if signed:
            parts.append(-(10 ** (-(max_exponent_bits - 1) + exponent)) * means)

    for i in range(max_exponent_bits):
        bits = i + non_sign_bits - max_exponent_bits
        add(2**bits + 1 if signed else 2 ** (bits + 1) + 1, i)
    if additional_items > 0:
        add(additional_items + 1, max_exponent_bits - 1)
    parts.append(torch.tensor([0.0, 1.0]))
    values = torch.cat(parts)
    if values.numel() != 2**total_bits:
        raise ValueError(f"dynamic map has {values.numel()} values, expected {2**total_bits}")
    return torch.sort(values).values


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The signed dynamic map on `device`, cached: (256,) fp32."""
    device = torch.device(device)
    if device not in _map_cache:
        _map_cache[device] = create_dynamic_map(signed=True).to(device)
    return _map_cache[device]


def _grid_table(device: torch.device) -> torch.Tensor:
    """(65536,) uint8: grid point i of [-1, 1] -> index of the nearest map value (ties low).

    Built like bitsandbytes' `build_quantize_lut`: grid value -1 + 2i/65535 in fp32,
    code index = number of code midpoints strictly below it.
    """
    if device not in _grid_cache:
        code = dynamic_map("cpu")
        midpoints = 0.5 * (code[:-1] + code[1:])  # (255,)
        grid = -1.0 + (2.0 * torch.arange(_GRID, dtype=torch.float32)) / float(_GRID - 1)  # (65536,)
        table = torch.searchsorted(midpoints, grid, side="left").to(torch.uint8)
        _grid_cache[device] = table.to(device)
    return _grid_cache[device]


def quantize_dynamic8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 1-D fp32 tensor in blocks of 256 -> (codes uint8 (n,), scales fp32 (ceil(n/256),))."""
    x = x.reshape(-1).float()
    n = x.numel()
    n_blocks = math.ceil(n / DQ_BLOCKSIZE)
    blocks = F.pad(x, (0, n_blocks * DQ_BLOCKSIZE - n)).view(n_blocks, DQ_BLOCKSIZE)  # (nb, 256)
    scales = blocks.abs().amax(dim=1)  # (nb,); zero padding never changes the max
    scaled = (blocks * (1.0 / scales).unsqueeze(1)).clamp_(-1.0, 1.0)  # NaN in all-zero blocks
    grid_index = ((scaled + 1.0) * 0.5 * float(_GRID - 1) + 0.5).nan_to_num_(0.0).to(torch.int32)
    codes = _grid_table(x.device)[grid_index]  # (nb, 256) uint8
    codes = codes.masked_fill_((scales == 0).unsqueeze(1), 0)
    return codes.reshape(-1)[:n], scales


def dequantize_dynamic8(
    codes: torch.Tensor, scales: torch.Tensor, code_map: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of `quantize_dynamic8`: (n,) uint8 + (ceil(n/256),) fp32 -> (n,) fp32.

    `code_map` is `dynamic_map(device)`; pass it in from traced code (torch.compile), where a
    lazily filled global cache must not be touched.
    """
    n = codes.numel()
    n_blocks = scales.numel()
    if code_map is None:
        code_map = dynamic_map(codes.device)
    values = code_map[codes.int()]  # (n,) fp32
    values = F.pad(values, (0, n_blocks * DQ_BLOCKSIZE - n)).view(n_blocks, DQ_BLOCKSIZE)
    return (values * scales.unsqueeze(1)).reshape(-1)[:n]
