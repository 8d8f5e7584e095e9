"""Input checks shared by the quantizers; failures are user-facing LorakitErrors."""

from __future__ import annotations

import torch

from lorakit.errors import LorakitError


def check_weight(weight: torch.Tensor, what: str) -> None:
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise LorakitError(f"{what} quantizes floating-point tensors, got {got}; pass the fp32/bf16/fp16 weight")
    if weight.numel() == 0:
        raise LorakitError(f"{what} got an empty tensor of shape {tuple(weight.shape)}; there is nothing to quantize")
    bad = int((~torch.isfinite(weight)).sum())
    if bad:
        raise LorakitError(
            f"{what}: the weight of shape {tuple(weight.shape)} has {bad} NaN/inf values; "
            "the checkpoint is broken, reload or re-download it"
        )
