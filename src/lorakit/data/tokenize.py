"""Tokenize rendered text and build the loss mask from its trained character spans.

Label convention: `labels` are aligned with `input_ids`, NOT pre-shifted. `labels[t]` is
`input_ids[t]` where token t is trained and -100 elsewhere; the loss shifts, so the hidden
state at position t is scored against `labels[t + 1]` (see `lorakit.losses`). A label
at position 0 therefore never counts, and `num_trained` counts only `labels[1:]`.

Tokens are encoded with `add_special_tokens=False`: templates own their special tokens
(BOS included), so nothing is added that the template did not write, and the text seen at
inference (`render_prompt`) tokenizes to exactly the same prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lorakit.data.templates import Rendered
from lorakit.errors import DataError

IGNORE = -100  # the label of a position not trained (cross_entropy's ignore_index); the one definition
_CHUNK = 512  # texts per tokenizer call: the Rust tokenizer parallelises within a call


@dataclass
class TokenizedExample:
    """One training example as token ids and aligned labels (-100 = not trained)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool
    num_trained: int
    """Trained targets the shifted loss will see: labels[1:] != -100."""
    cut: int = 0
    """Tokens dropped by truncation to max_length (the start is kept)."""
    missing_eos: int = 0
    """Trained spans whose last kept token is not the end-of-turn token."""
    row: int = 0
    source: str = ""
    messages: list[dict[str, str]] | None = None
    """The normalised conversation (None for plain text), so evaluation can re-prompt it."""
    text: str | None = None
    """The raw text of a plain-text example."""
    meta: dict[str, Any] = field(default_factory=dict)
    """The row's other columns (e.g. `fact`)."""


def tokenize_example(rendered: Rendered, tokenizer: Any, max_length: int) -> TokenizedExample:
    """Token ids and labels of one rendered example, truncated to `max_length` tokens."""
    return tokenize_examples([rendered], tokenizer, max_length)[0]


def tokenize_examples(rendered: Sequence[Rendered], tokenizer: Any, max_length: int) -> list[TokenizedExample]:
    """Batched `tokenize_example`: one tokenizer call per chunk of texts."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{type(tokenizer).__name__} is a slow tokenizer; loss masks need a fast one "
                        "(offset mappings); install `tokenizers` or use the model's tokenizer.json")
    eos_ids = _single_token_ids(tokenizer, {r.eos for r in rendered})
    out: list[TokenizedExample] = []
    for start in range(0, len(rendered), _CHUNK):
        chunk = rendered[start : start + _CHUNK]
        enc = tokenizer([r.text for r in chunk], add_special_tokens=False, return_offsets_mapping=True)
        for r, ids, offsets in zip(chunk, enc["input_ids"], enc["offset_mapping"]):
            out.append(_mask(r, ids, offsets, max_length, eos_ids.get(r.eos)))
    return out


def _single_token_ids(tokenizer: Any, strings: set[str]) -> dict[str, int | None]:
    """Each end-of-turn string's token id, or None where it is not one token."""
    ids = {}
    for s in strings:
        encoded = tokenizer(s, add_special_tokens=False)["input_ids"]
        ids[s] = encoded[0] if len(encoded) == 1 else None
    return ids


def _mask(r: Rendered, ids: list[int], offsets: list[tuple[int, int]], max_length: int,
          eos_id: int | None) -> TokenizedExample:
    n = len(ids)
    ids_np = np.asarray(ids, dtype=np.int64)
    off = np.asarray(offsets, dtype=np.int64).reshape(n, 2)  # (N, 2) character [start, end)
    spans = np.asarray(r.train_spans, dtype=np.int64).reshape(-1, 2)  # (S, 2)
    tok_start, tok_end = off[:, :1], np.maximum(off[:, 1:], off[:, :1] + 1)  # zero-width tokens cover 1 char
    trained = ((tok_start < spans[:, 1]) & (tok_end > spans[:, 0])).any(axis=1)  # (N,) overlaps any span
    labels = np.where(trained, ids_np, IGNORE)

    keep = min(n, max_length)
    # The token that ends each span is the last one starting before the span's end.
    last = np.searchsorted(off[:, 0], spans[:, 1], side="left") - 1  # (S,)
    ok = (last >= 0) & (last < keep)
    if eos_id is not None and n:
        ok &= ids_np[np.clip(last, 0, n - 1)] == eos_id
    else:
        ok[:] = False  # the end-of-turn string is several tokens: generation cannot stop on it
    labels = labels[:keep]
    return TokenizedExample(
        input_ids=ids[:keep],
        labels=labels.tolist(),
        truncated=n > max_length,
        num_trained=int((labels[1:] != IGNORE).sum()),
        cut=n - keep,
        missing_eos=int((~ok).sum()),
    )
