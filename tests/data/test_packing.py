"""Packing isolates examples (checked on a real model) and batches are seeded per epoch."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from lorakit.data import (IGNORE, PackedSequence, TokenizedExample, make_batches, pack_examples,
                          real_token_fraction, render, tokenize_examples)
from tests.conftest import tiny_lm_for, tiny_tokenizer
from tests.data.conftest import chat_rows

TOK = tiny_tokenizer()
PAD = TOK.pad_token_id
MAX = 96


def examples(n: int = 24) -> list[TokenizedExample]:
    rows = chat_rows(n)
    rendered = [render([{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}],
                       "chatml", TOK) for r in rows]
    return tokenize_examples(rendered, TOK, MAX)


def segments(position_ids: list[int]) -> list[int]:
    """Example index of every token, from the restarts of position_ids."""
    seg, out = -1, []
    for p in position_ids:
        seg += p == 0
        out.append(seg)
    return out


def test_packs_every_example_once_without_padding() -> None:
    exs = examples()
    packed = pack_examples(exs, MAX, seed=0)
    assert len(packed) < len(exs)
    assert all(len(p.input_ids) <= MAX and PAD not in p.input_ids for p in packed)
    pieces = Counter()
    for p in packed:
        seg = segments(p.position_ids)
        for s in set(seg):
            pieces[tuple(t for t, k in zip(p.input_ids, seg) if k == s)] += 1
    assert pieces == Counter(tuple(e.input_ids) for e in exs)
    assert sum(p.num_examples for p in packed) == len(exs)
    assert real_token_fraction(packed, MAX) == sum(len(e.input_ids) for e in exs) / (len(packed) * MAX)
    assert [p.input_ids for p in pack_examples(exs, MAX, seed=0)] == [p.input_ids for p in packed]


def test_no_target_crosses_an_example_boundary() -> None:
    exs = examples()
    packed = pack_examples(exs, MAX, seed=0)
    for p in packed:
        seg = segments(p.position_ids)
        for t in range(len(p.labels) - 1):  # position t is scored against labels[t + 1]
            if p.labels[t + 1] != IGNORE:
                assert seg[t] == seg[t + 1]
    # ... and packing loses no target that the examples had on their own
    assert sum(int(x != IGNORE) for p in packed for x in p.labels[1:]) == sum(e.num_trained for e in exs)


@torch.no_grad()
def test_packed_examples_do_not_attend_to_each_other() -> None:
    """A padded batch of packed rows, attention_mask=None, gives each example its lone logits."""
    model = tiny_lm_for(TOK)
    packed = pack_examples(examples(12), MAX, seed=0)
    batches = make_batches(packed, batch_size=3, pad_id=PAD, seed=0, epoch=0)
    assert max(p.num_examples for p in packed) > 1, "want rows holding several examples"
    assert any((b["input_ids"] == PAD).any() for b in batches), "want a batch with padding"
    worst = 0.0
    for batch in batches:
        assert "attention_mask" not in batch
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for row in range(batch["input_ids"].shape[0]):
            pos = batch["position_ids"][row].tolist()
            starts = [i for i, p in enumerate(pos) if p == 0]
            for a, b in zip(starts, starts[1:] + [len(pos)]):
                ids = batch["input_ids"][row, a:b]
                if (ids == PAD).all():
                    continue  # the padding segment
                alone = model(input_ids=ids[None], use_cache=False).logits[0]
                worst = max(worst, float((logits[row, a:b] - alone).abs().max()))
    assert worst < 1e-5


@torch.no_grad()
def test_unpacked_batches_pad_right_with_attention_mask() -> None:
    model = tiny_lm_for(TOK)
    exs = examples(6)
    (batch,) = make_batches(exs, batch_size=6, pad_id=PAD, seed=0, epoch=0, shuffle=False)
    lengths = [len(e.input_ids) for e in exs]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}, use_cache=False).logits
    for row, ex in enumerate(exs):
        alone = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
        assert (logits[row, : len(ex.input_ids)] - alone).abs().max() < 1e-5


@pytest.mark.parametrize("pack", [False, True])
def test_batches_are_deterministic_per_seed_and_epoch(pack: bool) -> None:
    items: list = examples(40)
    if pack:
        items = pack_examples(items, MAX, seed=0)

    def order(seed: int, epoch: int) -> list[list[int]]:
        return [row.tolist() for b in make_batches(items, 2, PAD, seed, epoch) for row in b["input_ids"]]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    strip = lambda rows: sorted(tuple(t for t in r if t != PAD) for r in rows)  # noqa: E731
    assert strip(order(0, 0)) == strip(order(0, 1)) == sorted(tuple(x.input_ids) for x in items)


def test_length_grouping_puts_similar_lengths_together() -> None:
    items = examples(200)
    batches = make_batches(items, 4, PAD, seed=0, epoch=0)
    padded = sum(int(b["attention_mask"].numel() - b["attention_mask"].sum()) for b in batches)
    ungrouped = make_batches(items, 4, PAD, seed=0, epoch=0, shuffle=False)
    assert padded < sum(int(b["attention_mask"].numel() - b["attention_mask"].sum()) for b in ungrouped)
    for b in batches:
        lengths = b["attention_mask"].sum(1).tolist()
        assert lengths == sorted(lengths, reverse=True)


def test_make_batches_of_packed_sequences_types() -> None:
    packed = [PackedSequence([5, 6, 7], [IGNORE, 6, 7], [0, 1, 2], 1), PackedSequence([8, 9], [IGNORE, 9], [0, 1], 1)]
    (batch,) = make_batches(packed, 2, PAD, seed=0, epoch=0, shuffle=False)
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (2, 3)
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]  # padding is its own segment
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, 9, IGNORE]]
