"""A KL anchor to the base model: keep the tuned model's next-token distributions near the base's.

Fine-tuning a small model on a few hundred rows of new facts moves more than those facts:
on the handbook demo the tuned SmolLM2 forgot a third of the general answers it knew
("2 plus 2 is 5"). Replaying general rows helps, but cross-entropy on a replay row only
pulls the single greedy token up; the base model's whole distribution at that position is
what it "knew". The anchor adds, per step,

    weight * mean over anchor positions t of KL(p_base(. | x_<=t) || p_tuned(. | x_<=t))

to the cross-entropy (forward KL: the base distribution is the target, as in distillation).
The base distribution comes from the same model with every LoRA layer switched off
(`adapters_disabled`), under no_grad: no second copy of the weights in memory, and at step 0
(B = 0) the tuned and base models are the same, so the KL is exactly 0.

Anchor positions (`train.kl_to_base.on`), each position t scored on the distribution it
predicts for token t + 1, within its own example (packed rows are isolated, so that
distribution depends on the example's own tokens only):
- replay: the trained targets of replay rows (`kind: replay`);
- non_target: every real position whose next token is not trained (system turn, user turns,
  template tokens): the model is taught the answers and held to the base everywhere else;
- all: every real position;
- a list of these: their union (e.g. [replay, non_target]).

The head is applied in checkpointed chunks on the anchor positions only, like the loss
(`train.loss`), so the full-vocabulary logits of a batch are never held at once. With the
frozen-block replay (`train.frozen_cache`) both passes start from the replayed output of the
frozen lower blocks: the reference pass runs only the adapted blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorakit.adapters.inject import adapters_disabled
from lorakit.errors import LorakitError
from lorakit.train.loss import IGNORE, body_hidden, chunk_rows, decoder_and_head, head_ce_sum, trained_rows


def anchor_positions(batch: dict[str, torch.Tensor], on: str | list[str]) -> torch.Tensor:
    """(B, T-1) bool: the positions t whose next-token distribution the anchor scores (a list: the union)."""
    if isinstance(on, list):
        masks = [anchor_positions(batch, part) for part in on]
        return torch.stack(masks).any(dim=0)
    labels = batch["labels"]
    real = batch["real_mask"] if "real_mask" in batch else torch.ones_like(labels, dtype=torch.bool)
    real = real[:, :-1].bool()
    trained = labels[:, 1:] != IGNORE  # position t predicts token t + 1
    if on == "replay":
        replay = batch.get("replay_mask")
        if replay is None:
            return torch.zeros_like(trained)
        return trained & replay[:, 1:]
    if on == "non_target":
        return real & ~trained
    if on == "all":
        return real
    raise ValueError(f"unknown anchor positions {on!r}")


def _kl_sum(head: nn.Module, tuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """sum over rows of KL(softmax(head(base)) || softmax(head(tuned))), in fp32."""
    log_q = F.log_softmax(head(tuned).float(), dim=-1)  # (n, V)
    log_p = F.log_softmax(head(base).float(), dim=-1)  # (n, V)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum")


@dataclass
class KLAnchor:
    """The loss function `loss(model, batch) -> (ce_sum + scale * kl_sum, n_trained)`.

    `scale` is set by the training step to weight * trained tokens / anchor positions of the
    whole step, so that dividing by the trained tokens gives mean CE + weight * mean KL.
    `kl_sum` accumulates the (detached) KL of the step for logging. Under no_grad (evaluation)
    it is the plain loss.
    """

    weight: float
    on: str | list[str]
    scale: float = 0.0
    kl_sum: float = 0.0

    def positions(self, batch: dict[str, torch.Tensor]) -> int:
        return int(anchor_positions(batch, self.on).sum())

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        parts = decoder_and_head(model)
        if parts is None:
            raise LorakitError(f"train.kl_to_base needs a causal LM with a separate output head; "
                               f"{type(model).__name__} has none: set train.kl_to_base.weight: 0")
        body, head = parts
        hidden = body_hidden(body, batch)  # (B, T, H)
        rows, targets = trained_rows(hidden, batch)
        n = int(targets.numel())
        loss = head_ce_sum(head, rows, targets) if n else hidden.sum() * 0.0
        pos = anchor_positions(batch, self.on)  # (B, T-1)
        if not torch.is_grad_enabled() or self.scale == 0.0 or not bool(pos.any()):
            return loss, n
        with torch.no_grad(), adapters_disabled(model):
            base = body_hidden(body, batch)[:, :-1][pos]  # (N, H) the base model at the anchor positions
        tuned = hidden[:, :-1][pos]  # (N, H)
        kl = hidden.new_zeros((), dtype=torch.float32)
        step = chunk_rows(head)
        for start in range(0, tuned.shape[0], step):
            kl = kl + checkpoint(_kl_sum, head, tuned[start : start + step], base[start : start + step],
                                 use_reentrant=False)
        self.kl_sum += float(kl.detach())
        return loss + self.scale * kl, n
