"""Kept candidates -> train.jsonl, heldout.jsonl, unanswerable.jsonl rows.

Held-out rows are other wordings (a paraphrase or the reversed question) of facts whose first
kept wording is trained: the evaluation asks about trained facts, never in a trained wording. A
seeded `heldout_fraction` of the facts that have a second wording give one to heldout.jsonl; a
seeded `unanswerable_fraction` of the unanswerable questions go to unanswerable.jsonl, the rest
train the refusal. Then the n-gram guard: a held-out or unanswerable question that shares a
`ngram_guard`-word sequence (normalised) with any training row's question or answer moves to
train, until none does (each move adds text to train, so it repeats).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from lorakit.synth.filters import ngrams, words
from lorakit.synth.pairs import Candidate


@dataclass
class Splits:
    train: list[Candidate] = field(default_factory=list)
    heldout: list[Candidate] = field(default_factory=list)
    unanswerable: list[Candidate] = field(default_factory=list)
    moved: int = 0
    """Held-out or unanswerable questions moved to train by the n-gram guard."""


def split(kept: Sequence[Candidate], heldout_fraction: float, unanswerable_fraction: float, n: int,
          seed: int) -> Splits:
    rng = random.Random(seed)
    out = Splits()
    groups: dict[tuple[str, int], list[Candidate]] = {}
    for c in kept:
        groups.setdefault((c.kind, c.group), []).append(c)
    for (kind, _), rows in groups.items():
        if kind == "refusal":
            (out.unanswerable if rng.random() < unanswerable_fraction else out.train).extend(rows)
        elif len(rows) >= 2 and rng.random() < heldout_fraction:
            pick = rng.randrange(1, len(rows))
            out.heldout.append(rows[pick])
            out.train.extend(r for i, r in enumerate(rows) if i != pick)
        else:
            out.train.extend(rows)
    trained: set[tuple[str, ...]] = set()
    for c in out.train:
        trained |= ngrams(words(c.question), n) | ngrams(words(c.answer), n)
    moved = True
    while moved:
        moved = False
        for held in (out.heldout, out.unanswerable):
            for c in list(held):
                if ngrams(words(c.question), n) & trained:
                    held.remove(c)
                    out.train.append(c)
                    out.moved += 1
                    trained |= ngrams(words(c.question), n) | ngrams(words(c.answer), n)
                    moved = True
    order = {id(c): i for i, c in enumerate(kept)}
    out.train.sort(key=lambda c: order[id(c)])
    return out


def row(c: Candidate, source: dict) -> dict:
    """A messages-format row with the evaluator's `fact` and `kind`, plus `variant`, `source` and `window`."""
    r = {"messages": [{"role": "user", "content": c.question}, {"role": "assistant", "content": c.answer}],
         "fact": c.fact, "kind": c.kind}
    if c.kind == "fact":
        r["variant"] = c.variant
    return {**r, "source": source, "window": c.window}
