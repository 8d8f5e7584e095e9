"""The causal-LM loss both training and evaluation use: summed cross-entropy on trained tokens.

Below `train` and `eval` in the import order, so evaluation's perplexity (eval.runner) and the
training loop (train.loss checks its chunked fast path against this one) share one definition
without eval importing train.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.data.tokenize import IGNORE

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]
"""(model, batch) -> (cross-entropy summed over the batch's trained targets, their count)."""


def full_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The reference path: full logits from the model, shifted cross-entropy."""
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
    ).logits  # (B, T, V)
    targets = batch["labels"][:, 1:]
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())
