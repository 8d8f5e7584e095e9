"""The LoRA layer (Hu et al. 2021, arXiv:2106.09685).

    y = W x + b + (B A dropout(x)) * scaling

A is r x in, B is out x r. B starts at zero, so a fresh adapter changes nothing.
scaling = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023, arXiv:2312.03732).

The adapter weights live in fp32 whatever the base dtype, so the optimizer never rounds
its updates to bf16; merging is computed in fp32 and written back in the base's dtype.

DoRA (Liu et al. 2024, arXiv:2402.09353) splits the weight into a magnitude m (one per output)
and a direction that LoRA updates:

    W' = m * (W + s B A) / ||W + s B A||_row          (norm over the input dimension)

m starts at ||W||_row, so a fresh DoRA layer equals the base too. The norm is a constant in
backward (the paper's section 4.3, as PEFT). The forward is PEFT's formulation, so the two agree
to rounding:  y = base(x) + (m/n - 1) * (W x) + (m/n) * (B A x) * s,  with n the (detached) norm.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.quant.linear import QuantizedLinear, is_conv1d
from lorakit.train import norm_recompute

Init = Literal["kaiming", "gaussian"]


def linear_dims(layer: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a layer LoRA can wrap.

    fan_in_fan_out is True for GPT-2's Conv1D, whose weight is stored in x out.
    """
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, False
    if is_conv1d(layer):
        in_f, out_f = layer.weight.shape  # Conv1D: (nx, nf)
        return int(in_f), int(out_f), True
    if isinstance(layer, QuantizedLinear):
        return layer.in_features, layer.out_features, False
    raise LorakitError(
        f"LoRA cannot wrap a {type(layer).__name__}; target linear layers (nn.Linear, GPT-2 Conv1D)"
    )


class LoRASpec(NamedTuple):
    """How one pass computes a LoRA path (LoRALinear.spec says it for a layer)."""

    scaling: float
    p: float  # dropout probability on the path's input in this pass (0 outside training)
    compute_dtype: torch.dtype  # autocast's dtype when it is on, else the adapter's (fp32)


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The base layer's weight as (out, in) in fp32, dequantized for a quantized layer (DoRA's norm)."""
    if isinstance(layer, QuantizedLinear):
        return layer.dequantized_weight(torch.float32)
    weight = layer.weight.detach().float()
    return weight.T if is_conv1d(layer) else weight  # Conv1D stores (in, out)


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """||weight||_row: the L2 norm of each output's weights over the input dimension; (out, in) -> (out,)."""
    return torch.linalg.norm(weight, dim=1)


def lora_delta_forward(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, spec: LoRASpec
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """delta = (dropout(x) @ A^T @ B^T) * scaling in the compute dtype; returns (delta, mask, u = dropout(x) A^T).

    The one LoRA forward (LoRALinear and the fused SwiGLU MLP call it). The dropout mask is a
    1-byte bool (None without dropout): backward recomputes dropout(x) from x and the mask
    instead of keeping it, 4 bytes per input element per layer less in fp32, while x itself is
    usually alive anyway (the norm's output, shared by q/k/v). Measured on SmolLM2-135M
    (bench/BENCHMARKS.md): the training peak drops without a speed cost.
    """
    # x (..., in); lora_a (r, in); lora_b (out, r)
    scaling, p, cdt = spec
    xc = x.to(cdt)
    keep = 1.0 - p
    mask = (torch.rand(x.shape, device=x.device) < keep) if p > 0 else None  # (..., in) bool
    h = xc * mask * (1.0 / keep) if mask is not None else xc
    u = h @ lora_a.to(cdt).T  # (..., r)
    delta = (u @ lora_b.to(cdt).T).mul_(scaling)  # (..., out)
    return delta, mask, u


def lora_delta_backward(
    grad: torch.Tensor, x: torch.Tensor | None, mask: torch.Tensor | None, u: torch.Tensor,
    lora_a: torch.Tensor, lora_b: torch.Tensor, spec: LoRASpec, need_x: bool, need_a: bool, need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(grad x in the compute dtype, grad A, grad B) of lora_delta_forward, each None when not needed.

    `x` may be None when grad A is not needed (it is only used to recompute dropout(x)).
    """
    _, p, cdt = spec
    keep = 1.0 - p
    g = grad.to(cdt) * spec.scaling  # (..., out)
    a, b = lora_a.to(cdt), lora_b.to(cdt)
    g2, u2 = g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1])
    grad_b = (g2.T @ u2).to(lora_b.dtype) if need_b else None  # (out, r)
    gu = g @ b  # (..., r)
    grad_a = None
    if need_a:
        assert x is not None, "grad A needs the path's input"
        h = x.to(cdt)
        if mask is not None:
            h = h * mask * (1.0 / keep)  # dropout(x) again, transient
        grad_a = (gu.reshape(-1, gu.shape[-1]).T @ h.reshape(-1, h.shape[-1])).to(lora_a.dtype)  # (r, in)
    grad_x = None
    if need_x:
        grad_x = gu @ a  # (..., in)
        if mask is not None:
            grad_x = grad_x.mul_(mask).mul_(1.0 / keep)
    return grad_x, grad_a, grad_b


class _CastCache:
    """The compute-dtype copy of the last input cast, while the input and the copy are alive (weak references only).

    Under autocast, q, k and v (and gate and up outside the fused MLP) are called on one input in a
    row; each LoRA path keeps the copy for backward, so they share one instead of one each.
    """

    def __init__(self) -> None:
        self._key: tuple[weakref.ref, int, torch.dtype] | None = None
        self._value: weakref.ref | None = None

    def cast(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if x.dtype == dtype:
            return x
        key = self._key
        if key is not None and key[0]() is x and key[1] == x._version and key[2] == dtype:
            cached = self._value() if self._value is not None else None
            if cached is not None:
                return cached
        out = x.detach().to(dtype)
        norm_recompute.note_cast(x, out)
        self._key, self._value = (weakref.ref(x), x._version, dtype), weakref.ref(out)
        return out


_CASTS = _CastCache()


def shared_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype` without autograd: one copy for the calls on the same input (_CastCache), known to
    train.recompute_norms when `x` is a norm's output."""
    return _CASTS.cast(x, dtype)


class _LoRAPath(torch.autograd.Function):
    """The training-time LoRA branch: lora_delta_forward, saving x in the compute dtype, the mask and u.

    x is kept as the compute-dtype copy (bf16 under bf16 autocast: half the bytes of the fp32
    activation), one copy shared by the paths that read the same input (`_CastCache`). Backward
    reads x only in that dtype, so the gradients are the same bits.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, spec):  # type: ignore[override]
        xc = _CASTS.cast(x, spec.compute_dtype)  # (..., in)
        delta, mask, u = lora_delta_forward(xc, lora_a, lora_b, spec)
        ctx.save_for_backward(xc, mask, u, lora_a, lora_b)
        ctx.spec, ctx.x_dtype = spec, x.dtype
        return delta

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        xc, mask, u, lora_a, lora_b = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        grad_x, grad_a, grad_b = lora_delta_backward(grad, xc, mask, u, lora_a, lora_b, ctx.spec, need_x, need_a, need_b)
        return None if grad_x is None else grad_x.to(ctx.x_dtype), grad_a, grad_b, None


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The update's multiplier: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@dataclass(frozen=True)
class LoRAFactor:
    """One adapter's update of one layer, scaling * B @ A: what merging adds to the base weight."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scaling: float  # lora_scaling(alpha, r), times any strength multiplier
    adapter: str = ""  # the adapter's directory, for messages ("" for one in memory)
    module: str = ""  # the layer's path in the model ("" when the caller knows it)
    magnitude: torch.Tensor | None = None  # DoRA's m (out,); None for plain LoRA

    def dora_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """m / ||W + s B A||_row (out,) in fp32 for the (out, in) fp32 base weight `weight`; no gradient."""
        assert self.magnitude is not None, "dora_scale needs a DoRA factor"
        with torch.no_grad():
            norm = row_norm(weight + self.delta().to(weight.device))
        return self.magnitude.float().to(weight.device) / norm

    def delta(self, fan_in_fan_out: bool = False) -> torch.Tensor:
        """scaling * B @ A in fp32: (out, in), or (in, out) for a GPT-2 Conv1D weight."""
        delta = (self.B.float() @ self.A.float()) * self.scaling  # (out, in)
        return delta.T if fan_in_fan_out else delta


@torch.no_grad()
def merged_weight(weight: torch.Tensor, factors: Sequence[LoRAFactor], name: str,
                  fan_in_fan_out: bool = False) -> torch.Tensor:
    """weight + the factors' updates, in fp32: the one merge (LoRALinear.merge, unwrap_lora, `lorakit merge`).

    A DoRA factor gives m / ||W + s B A||_row * (W + s B A) instead (one scale per output row). It
    must be the layer's only factor: DoRA rescales the whole weight, so it does not add up with others.
    `weight` is the fp32 base weight of layer `name`, left unchanged. An update of the wrong shape
    or a sum with NaN/inf is refused, naming the adapter and the layer.
    """
    merged = weight
    for f in factors:
        delta = f.delta(fan_in_fan_out)
        source = f"adapter {f.adapter}" if f.adapter else "the adapter"
        if delta.shape != merged.shape:
            raise LorakitError(f"{source}: {name} has an update of shape {tuple(delta.shape)} but the layer's "
                               f"weight is {tuple(merged.shape)}; the adapter belongs to another model")
        if f.magnitude is not None and len(factors) > 1:
            raise LorakitError(f"{source} is a DoRA adapter and {name} has {len(factors) - 1} other adapter(s); "
                               "DoRA rescales the whole weight, so merge it alone")
        merged = merged + delta.to(merged.device)
        if f.magnitude is not None:
            rows = merged.T if fan_in_fan_out else merged  # (out, in)
            scale = f.magnitude.float().to(merged.device) / row_norm(rows)  # (out,)
            merged = merged * (scale if fan_in_fan_out else scale[:, None])
        if not torch.isfinite(merged).all():
            raise LorakitError(f"merging {source} into {name} gives NaN/inf; the adapter is broken "
                               "(check its training run for a diverged loss)")
    return merged


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


def _init_magnitude(base_layer: nn.Module) -> torch.Tensor:
    """DoRA's m: ||W||_row (fp32), so W' = m * W / ||W||_row = W before training (Liu et al. 2024, eq. 2)."""
    return row_norm(dense_weight(base_layer))


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (and DoRA's magnitude with use_dora)."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: Init = "kaiming",
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        if r <= 0:
            raise LorakitError(f"LoRA rank r must be > 0, got {r}")
        in_f, out_f, fan_in_fan_out = linear_dims(base_layer)
        self.base_layer = base_layer
        self.in_features, self.out_features = in_f, out_f
        self.fan_in_fan_out = fan_in_fan_out
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.scale = 1.0  # strength multiplier at inference (set_scale); training leaves it at 1
        device = _device_of(base_layer)
        self.lora_A = nn.Linear(in_f, r, bias=False, device=device, dtype=torch.float32)  # (r, in)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=device, dtype=torch.float32)  # (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False  # True: the layer computes the base alone (the KL anchor's reference pass)
        _init_lora_a(self.lora_A.weight, init, r)
        _init_lora_b(self.lora_B.weight)
        # DoRA: m (out,) in fp32; PEFT's file key is <layer>.lora_magnitude_vector
        self.magnitude = nn.Parameter(_init_magnitude(base_layer).to(device)) if use_dora else None
        self._dora_merge_scale: torch.Tensor | None = None  # m / n at merge time, what unmerge divides by

    @property
    def use_dora(self) -> bool:
        return self.magnitude is not None

    def adapter_parameters(self) -> list[nn.Parameter]:
        """A, B and (DoRA) the magnitude: what trains, what an adapter file holds."""
        params = [self.lora_A.weight, self.lora_B.weight]
        return params + [self.magnitude] if self.magnitude is not None else params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (..., out)
        if self.merged or self.disabled:
            if self.merged and self.disabled:
                raise LorakitError("cannot switch off a merged LoRA layer; unmerge it first")
            return y
        spec = self.spec(x.device.type)
        if self.magnitude is not None:
            return self._dora_forward(x, y, spec)
        if torch.is_grad_enabled() and (x.requires_grad or self.lora_A.weight.requires_grad):
            delta = _LoRAPath.apply(x, self.lora_A.weight, self.lora_B.weight, spec)
        else:  # no graph to keep: nn.Dropout draws the mask, so a seeded run's random stream is unchanged
            delta = lora_delta_forward(self.lora_dropout(x), self.lora_A.weight, self.lora_B.weight,
                                       spec._replace(p=0.0))[0]
        return y + delta.to(y.dtype)

    def _dora_forward(self, x: torch.Tensor, y: torch.Tensor, spec: LoRASpec) -> torch.Tensor:
        """y + (m/n - 1) * W x + (m/n) * (B A x) * s, PEFT's DoRA forward; with dropout both terms see dropout(x)."""
        assert self.magnitude is not None
        scale = self.factor().dora_scale(dense_weight(self.base_layer))  # (out,): m / n, n detached
        bias = getattr(self.base_layer, "bias", None)
        if spec.p > 0:  # as PEFT: the base is recomputed on the dropped-out input
            x = self.lora_dropout(x)
            base = self.base_layer(x)
        else:
            base = y
        base = base - bias if bias is not None else base  # W x (..., out)
        if torch.is_grad_enabled() and (x.requires_grad or self.lora_A.weight.requires_grad):
            delta = _LoRAPath.apply(x, self.lora_A.weight, self.lora_B.weight, spec._replace(p=0.0))
        else:
            delta = lora_delta_forward(x, self.lora_A.weight, self.lora_B.weight, spec._replace(p=0.0))[0]
        return y + ((scale - 1) * base + scale * delta).to(y.dtype)

    @property
    def dropout(self) -> float:
        """The dropout probability on the LoRA path's input, as configured (and saved)."""
        return float(self.lora_dropout.p) if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def spec(self, device_type: str) -> LoRASpec:
        """This pass's scaling, dropout (only in training) and compute dtype (autocast's when it is on)."""
        on = torch.is_autocast_enabled(device_type)
        compute_dtype = torch.get_autocast_dtype(device_type) if on else self.lora_A.weight.dtype
        return LoRASpec(self.scaling, self.dropout if self.training else 0.0, compute_dtype)

    @property
    def scaling(self) -> float:
        """alpha / r (alpha / sqrt(r) with rsLoRA) times the inference scale."""
        return lora_scaling(self.alpha, self.r, self.use_rslora) * self.scale

    def factor(self) -> LoRAFactor:
        return LoRAFactor(self.lora_A.weight, self.lora_B.weight, self.scaling, magnitude=self.magnitude)

    def merge(self, name: str = "this LoRA layer") -> None:
        """Fold the update into the base weight (`name`: the layer's path, for errors). Safe to call twice."""
        if self.merged:
            return
        weight = self._base_weight("merge")
        if self.magnitude is not None:  # unmerge divides by the same m / n
            self._dora_merge_scale = self.factor().dora_scale(dense_weight(self.base_layer))
        merged = merged_weight(weight.data.float(), [self.factor()], name, self.fan_in_fan_out)
        weight.data.copy_(merged.to(weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Take the update back out of the base weight. Safe to call twice."""
        if not self.merged:
            return
        weight = self._base_weight("unmerge")
        merged = weight.data.float()
        if self._dora_merge_scale is not None:  # W = W' / (m / n) - s B A
            scale = self._dora_merge_scale
            merged = merged / (scale if self.fan_in_fan_out else scale[:, None])
            self._dora_merge_scale = None
        weight.data.copy_((merged - self.factor().delta(self.fan_in_fan_out)).to(weight.dtype))
        self.merged = False

    def set_scale(self, scale: float) -> None:
        """Multiply the update by `scale` (1 = as trained), as `lorakit merge --scale` does.

        A merged layer is unmerged and merged again at the new scale, so its base weight then
        carries the fp32 rounding of one more subtract and add (about one ulp per change); the
        current scale again changes nothing.
        """
        if not math.isfinite(scale):
            raise LorakitError(f"LoRA scale must be a finite number, got {scale}")
        if scale == self.scale:
            return
        merged = self.merged
        self.unmerge()
        self.scale = float(scale)
        if merged:
            self.merge()

    def _base_weight(self, what: str) -> nn.Parameter:
        weight = getattr(self.base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or isinstance(self.base_layer, QuantizedLinear):
            raise LorakitError(
                f"cannot {what} into a quantized base layer in place; "
                "use `lorakit merge`, which dequantizes and writes full precision"
            )
        return weight

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha:g}, "
            f"scaling={self.scaling:g}{'' if self.scale == 1 else f' (scale {self.scale:g})'}, "
            f"{'dora=True, ' if self.use_dora else ''}merged={self.merged}"
        )


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")
