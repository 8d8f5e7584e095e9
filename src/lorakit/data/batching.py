"""Turn examples or packed sequences into padded tensor batches, in a seeded order.

The order depends only on (seed, epoch), so a run resumed at (epoch, batch index) sees
exactly the batches it would have seen. Every batch has `input_ids`, `labels` (-100 at
padding and untrained tokens, aligned with input_ids, not shifted) and `position_ids`,
each (B, T).

Padding differs by kind:
- Plain examples get an `attention_mask` (B, T) and are length-grouped: sorted by length
  within shuffled mega-chunks of 50 batches, then the batch order is shuffled, so rows in
  a batch have similar lengths and little padding while the order stays random.
- Packed sequences get no `attention_mask`: transformers only detects packing from
  `position_ids` when the mask is None. Right padding is made its own sequence by giving
  it positions 0, 1, 2, ..., which the model reads as a new segment: real tokens never
  attend to it (it comes after them and is another segment), every padding row attends
  at least to itself (no all-masked rows, no NaN), and its labels are -100.
- Every batch has `real_mask` (B, T) bool (False on padding); a batch holding replay rows
  (`kind: replay`) also has `replay_mask` (B, T) bool, True on their tokens (the KL anchor's
  positions, `train.kl_to_base`).
- Packed sequences with a shared prefix (`PackedSequence.segment_ids`) get a 4D boolean
  `attention_mask` (B, 1, T, T), True where attention is allowed: causal, within one
  example or into the row's prefix. Padding attends only to itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lorakit.data.packing import PackedSequence, is_replay
from lorakit.data.tokenize import IGNORE, TokenizedExample

MEGA_CHUNK = 50  # batches per length-grouping chunk

Item = TokenizedExample | PackedSequence


def make_batches(items: Sequence[Item], batch_size: int, pad_id: int, seed: int, epoch: int,
                 shuffle: bool = True, part: tuple[int, int] = (0, 1)) -> list[dict[str, torch.Tensor]]:
    """Batches of `batch_size` items (the last may be smaller); shuffle=False keeps the given order.

    part=(k, n) keeps the k-th of n contiguous slices of every batch (data-parallel rank k of
    n, with batch_size the global batch): the n slices of a batch are exactly the rows a
    single process gets with part=(0, 1), each collated to its own width. A batch with fewer
    than n rows is dropped, so every rank gets as many batches as the others.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not items:
        return []
    rng = np.random.default_rng([seed, epoch]) if shuffle else None
    packed = isinstance(items[0], PackedSequence)
    if packed:
        order = rng.permutation(len(items)) if rng is not None else np.arange(len(items))
        groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    else:
        groups = _length_groups(np.array([len(x.input_ids) for x in items]), batch_size, rng)
    k, n = part
    if n > 1:
        groups = [g[k * len(g) // n : (k + 1) * len(g) // n] for g in groups if len(g) >= n]
    return [_collate([items[i] for i in g.tolist()], pad_id, packed) for g in groups]


def _length_groups(lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    if rng is None:
        order = np.arange(len(lengths))
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    order = rng.permutation(len(lengths))
    chunk = MEGA_CHUNK * batch_size
    groups = []
    for c in range(0, len(order), chunk):
        part = order[c : c + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        groups += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return [groups[i] for i in rng.permutation(len(groups)).tolist()]


def _collate(rows: list[Item], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # (B, T)
    position_ids = torch.arange(width, dtype=torch.long).repeat(len(rows), 1)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    replay = torch.zeros((len(rows), width), dtype=torch.bool)  # (B, T)
    for b, r in enumerate(rows):
        n = len(r.input_ids)
        input_ids[b, :n] = torch.tensor(r.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(r.labels, dtype=torch.long)
        mask[b, :n] = 1
        if packed:
            position_ids[b, :n] = torch.tensor(r.position_ids, dtype=torch.long)
            position_ids[b, n:] = torch.arange(width - n)  # padding: a segment of its own
            if r.replay is not None:
                replay[b, :n] = torch.tensor(r.replay, dtype=torch.bool)
        elif is_replay(r):
            replay[b, :n] = True
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
             "num_real": mask.sum(),  # () tokens that are not padding, for throughput figures
             "real_mask": mask.bool()}
    if replay.any():
        batch["replay_mask"] = replay
    if not packed:
        batch["attention_mask"] = mask
    elif rows[0].segment_ids is not None:  # one pack_examples call: all rows share a prefix or none do
        batch["attention_mask"] = _prefix_block_mask(rows, width)
    return batch


def _prefix_block_mask(rows: list[Item], width: int) -> torch.Tensor:
    """(B, 1, T, T) bool: causal, and within one segment or into segment 0 (the shared prefix)."""
    seg = torch.full((len(rows), width), -1, dtype=torch.long)  # (B, T); padding below
    for b, r in enumerate(rows):
        seg[b, : len(r.input_ids)] = torch.tensor(r.segment_ids)
    pad = seg < 0
    seg = torch.where(pad, -1 - torch.arange(width).expand_as(seg), seg)  # each padding token its own segment
    same = seg[:, :, None] == seg[:, None, :]  # (B, T, T)
    into_prefix = (seg[:, None, :] == 0) & ~pad[:, :, None]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    return ((same | into_prefix) & causal)[:, None]


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on `device` (other values as they are)."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
