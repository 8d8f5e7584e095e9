"""The LoRA-adapted SwiGLU MLP of Llama-style models as one autograd Function, for training.

    y = down(silu(gate(x)) * up(x))

where each projection is W x (+ b) + (B A dropout(x)) * scaling (a LoRALinear) or a plain
frozen W x (+ b). Why our own backward: autograd through the module keeps four tensors of
the intermediate width per token and layer (gate's output for silu, silu's output and up's
output for the product, the product h for down_proj and its LoRA path). Backward needs
only the gate and up outputs g and u: silu(g) and h = silu(g) * u are elementwise and are
recomputed. So `_SwiGLULoRA` saves x (the MLP input, which the unfused path keeps too), g,
u, the rank-r products (x A^T, h A^T) and the 1-byte dropout masks: 2 x intermediate_size
values per token and layer fewer (tests/adapters/test_fused_mlp.py counts the bytes).
Measured on SmolLM2-135M (bench/train_vs_peft.py's lorakit side, fp32, batch 4 x 256, no
gradient checkpointing): the training peak RSS fell from 3941 to 3451 MB, the same losses.

`fuse_lora_mlps` installs it as a per-instance forward, which leaves module paths and
state_dict keys alone; the original forward runs whenever the fused one does not apply
(no grad, no trainable adapter, merged adapters, quantized or trainable bases).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.lora import LoRALinear, LoRASpec, lora_delta_backward, lora_delta_forward, shared_cast

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
RECOMPUTE = "lorakit_recompute"  # attribute of a fused MLP: True = keep x only, redo gate and up in backward
Part = tuple[nn.Linear, LoRALinear | None]  # (frozen base linear, its LoRA wrapper if adapted)


def _parts(mlp: nn.Module) -> list[Part] | None:
    """gate, up, down as (base, LoRA or None); None unless each base is a plain nn.Linear.

    `type(...) is nn.Linear` on purpose: lorakit's quantized layers, bitsandbytes' nn.Linear
    subclasses and GPT-2's Conv1D compute differently and keep the unfused path; so do DoRA layers
    (their output is rescaled per row by m / ||W + s B A||, which the fused Function does not compute).
    """
    parts = []
    for name in _PROJECTIONS:
        module = getattr(mlp, name, None)
        lora = module if isinstance(module, LoRALinear) else None
        if lora is not None and lora.use_dora:
            return None
        base = lora.base_layer if lora is not None else module
        if type(base) is not nn.Linear:
            return None
        parts.append((base, lora))
    return parts


def _is_silu(act: Any) -> bool:
    return type(act) is nn.SiLU or (
        type(act).__name__ == "SiLUActivation" and type(act).__module__.startswith("transformers.")
    )


def _project(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor | None,
             lora_b: torch.Tensor | None, spec: LoRASpec | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """W x + b + the LoRA delta; returns (y, dropout mask or None, x A^T or None).

    The mask is drawn after the base matmul, as LoRALinear does, so a seeded run draws the
    same masks fused and unfused.
    """
    y = F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))  # (..., out)
    if lora_a is None or lora_b is None or spec is None:
        return y, None, None
    delta, mask, xa = lora_delta_forward(x, lora_a, lora_b, spec)
    return y.add_(delta.to(y.dtype)), mask, xa


def _project_backward(
    dy: torch.Tensor, x: torch.Tensor | None, mask: torch.Tensor | None, xa: torch.Tensor | None, w: torch.Tensor,
    lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, spec: LoRASpec | None, need_x: bool, need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(grad of x through W, grad of x through the LoRA path, grad A, grad B), each None when not needed."""
    dx = dy @ w.to(dy.dtype) if need_x else None  # (..., in)
    if lora_a is None or lora_b is None or xa is None or spec is None:
        return dx, None, None, None
    dx_lora, grad_a, grad_b = lora_delta_backward(dy, x, mask, xa, lora_a, lora_b, spec, need_x, need_a, need_b)
    return dx, dx_lora, grad_a, grad_b


def _reproject(x: torch.Tensor, weights: tuple, xa: torch.Tensor | None, spec: LoRASpec | None) -> torch.Tensor:
    """`_project`'s y again from its input and its kept x A^T (no new dropout draw): the same ops on the same values."""
    w, bias, _, lora_b = weights
    y = F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))  # (..., out)
    if xa is None or spec is None:
        return y
    return y.add_((xa @ lora_b.to(spec.compute_dtype).T).mul_(spec.scaling).to(y.dtype))


class _SwiGLULoRA(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) saving x, g, u, the masks and the rank-r products (see the module docstring).

    Inputs after (x, base dtype, specs): for gate, up, down in turn W, b, A, B (None where
    absent). Frozen W and b get no gradient; the caller keeps the unfused path when they train.
    """

    @staticmethod
    def forward(ctx, x, base_dtype, specs, recompute, *weights):  # type: ignore[override]
        # x (..., hidden); g, u (..., inter); y (..., hidden)
        gate, up, down = weights[0:4], weights[4:8], weights[8:12]
        xb = shared_cast(x, base_dtype)  # under autocast a bf16 copy, recomputable when x is a norm output
        g, g_mask, g_xa = _project(xb, *gate, specs[0])
        u, u_mask, u_xa = _project(xb, *up, specs[1])
        y, d_mask, d_xa = _project(F.silu(g) * u, *down, specs[2])
        kept = (None, None) if recompute else (g, u)  # recompute: backward redoes the two base matmuls instead
        ctx.save_for_backward(xb, *kept, g_mask, g_xa, u_mask, u_xa, d_mask, d_xa, *weights)
        ctx.x_dtype, ctx.specs = x.dtype, specs
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        xb, g, u, g_mask, g_xa, u_mask, u_xa, d_mask, d_xa, *weights = ctx.saved_tensors
        (gw, _, ga, gb), (uw, _, ua, ub), (dw, _, da, db) = weights[0:4], weights[4:8], weights[8:12]
        if g is None:  # recomputed from x and the kept rank-r products: the forward's bits again
            g, u = _reproject(xb, weights[0:4], g_xa, ctx.specs[0]), _reproject(xb, weights[4:8], u_xa, ctx.specs[1])
        need = ctx.needs_input_grad[4:]  # per weight, in the order of `weights`
        need_x = ctx.needs_input_grad[0]
        specs = ctx.specs
        s = F.silu(g)  # recomputed, (..., inter)
        h = s * u if da is not None and need[10] else None  # down's LoRA input, only for grad A
        dh, dh_lora, grad_da, grad_db = _project_backward(
            dy.to(g.dtype), h, d_mask, d_xa, dw, da, db, specs[2], True, need[10], need[11])
        del h
        if dh_lora is not None:
            dh = dh.add_(dh_lora.to(dh.dtype))
        du = dh * s
        dg = torch.ops.aten.silu_backward(dh.mul_(u), g)  # the kernel autograd's silu uses
        del s, dh
        dxg, dxg_lora, grad_ga, grad_gb = _project_backward(
            dg, xb, g_mask, g_xa, gw, ga, gb, specs[0], need_x, need[2], need[3])
        dxu, dxu_lora, grad_ua, grad_ub = _project_backward(
            du, xb, u_mask, u_xa, uw, ua, ub, specs[1], need_x, need[6], need[7])
        dx = None
        if need_x:  # summed in x's dtype, as autograd sums the branches of the unfused path
            parts = [t.to(ctx.x_dtype) for t in (dxg, dxu, dxg_lora, dxu_lora) if t is not None]
            dx = sum(parts[1:], parts[0])
        return (dx, None, None, None,  # x, base dtype, specs, recompute
                None, None, grad_ga, grad_gb, None, None, grad_ua, grad_ub, None, None, grad_da, grad_db)


def _use_fused(parts: list[Part], x: torch.Tensor) -> bool:
    """Training through at least one unmerged adapter over frozen, matching-dtype bases."""
    if not torch.is_grad_enabled():
        return False
    loras = [lora for _, lora in parts if lora is not None]
    if not loras or any(lora.merged or lora.disabled for lora in loras):
        return False
    if not any(lora.lora_A.weight.requires_grad or lora.lora_B.weight.requires_grad for lora in loras):
        return False
    if any(p.requires_grad for base, _ in parts for p in base.parameters()):
        return False  # a training base needs its own gradients: not ours to give
    if not torch.is_autocast_enabled(x.device.type) and any(base.weight.dtype != x.dtype for base, _ in parts):
        return False  # the unfused path raises its own dtype error
    return True


def _swiglu(parts: list[Part], x: torch.Tensor, recompute: bool = False) -> torch.Tensor:
    device = x.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    weights: list[torch.Tensor | None] = []
    for base, lora in parts:
        weights += [base.weight, base.bias]
        weights += [lora.lora_A.weight, lora.lora_B.weight] if lora is not None else [None, None]
    specs = tuple(None if lora is None else lora.spec(device) for _, lora in parts)
    return _SwiGLULoRA.apply(x, autocast or x.dtype, specs, recompute, *weights)


def _fused_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP's forward while fused: `_SwiGLULoRA` when training adapters, else the class's own."""
    parts = _parts(self)
    if parts is None or not _use_fused(parts, x):
        return type(self).forward(self, x)
    return _swiglu(parts, x, getattr(self, RECOMPUTE, False))


@torch.no_grad()
def _computes_swiglu(mlp: nn.Module, parts: list[Part]) -> bool:
    """The module's own forward gives down(silu(gate(x)) * up(x)) on a probe input (dropout off)."""
    weight = parts[0][0].weight
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, weight.shape[1], generator=gen).to(weight.device, weight.dtype)  # (3, hidden)
    modes = [(m, m.training) for m in mlp.modules()]
    mlp.eval()
    try:
        want = type(mlp).forward(mlp, x).float()
        got = _swiglu(parts, x).float()
    finally:
        for m, training in modes:
            m.training = training
    tol = 1e-5 if weight.dtype == torch.float32 else 1e-2
    return got.shape == want.shape and float((got - want).abs().max()) <= tol * (1.0 + float(want.abs().max()))


def fusable(mlp: nn.Module) -> bool:
    """A Llama-style gated MLP with SiLU and at least one LoRA-adapted plain-linear projection."""
    if "forward" in vars(mlp):
        return False  # this instance's forward is already replaced (by us, or someone else): leave it
    if not _is_silu(getattr(mlp, "act_fn", None)):
        return False
    parts = _parts(mlp)
    return parts is not None and any(lora is not None for _, lora in parts) and _computes_swiglu(mlp, parts)


def fuse_lora_mlps(model: nn.Module) -> list[str]:
    """Give every fusable MLP (see `fusable`) the fused training forward; returns their module paths.

    Call after adapters are injected. Parameters, buffers and state_dict keys do not change;
    `unfuse_lora_mlps` takes it back out.
    """
    fused = []
    for name, module in model.named_modules():
        if fusable(module):
            module.forward = types.MethodType(_fused_forward, module)
            fused.append(name)
    return fused


def recompute_mlps(model: nn.Module, count: int) -> int:
    """The first `count` fused MLPs keep only their input for backward and redo gate and up there; returns how many.

    Saves 2 x intermediate_size values per token and layer for two of the MLP's three base matmuls again
    in backward (selective activation checkpointing; train.memory_budget_gb chooses `count`).
    """
    fused = [m for m in model.modules() if isinstance(vars(m).get("forward"), types.MethodType)
             and vars(m)["forward"].__func__ is _fused_forward]
    for i, module in enumerate(fused):
        setattr(module, RECOMPUTE, i < count)
    return min(count, len(fused))


def unfuse_lora_mlps(model: nn.Module) -> int:
    """Put the class's own forward back on every fused MLP; returns how many there were."""
    count = 0
    for module in model.modules():
        forward = vars(module).get("forward")
        if isinstance(forward, types.MethodType) and forward.__func__ is _fused_forward:
            del module.forward
            count += 1
    return count
