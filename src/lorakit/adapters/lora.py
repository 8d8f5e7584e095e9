"""The LoRA layer (Hu et al. 2021, arXiv:2106.09685).

    y = W x + b + (B A dropout(x)) * scaling

A is r x in, B is out x r. B starts at zero, so a fresh adapter changes nothing.
scaling = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023, arXiv:2312.03732).
The adapter weights live in fp32 whatever the base dtype, so the optimizer never rounds
its updates to bf16; merging is computed in fp32 and written back in the base's dtype.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LorakitError

Init = Literal["kaiming", "gaussian"]


def linear_dims(layer: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a layer LoRA can wrap.

    fan_in_fan_out is True for GPT-2's Conv1D, whose weight is stored in x out.
    """
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, False
    if _is_conv1d(layer):
        in_f, out_f = layer.weight.shape  # Conv1D: (nx, nf)
        return int(in_f), int(out_f), True
    if hasattr(layer, "in_features") and hasattr(layer, "dequantized_weight"):
        return int(layer.in_features), int(layer.out_features), False  # lorakit.quant layers
    raise LorakitError(
        f"LoRA cannot wrap a {type(layer).__name__}; target linear layers (nn.Linear, GPT-2 Conv1D)"
    )


def _is_conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")


def _init_lora_a(weight: torch.Tensor, init: Init, r: int) -> None:
    """A: kaiming-uniform with a=sqrt(5) as in the LoRA reference code and PEFT, or N(0, 1/r)."""
    if init == "kaiming":
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    elif init == "gaussian":
        nn.init.normal_(weight, std=1.0 / r)
    else:
        raise LorakitError(f"unknown LoRA init {init!r}; use kaiming or gaussian")


def _init_lora_b(weight: torch.Tensor) -> None:
    """B: zeros, so B A = 0 and the adapted model starts equal to the base."""
    nn.init.zeros_(weight)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: Init = "kaiming",
    ) -> None:
        super().__init__()
        if r <= 0:
            raise LorakitError(f"LoRA rank r must be > 0, got {r}")
        in_f, out_f, fan_in_fan_out = linear_dims(base_layer)
        self.base_layer = base_layer
        self.in_features, self.out_features = in_f, out_f
        self.fan_in_fan_out = fan_in_fan_out
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.scaling = self.alpha / math.sqrt(r) if use_rslora else self.alpha / r
        device = _device_of(base_layer)
        self.lora_A = nn.Linear(in_f, r, bias=False, device=device, dtype=torch.float32)  # (r, in)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=device, dtype=torch.float32)  # (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        _init_lora_a(self.lora_A.weight, init, r)
        _init_lora_b(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (..., out)
        if self.merged:
            return y
        h = self.lora_dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            h = h.to(self.lora_A.weight.dtype)
        delta = F.linear(F.linear(h, self.lora_A.weight), self.lora_B.weight)  # (..., out)
        return y + (delta * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(B @ A) * scaling in fp32, in the base weight's layout."""
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def merge(self) -> None:
        """Fold the update into the base weight. Safe to call twice."""
        if self.merged:
            return
        weight = self._base_weight("merge")
        merged = weight.data.float() + self.delta_weight()
        if not torch.isfinite(merged).all():
            raise LorakitError("merging would put NaN/inf into the base weight; the adapter is broken")
        weight.data.copy_(merged.to(weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Take the update back out of the base weight. Safe to call twice."""
        if not self.merged:
            return
        weight = self._base_weight("unmerge")
        weight.data.copy_((weight.data.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False

    def _base_weight(self, what: str) -> nn.Parameter:
        weight = getattr(self.base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or hasattr(self.base_layer, "dequantized_weight"):
            raise LorakitError(
                f"cannot {what} into a quantized base layer in place; "
                "use `lorakit merge`, which dequantizes and writes full precision"
            )
        return weight

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha:g}, "
            f"scaling={self.scaling:g}, merged={self.merged}"
        )


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")
