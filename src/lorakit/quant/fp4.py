"""FP4: bitsandbytes' 4-bit float code (the format the QLoRA paper compares NF4 against).

FP4 is a real floating-point format: 1 sign bit, 2 exponent bits (bias 2, not IEEE's 1),
1 mantissa bit. bitsandbytes (`get_4bit_type("fp4")`, 0.50) lists its 8 magnitudes in
bit-pattern order, 0, 0.0625, 8, 12, 4, 6, 2, 3, then the same negated (the code of bit
pattern 0b1000 is `-0`, which Python's int literal makes +0.0), and divides them all by
12 so that the largest is 1. The table below is that fp32 result, element for element.

Unlike NF4 the table is not sorted, so quantizing (bitsandbytes' CPU kernel,
backends/default/ops.py) bucketizes on the midpoints of the *sorted* values and maps the
bucket back to the bit pattern through `argsort(code)`. The two zeros (patterns 0 and 8)
sort next to each other, with a midpoint of 0: a scaled value in (-0.0026, 0] takes
pattern 0 and one in (0, 0.0026] pattern 8. Both decode to 0.0. `FP4_ORDER` is that
argsort, written out and checked against bitsandbytes in the tests.
"""

from __future__ import annotations

import torch

# bit pattern -> value, exactly bitsandbytes' fp32 table: [0, 0.0625, 8, 12, 4, 6, 2, 3, -0, ...] / 12
FP4_CODE = (torch.tensor([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                          0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0], dtype=torch.float32) / 12.0)
FP4_ORDER = torch.tensor([11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3], dtype=torch.uint8)  # argsort(FP4_CODE)
FP4_SORTED = FP4_CODE[FP4_ORDER.long()]  # (16,) ascending
FP4_MIDPOINTS = (FP4_SORTED[:-1] + FP4_SORTED[1:]) / 2  # (15,) fp32, the rounding boundaries

if not bool((FP4_SORTED[1:] >= FP4_SORTED[:-1]).all()):
    raise RuntimeError("FP4_ORDER does not sort FP4_CODE")

_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def fp4_codes(scaled: torch.Tensor) -> torch.Tensor:
    """FP4 bit pattern (uint8, same shape) of values in [-1, 1]: nearest value, ties to the lower one."""
    device = scaled.device
    if device not in _cache:
        _cache[device] = (FP4_MIDPOINTS.to(device), FP4_ORDER.to(device))
    midpoints, order = _cache[device]
    position = torch.bucketize(scaled, midpoints, out_int32=True)  # index into the sorted values
    return order[position]
