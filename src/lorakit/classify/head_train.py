"""Training loop of classification.method head: cross-entropy on the head's logits, plain PyTorch.

The same budget knobs as the causal-LM loop (train.epochs / max_steps, batch_size, grad_accum, lr
with train.optim's warmup and schedule, max_grad_norm, precision via autocast), the same
metrics.jsonl events (train: step, loss, lr, tokens_per_s, rss_mb), so report.html draws its curves.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.classify.head import encode
from lorakit.config import TrainConfig
from lorakit.memory import peak_rss_mb, rss_mb
from lorakit.train.log import MetricsLog
from lorakit.train.optim import build_optimizer, lr_at, set_lr


@dataclass
class HeadTrainResult:
    steps: int
    elapsed: float
    final_loss: float | None
    peak_rss_mb: float | None


def batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def total_steps(n: int, tc: TrainConfig) -> int:
    per_epoch = math.ceil(math.ceil(n / tc.batch_size) / tc.grad_accum)
    return tc.max_steps if tc.max_steps > 0 else max(1, math.ceil(per_epoch * tc.epochs))


def micro_step(model: nn.Module, tokenizer: Any, texts: list[str], y: torch.Tensor, max_length: int,
               amp: torch.dtype | None, scale: float) -> tuple[float, int]:
    """Forward + backward of one micro-batch; returns (loss, tokens)."""
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in encode(tokenizer, texts, max_length).items()}
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        logits = model(**enc).logits  # (B, K)
    loss = F.cross_entropy(logits.float(), y.to(device))
    (loss * scale).backward()
    return float(loss.detach()), int(enc["attention_mask"].sum())


def train_head(model: nn.Module, tokenizer: Any, texts: list[str], y: list[int], tc: TrainConfig, max_length: int,
               seed: int, run_dir: Path, amp: torch.dtype | None, progress: Any = None) -> HeadTrainResult:
    """Train `model` (its trainable parameters) on (texts, y); logs to run_dir/metrics.jsonl."""
    steps = total_steps(len(texts), tc)
    optimizer = build_optimizer(model, tc, next(model.parameters()).device)
    log = MetricsLog(run_dir)
    model.train()
    start, epoch, queue, loss_avg = time.perf_counter(), 0, [], None
    window_loss, window_tokens, window_start = [], 0, time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for step in range(steps):
        set_lr(optimizer, lr_at(step, steps, tc))
        for _ in range(tc.grad_accum):
            if not queue:
                queue, epoch = batches(len(texts), tc.batch_size, seed, epoch), epoch + 1
            idx = queue.pop(0)
            loss, tokens = micro_step(model, tokenizer, [texts[i] for i in idx], torch.tensor([y[i] for i in idx]),
                                      max_length, amp, 1.0 / tc.grad_accum)
            window_loss.append(loss)
            window_tokens += tokens
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, tc.max_grad_norm if tc.max_grad_norm > 0
                                                         else float("inf")))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % tc.log_every == 0 or step + 1 == steps:
            loss_avg = sum(window_loss) / len(window_loss)
            spent = time.perf_counter() - window_start
            log.write("train", step=step + 1, loss=loss_avg, lr=lr_at(step, steps, tc), grad_norm=grad_norm,
                      tokens_per_s=window_tokens / spent if spent > 0 else None, rss_mb=rss_mb(),
                      peak_rss_mb=peak_rss_mb())
            window_loss, window_tokens, window_start = [], 0, time.perf_counter()
        if progress is not None:
            progress(step + 1, steps, loss_avg)
    elapsed = time.perf_counter() - start
    log.write("end", step=steps, elapsed_s=elapsed, peak_rss_mb=peak_rss_mb())
    log.close()
    model.eval()
    return HeadTrainResult(steps, elapsed, loss_avg, peak_rss_mb())
