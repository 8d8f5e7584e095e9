"""Optimizer and learning-rate schedule.

The schedule is a pure function of the step (`lr_at`), applied to the param groups each
step, so there is no scheduler state to checkpoint or get out of sync on resume.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakit.config import TrainConfig
from lorakit.errors import LorakitError


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.warmup_steps > 0:
        return min(cfg.warmup_steps, total_steps)
    return int(math.ceil(cfg.warmup_ratio * total_steps))


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine/linear/constant."""
    warm = warmup_steps(cfg, total_steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant" or total_steps <= warm:
        return cfg.lr
    progress = (step - warm) / max(1, total_steps - warm)
    if cfg.schedule == "linear":
        return cfg.lr * max(0.0, 1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; never decay biases, norms or 1-D parameters."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if not any(g["params"] for g in groups):
        raise LorakitError("nothing to train: no parameter requires a gradient; check adapter.target_modules")
    betas = (cfg.adam_betas[0], cfg.adam_betas[1])
    if cfg.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        if device.type != "cuda":
            raise LorakitError(
                f"train.optimizer {cfg.optimizer} needs a CUDA GPU (bitsandbytes); use train.optimizer: adamw here"
            )
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise LorakitError(f"train.optimizer {cfg.optimizer} needs bitsandbytes: pip install bitsandbytes") from None
        cls = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(groups, lr=cfg.lr, betas=betas)
    # The fused kernel (CPU and CUDA) does the whole update in one pass over the parameters.
    fused = device.type in ("cpu", "cuda") and all(
        p.dtype in (torch.float32, torch.bfloat16, torch.float16) for g in groups for p in g["params"]
    )
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
