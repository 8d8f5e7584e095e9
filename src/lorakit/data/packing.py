"""Pack whole examples into sequences of at most `max_length` tokens, without padding.

Short chat examples padded to the longest in a batch waste most of the compute; packing
several examples into one row recovers it. Isolation between the examples in a row comes
from `position_ids` restarting at 0 at each example: with `attention_mask=None`,
transformers (Llama, Qwen2, Mistral, ...) reads those restarts as sequence boundaries and
builds a block-diagonal causal mask, so no example attends to another.

Labels follow the unshifted convention of `tokenize.py` (the loss compares position t with
`labels[t + 1]`). The first token of every example gets label -100, so the last token of
one example is never trained to predict the first token of the next.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lorakit.data.tokenize import IGNORE, TokenizedExample


@dataclass
class PackedSequence:
    """Several whole examples back to back; `position_ids` restart at 0 for each."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    num_examples: int


def pack_examples(examples: Sequence[TokenizedExample], max_length: int, seed: int) -> list[PackedSequence]:
    """Best-fit-decreasing bin packing of whole examples into rows of <= max_length tokens.

    Examples are never split (a split answer would lose its prompt). Ties in length are
    ordered by a seeded shuffle, so the packing is deterministic for a seed. Bins are kept
    in buckets by remaining capacity (an integer <= max_length), so each placement is a
    bisect over at most max_length distinct capacities rather than a scan over all bins.
    """
    lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
    if len(lengths) and lengths.max() > max_length:
        raise ValueError(f"an example has {lengths.max()} tokens, more than max_length={max_length}; "
                         "tokenize with the same max_length")
    order = np.random.default_rng(seed).permutation(len(examples))
    order = order[np.argsort(-lengths[order], kind="stable")]  # longest first

    bins: list[list[int]] = []
    capacities: list[int] = []  # sorted distinct remaining capacities
    by_capacity: dict[int, list[int]] = {}  # capacity -> bin ids with that much room
    for i in order.tolist():
        size = int(lengths[i])
        if size == 0:
            continue
        k = bisect.bisect_left(capacities, size)
        if k < len(capacities):  # the fullest bin that still fits it
            room = capacities[k]
            b = by_capacity[room].pop()
            if not by_capacity[room]:
                del by_capacity[room], capacities[k]
        else:
            room, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        left = room - size
        if left > 0:
            if left not in by_capacity:
                bisect.insort(capacities, left)
                by_capacity[left] = []
            by_capacity[left].append(b)
    return [_concat([examples[i] for i in members]) for members in bins]


def _concat(members: list[TokenizedExample]) -> PackedSequence:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for ex in members:
        input_ids += ex.input_ids
        labels += [IGNORE] + ex.labels[1:]  # no target crosses from the previous example into this one
        position_ids += range(len(ex.input_ids))
    return PackedSequence(input_ids, labels, position_ids, len(members))


def real_token_fraction(packed: Sequence[PackedSequence], max_length: int) -> float:
    """Share of the packed rows' max_length capacity that holds real tokens (1.0 = no waste)."""
    if not packed:
        return 0.0
    return sum(len(p.input_ids) for p in packed) / (len(packed) * max_length)
