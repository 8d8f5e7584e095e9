"""Frozen lower blocks, computed once: their output is replayed in every later epoch.

When the adapters sit in the upper blocks only (the demo trains LoRA on blocks 18-29 of
SmolLM2's 30), the embedding and the blocks below the first adapted one are a fixed function
of the input row: every epoch after the first recomputes exactly the activations it computed
before. `FrozenBlockCache` records, per training row, the hidden state leaving the last frozen
block on the row's first pass, and on later passes hands that tensor to the first trainable
block; the frozen blocks are not run. Nothing downstream can tell: the frozen weights, the
row and the positions/masks are the same (the row key covers all three), dropout in the
frozen part is checked to be off, and nothing below the first adapted block needs a gradient.

A LoRA step costs about forward(all blocks) + backward(adapted blocks), so on the demo an
epoch after the first skips the forward of 18 of its 30 blocks. rows up to a memory budget (on the demo, 14,671 tokens x 576 x 4 bytes = 34 MB), on the
training device; a batch with a row that is not cached is computed in full (and recorded). Single process
only: under torchrun every rank sees other rows each epoch, and FSDP shards the blocks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]
DEFAULT_BUDGET_BYTES = 2 << 30


class FrozenBlockCache:
    def __init__(self, blocks: nn.ModuleList, first_trainable: int, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self.blocks, self.k, self.budget = blocks, first_trainable, budget_bytes
        self.rows: dict[bytes, torch.Tensor] = {}
        self.bytes = 0
        self.hits = 0  # batches replayed
        self._replay: torch.Tensor | None = None
        self._tuple_out = False
        self._record: list[bytes] | None = None
        for i, block in enumerate(blocks[:first_trainable]):
            block.forward = self._forward_for(i, block.forward)  # instance attribute: nn.Module.__call__ finds it first

    def _forward_for(self, i: int, original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self._replay is not None:  # skip the frozen block: block 0 hands over the recorded output
                out = self._replay if i == 0 else hidden_states
                return (out,) if self._tuple_out and i == self.k - 1 else out
            out = original(hidden_states, *args, **kwargs)
            if i == self.k - 1 and self._record is not None:
                self._tuple_out = isinstance(out, tuple)
                self._store(out[0] if self._tuple_out else out)
            return out

        return forward

    def _store(self, hidden: torch.Tensor) -> None:
        assert self._record is not None
        for key, row in zip(self._record, hidden.detach()):
            size = row.numel() * row.element_size()
            if key not in self.rows and self.bytes + size <= self.budget:
                self.rows[key] = row.clone()
                self.bytes += size

    def wrap(self, loss_fn: LossFn) -> LossFn:
        def cached(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
            keys = row_keys(batch)
            if all(key in self.rows for key in keys):
                self.hits += 1
                self._replay = torch.stack([self.rows[key] for key in keys])
                try:
                    return loss_fn(model, batch)
                finally:
                    self._replay = None
            self._record = keys
            try:
                return loss_fn(model, batch)
            finally:
                self._record = None

        return cached

    def remove(self) -> None:
        for block in self.blocks[: self.k]:
            block.__dict__.pop("forward", None)
        self.rows.clear()


def row_keys(batch: dict[str, torch.Tensor]) -> list[bytes]:
    """One key per row: its token ids, positions and attention mask (whatever the batch carries)."""
    ids = batch["input_ids"]
    parts = [ids] + [batch[k] for k in ("position_ids", "attention_mask") if isinstance(batch.get(k), torch.Tensor)]
    keys = []
    for r in range(ids.shape[0]):
        h = hashlib.blake2b(digest_size=20)
        for t in parts:
            row = t[r].detach().cpu().contiguous()
            h.update(str((row.dtype, tuple(row.shape))).encode())
            h.update(row.numpy().tobytes() if row.dtype != torch.bfloat16 else row.view(torch.int16).numpy().tobytes())
        keys.append(h.digest())
    return keys


def frozen_block_cache(model: nn.Module, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> FrozenBlockCache | None:
    """A cache for the blocks below the first trainable one, or None where replaying is not exact or not worth it.

    Requires: every trainable parameter inside the blocks (LoRA on blocks; not prompt tuning or
    full fine-tuning), at least one frozen block below them, and no active dropout in the
    embedding or the frozen blocks.
    """
    from lorakit.train.distributed import decoder_blocks

    blocks = decoder_blocks(model)
    if blocks is None or len(blocks) < 2:
        return None
    trainable_blocks = [i for i, block in enumerate(blocks) if any(p.requires_grad for p in block.parameters())]
    inside = {id(p) for block in blocks for p in block.parameters()}
    if not trainable_blocks or any(p.requires_grad and id(p) not in inside for p in model.parameters()):
        return None
    k = trainable_blocks[0]
    if k == 0:
        return None
    below = [m for i, block in enumerate(blocks[:k]) for m in block.modules()]
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    below += list(embeddings.modules()) if embeddings is not None else []
    for m in below:
        if isinstance(m, nn.Dropout) and m.p > 0:
            return None
        for attr in ("attention_dropout", "dropout", "dropout_p"):
            value = getattr(m, attr, None)
            if isinstance(value, float) and value > 0:
                return None
    return FrozenBlockCache(blocks, k, budget_bytes)
