"""Frozen quantized linear layers (the QLoRA base layer) and model-wide replacement.

The weight lives in module BUFFERS (uint8/int8 codes + fp32 scales), so `model.to(device)`,
`state_dict()` and FSDP carry it, and nothing about it is trainable. The forward
dequantizes it on the fly.

dtype rule, the same in train and eval, with or without autocast:
    x is cast to `compute_dtype`, the weight is dequantized to `compute_dtype`,
    y = F.linear(x, W, b) runs in `compute_dtype` and y is cast back to x.dtype.
`compute_dtype=None` means "the input's dtype". Autocast is switched off inside the layer
so it cannot override that choice.

The matmul goes through a custom autograd.Function whose backward recomputes the
dequantized weight instead of saving it: activation memory stays what a plain linear
would keep, and the only weight-sized memory is the transient dequantized copy.
It returns a gradient for the input (and for the bias if someone unfroze it), never
for the weight. Nothing depends on module state, so eval -> train, no_grad and
torch.compile all behave like a plain nn.Linear.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LorakitError
from lorakit.quant.dynamic8 import DQ_BLOCKSIZE, dynamic_map
from lorakit.quant.int8 import Int8Tensor, dequantize_int8_buffers, quantize_int8
from lorakit.quant.nf4 import (NF4Tensor, byte_table, check_blocksize, check_quant_type, dequantize_nf4_buffers,
                               quantize_4bit)

# (kind, weight shape, blocksize) -- plain constants, so torch.compile can specialize on them
Spec = tuple[str, tuple[int, ...], int]


def _dequantize(spec: Spec, buffers: tuple[torch.Tensor | None, ...], dtype: torch.dtype) -> torch.Tensor:
    kind, shape, blocksize = spec
    if kind == "nf4":
        data, absmax, scale, offset, pairs, code_map = buffers
        return dequantize_nf4_buffers(data, absmax, scale, offset, shape, blocksize, dtype, (pairs, code_map))
    data, scale = buffers[0], buffers[1]
    return dequantize_int8_buffers(data, scale, dtype)


class _QuantLinearFunction(torch.autograd.Function):
    """y = F.linear(x, dequant(W), b), with dL/dx = dL/dy @ dequant(W) recomputed in backward."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,  # (..., in)
        bias: torch.Tensor | None,  # (out,)
        spec: Spec,
        compute_dtype: torch.dtype | None,
        *buffers: torch.Tensor | None,
    ) -> torch.Tensor:
        dtype = compute_dtype or x.dtype
        with torch.autocast(x.device.type, enabled=False):
            weight = _dequantize(spec, buffers, dtype)  # (out, in)
            y = F.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype))  # (..., out)
        ctx.spec, ctx.dtype, ctx.x_dtype = spec, dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(*buffers)  # the quantized buffers only: no copy, no activation
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        buffers = ctx.saved_tensors
        grad_x = grad_bias = None
        g = grad_out.to(ctx.dtype)  # (..., out)
        if ctx.needs_input_grad[0]:
            with torch.autocast(grad_out.device.type, enabled=False):
                weight = _dequantize(ctx.spec, buffers, ctx.dtype)  # (out, in), recomputed
                grad_x = (g @ weight).to(ctx.x_dtype)  # (..., in)
        if ctx.needs_input_grad[1]:
            grad_bias = g.reshape(-1, g.shape[-1]).sum(0).to(ctx.bias_dtype)  # (out,)
        return (grad_x, grad_bias, None, None, *([None] * len(buffers)))


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear layer whose weight is stored (in, out). The one test for it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(module.weight, torch.Tensor)


def _check_linear(linear: nn.Module) -> tuple[torch.Tensor, int, int]:
    """(weight as (out, in), in_features, out_features) of an nn.Linear or a GPT-2 Conv1D."""
    weight = getattr(linear, "weight", None)
    if not (isinstance(linear, nn.Linear) or is_conv1d(linear)) or not isinstance(weight, torch.Tensor):
        raise LorakitError(f"from_linear needs an nn.Linear (or GPT-2 Conv1D) with a weight, got {type(linear).__name__}")
    if weight.is_meta:
        raise LorakitError(
            "the linear layer's weight is on the meta device (not loaded yet); load the weights before quantizing"
        )
    if isinstance(linear, nn.Linear):
        return weight, linear.in_features, linear.out_features
    in_f, out_f = weight.shape  # Conv1D: (nx, nf)
    return weight.T, int(in_f), int(out_f)


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is stored quantized (NF4Linear, Int8Linear).

    The one type test for "a lorakit quantized layer": `isinstance(m, QuantizedLinear)`.
    Shared parts: bias, forward, dequantized_weight, fp32-state protection.
    """

    _fp32_buffers: tuple[str, ...] = ()

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        compute_dtype: torch.dtype | None,
        device: torch.device | str | None,
        bias_dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.compute_dtype = compute_dtype
        if bias:
            # kept in full precision and frozen; unfreezing it works (its gradient is computed)
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=bias_dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def _spec(self) -> Spec:
        raise NotImplementedError

    def _quant_buffers(self) -> tuple[torch.Tensor | None, ...]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantLinearFunction.apply(x, self.bias, self._spec(), self.compute_dtype, *self._quant_buffers())

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a plain (out, in) tensor in `dtype` (default: compute_dtype, else fp32), e.g. to merge."""
        with torch.no_grad():
            return _dequantize(self._spec(), self._quant_buffers(), dtype or self.compute_dtype or torch.float32)

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype, weight: torch.Tensor | None = None) -> nn.Linear:
        """A frozen nn.Linear in `dtype` with this layer's bias and `weight` (out, in; default: the
        dequantized weight in fp32): the way out of quantization, for export and for unwrap_lora,
        which passes the merged weight."""
        weight = self.dequantized_weight(torch.float32) if weight is None else weight
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=weight.device,
                        dtype=dtype)
        out.weight.copy_(weight.to(dtype))
        if self.bias is not None:
            out.bias.copy_(self.bias.to(dtype))
        return out.requires_grad_(False)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # model.to(torch.bfloat16) / .half() would round the fp32 scales, silently changing the
        # quantized weight. Let device moves through, keep the scales' dtype.
        kept = {name: self._buffers[name] for name in self._fp32_buffers if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        self._refresh_tables()
        return self

    def _refresh_tables(self) -> None:
        """Rebuild constant tables after a move (also after to_empty(), which leaves garbage)."""


class NF4Linear(QuantizedLinear):
    """A frozen nn.Linear whose weight is stored as NF4 (about 4.13 bits per weight), or as FP4
    with `quant_type="fp4"` (same buffers and sizes; only the decode table differs)."""

    _fp32_buffers = ("weight_absmax", "weight_absmax_scale", "weight_absmax_offset")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = torch.bfloat16,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.float32,
        quant_type: str = "nf4",
    ) -> None:
        """Empty (zero) buffers of the right sizes: fill them with load_state_dict, or use from_linear."""
        check_blocksize(blocksize)
        check_quant_type(quant_type)
        super().__init__(in_features, out_features, bias, compute_dtype, device, bias_dtype)
        self.blocksize, self.double_quant, self.quant_type = blocksize, double_quant, quant_type
        n = in_features * out_features
        blocks = math.ceil(n / blocksize)
        u8 = dict(device=device, dtype=torch.uint8)
        f32 = dict(device=device, dtype=torch.float32)
        self.register_buffer("weight_data", torch.zeros(math.ceil(n / 2), **u8))  # (ceil(n/2),)
        if double_quant:
            self.register_buffer("weight_absmax", torch.zeros(blocks, **u8))  # (blocks,) codes
            self.register_buffer("weight_absmax_scale", torch.zeros(math.ceil(blocks / DQ_BLOCKSIZE), **f32))
            self.register_buffer("weight_absmax_offset", torch.zeros((), **f32))
        else:
            self.register_buffer("weight_absmax", torch.zeros(blocks, **f32))  # (blocks,)
            self.register_buffer("weight_absmax_scale", None)
            self.register_buffer("weight_absmax_offset", None)
        # constant decode tables as non-persistent buffers: they follow the module's device, stay
        # out of the state_dict, and torch.compile sees plain inputs instead of a global cache.
        # Rebuilt (not moved) by _apply, so .to(dtype) and to_empty() cannot corrupt them.
        self.register_buffer("nf4_table", byte_table(self.weight_data.device, quant_type).clone(),
                             persistent=False)  # (256, 2); the FP4 table when quant_type is fp4
        self.register_buffer("dq_map", dynamic_map(self.weight_data.device).clone(), persistent=False)  # (256,)

    def _refresh_tables(self) -> None:
        device = self.weight_data.device
        self.nf4_table = byte_table(device, self.quant_type).clone()  # byte -> (high, low) NF4/FP4 values
        self.dq_map = dynamic_map(device).clone()  # double-quant 8-bit map

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = torch.bfloat16,
        quant_type: str = "nf4",
    ) -> NF4Linear:
        """Quantize `linear`'s weight on its own device; the bias is copied in its own dtype."""
        weight, in_f, out_f = _check_linear(linear)
        q = quantize_4bit(weight, blocksize, double_quant, quant_type)
        bias_dtype = linear.bias.dtype if linear.bias is not None else torch.float32
        layer = cls(
            in_f,
            out_f,
            bias=linear.bias is not None,
            blocksize=blocksize,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
            device="meta",
            bias_dtype=bias_dtype,
            quant_type=quant_type,
        )
        layer.set_quantized_weight(q)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def set_quantized_weight(self, q: NF4Tensor) -> None:
        """Install an NF4Tensor (NF4 or FP4) of shape (out, in) as this layer's buffers (no copy)."""
        if tuple(q.shape) != (self.out_features, self.in_features):
            raise LorakitError(
                f"NF4 weight of shape {tuple(q.shape)} does not fit a {self.in_features}->{self.out_features} "
                f"layer; expected ({self.out_features}, {self.in_features})"
            )
        self.blocksize, self.double_quant, self.quant_type = q.blocksize, q.double_quant, q.quant_type
        self.weight_data = q.data
        self.weight_absmax = q.absmax
        self.weight_absmax_scale = q.absmax_scale
        self.weight_absmax_offset = q.absmax_offset
        self._refresh_tables()

    @property
    def quantized_weight(self) -> NF4Tensor:
        """An NF4Tensor view of the buffers (shares storage; follows .to(device))."""
        return NF4Tensor(
            self.weight_data,
            self.weight_absmax,
            self.weight_absmax_scale,
            self.weight_absmax_offset,
            torch.Size((self.out_features, self.in_features)),
            self.blocksize,
            self.quant_type,
        )

    def _spec(self) -> Spec:
        return ("nf4", (self.out_features, self.in_features), self.blocksize)

    def _quant_buffers(self) -> tuple[torch.Tensor | None, ...]:
        return (
            self.weight_data,
            self.weight_absmax,
            self.weight_absmax_scale,
            self.weight_absmax_offset,
            self.nf4_table,
            self.dq_map,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
            f"compute_dtype={self.compute_dtype}"
        )


class Int8Linear(QuantizedLinear):
    """A frozen nn.Linear whose weight is stored as per-row int8 (about 8 bits per weight)."""

    _fp32_buffers = ("weight_scale",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = torch.bfloat16,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.float32,
    ) -> None:
        """Empty (zero) buffers of the right sizes: fill them with load_state_dict, or use from_linear."""
        super().__init__(in_features, out_features, bias, compute_dtype, device, bias_dtype)
        self.register_buffer("weight_data", torch.zeros(out_features, in_features, device=device, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.zeros(out_features, device=device, dtype=torch.float32))

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = torch.bfloat16) -> Int8Linear:
        """Quantize `linear`'s weight on its own device; the bias is copied in its own dtype."""
        weight, in_f, out_f = _check_linear(linear)
        q = quantize_int8(weight)
        bias_dtype = linear.bias.dtype if linear.bias is not None else torch.float32
        layer = cls(
            in_f,
            out_f,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            device="meta",
            bias_dtype=bias_dtype,
        )
        layer.weight_data, layer.weight_scale = q.data, q.scale
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    @property
    def quantized_weight(self) -> Int8Tensor:
        """An Int8Tensor view of the buffers (shares storage; follows .to(device))."""
        return Int8Tensor(self.weight_data, self.weight_scale)

    def _spec(self) -> Spec:
        return ("int8", (self.out_features, self.in_features), 0)

    def _quant_buffers(self) -> tuple[torch.Tensor | None, ...]:
        return (self.weight_data, self.weight_scale)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"int8 per-row, compute_dtype={self.compute_dtype}"
        )


def is_linear(module: nn.Module) -> bool:
    """A layer LoRA can wrap: nn.Linear, GPT-2's Conv1D, or a lorakit quantized linear."""
    return isinstance(module, (nn.Linear, QuantizedLinear)) or is_conv1d(module)


def quantize_model_linears(
    model: nn.Module,
    method: Literal["nf4", "fp4", "int8"],
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = torch.bfloat16,
    skip: Iterable[str] = (),
) -> int:
    """Replace every nn.Linear (and GPT-2 Conv1D) in `model` by NF4Linear (nf4/fp4) or Int8Linear, in place;
    returns how many.

    Left alone: the output head (`model.get_output_embeddings()`, usually tied to the
    embeddings and sensitive to quantization), modules named in `skip` (a full dotted name
    like "model.layers.0.mlp.down_proj", or a last name like "lm_head" that matches at any
    depth), and LoRA's own lora_A/lora_B.

    One layer at a time: each layer is quantized on its current device, swapped in, and the
    old module's weight is dropped right away, so peak memory is the model so far plus one
    layer's temporaries, not two copies of the model. The replaced nn.Linear objects are
    left without a weight.
    """
    if method not in ("nf4", "fp4", "int8"):
        raise LorakitError(f"unknown quantization method {method!r}; use nf4, fp4 or int8")
    if method != "int8":
        check_blocksize(blocksize)
    skip_names = {skip} if isinstance(skip, str) else set(skip)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None

    def skipped(name: str) -> bool:
        last = name.rsplit(".", 1)[-1]
        return name in skip_names or last in skip_names or last.startswith("lora_")

    # every place a linear is reachable from (a module shared by two parents is swapped in both)
    places: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if (isinstance(module, nn.Linear) or is_conv1d(module)) and name and module is not head:
            places.setdefault(id(module), []).append(name)
    todo = [names for names in places.values() if not any(skipped(n) for n in names)]
    for names in todo:
        old = model.get_submodule(names[0])
        if method != "int8":
            new: nn.Module = NF4Linear.from_linear(old, blocksize, double_quant, compute_dtype, method)
        else:
            new = Int8Linear.from_linear(old, compute_dtype)
        new.train(old.training)
        for name in names:
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child_name, new)
        old.weight = None  # free the full-precision weight now, even if something still holds `old`
        old.bias = None
        del old
    return len(todo)
