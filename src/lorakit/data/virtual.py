"""Prompt tuning's virtual tokens in the token sequences (see lorakit.adapters.prompt_tuning).

Every example starts with the n virtual-token ids (-1 .. -n), untrained, then its own tokens:
positions 0..n-1 on the virtual tokens and the text after them, as PEFT prepends them. The
example's first real token stays untrained as it was (position 0 never had a target, so the
trained targets, and every figure counted from them, are unchanged).

Packing needs nothing of its own: the virtual tokens are the same untrained first n tokens of
every example, so `shared_prefix_length` finds them (followed by the system turn, when the
examples share one) and, with data.share_prefix, a packed row holds them once, every example
attending to that one copy and continuing at its own positions (n + P ...): each example
computes exactly what it computes alone with the virtual tokens prepended. Where no prefix is
shared (data.share_prefix false, a model that takes no 4D mask, a common prefix under
SHARED_PREFIX_MIN tokens), each example in a row carries its own copy, positions restarting at 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from lorakit.adapters.prompt_tuning import virtual_token_ids
from lorakit.data.tokenize import IGNORE, TokenizedExample


def with_virtual_tokens(examples: Sequence[TokenizedExample], n: int) -> list[TokenizedExample]:
    """`examples`, each with the n virtual tokens in front (untrained); n = 0 returns them as they are."""
    if n <= 0:
        return list(examples)
    return [dataclasses.replace(ex, **dict(zip(("input_ids", "labels"), virtual_row(ex.input_ids, ex.labels, n))))
            for ex in examples]


def virtual_row(ids: Sequence[int], labels: Sequence[int], n: int) -> tuple[list[int], list[int]]:
    """One token row (ids, aligned labels) with the n virtual tokens in front, as `with_virtual_tokens` does it."""
    if n <= 0:
        return list(ids), list(labels)
    return virtual_token_ids(n) + list(ids), [IGNORE] * (n + 1) + list(labels[1:])
