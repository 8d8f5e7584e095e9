"""Packing isolates examples (checked on a real model) and batches are seeded per epoch."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from lorakit.data import (IGNORE, PackedSequence, TokenizedExample, make_batches, pack_examples,
                          real_token_fraction, render, shared_prefix_length, tokenize_examples)
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


# ----------------------------------------------------------------------------- shared prefix

SYSTEM = "You answer questions about the fictional ferry cooperative from its handbook only, and nothing else."


def prefixed_examples(n: int = 12, system: str | None = SYSTEM) -> list[TokenizedExample]:
    rows = chat_rows(n)
    rendered = [render([{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}],
                       "chatml", TOK, system) for r in rows]
    return tokenize_examples(rendered, TOK, MAX + 64)


def test_shared_prefix_length_is_the_untrained_common_start() -> None:
    exs = prefixed_examples()
    n = shared_prefix_length(exs)
    assert n >= 16
    assert all(e.input_ids[:n] == exs[0].input_ids[:n] for e in exs)
    assert len({e.input_ids[n] for e in exs}) > 1 or len({e.input_ids[n + 1] for e in exs}) > 1
    assert all(x == IGNORE for e in exs for x in e.labels[: n + 1])
    assert shared_prefix_length(prefixed_examples(system=None)) == 0  # "<|im_start|>user\n" is too short to share
    assert shared_prefix_length(exs[:1]) == 0


def test_shared_prefix_stops_before_a_trained_token() -> None:
    exs = prefixed_examples(4)
    n = shared_prefix_length(exs)
    exs[2].labels[n - 3] = exs[2].input_ids[n - 3]  # pretend a token inside the prefix is trained
    assert shared_prefix_length(exs, minimum=4) == n - 4
    assert shared_prefix_length(exs, minimum=n) == 0


def test_shared_prefix_rows_hold_the_prefix_once_and_every_example_whole() -> None:
    exs = prefixed_examples(24)
    n = shared_prefix_length(exs)
    packed = pack_examples(exs, MAX + 64, seed=0, shared_prefix=n)
    plain = pack_examples(exs, MAX + 64, seed=0)
    assert sum(len(p.input_ids) for p in packed) < sum(len(p.input_ids) for p in plain)
    pieces = Counter()
    for p in packed:
        assert len(p.input_ids) <= MAX + 64 and p.segment_ids[:n] == [0] * n
        assert p.input_ids[:n] == exs[0].input_ids[:n] and p.position_ids[:n] == list(range(n))
        for k in range(1, p.num_examples + 1):
            idx = [i for i, s in enumerate(p.segment_ids) if s == k]
            assert [p.position_ids[i] for i in idx] == list(range(n, n + len(idx)))
            pieces[tuple(p.input_ids[:n] + [p.input_ids[i] for i in idx])] += 1
            assert p.labels[idx[0]] == IGNORE
    assert pieces == Counter(tuple(e.input_ids) for e in exs)
    assert sum(int(x != IGNORE) for p in packed for x in p.labels[1:]) == sum(e.num_trained for e in exs)


def _alone(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


@torch.no_grad()
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prefix_examples_compute_what_they_compute_alone(attn: str) -> None:
    """Every example in a shared-prefix row (batched, with padding) gets its lone logits."""
    from lorakit.train.support import additive_mask, prefix_mask_form

    model = tiny_lm_for(TOK)
    model.config._attn_implementation = attn
    form = prefix_mask_form(model, torch.device("cpu"))
    assert form == ("bool" if attn == "sdpa" else "float")
    exs = prefixed_examples(12)
    n = shared_prefix_length(exs)
    packed = pack_examples(exs, MAX + 64, seed=0, shared_prefix=n)
    batches = make_batches(packed, batch_size=3, pad_id=PAD, seed=0, epoch=0)
    assert max(p.num_examples for p in packed) > 1 and any((b["input_ids"] == PAD).any() for b in batches)
    worst = 0.0
    for batch in batches:
        mask = batch["attention_mask"]
        assert mask.shape == (len(batch["input_ids"]), 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
        mask = mask if form == "bool" else additive_mask(mask, torch.float32)
        logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                       use_cache=False).logits
        for row, item in enumerate(packed_rows(packed, batch)):
            for k in range(1, item.num_examples + 1):
                idx = [i for i, s in enumerate(item.segment_ids) if s == k]
                alone = _alone(model, item.input_ids[:n] + [item.input_ids[i] for i in idx])
                worst = max(worst, float((logits[row, idx] - alone[n:]).abs().max()))
                worst = max(worst, float((logits[row, :n] - alone[:n]).abs().max()))
    assert worst < 1e-5


def packed_rows(packed: list[PackedSequence], batch: dict) -> list[PackedSequence]:
    """The packed sequences a batch holds, found by their token ids."""
    out = []
    for row in batch["input_ids"].tolist():
        out.append(next(p for p in packed if row[: len(p.input_ids)] == p.input_ids))
    return out


def test_shared_prefix_gives_the_gradient_of_the_examples_alone() -> None:
    """Loss sum and every parameter's gradient equal those of the examples run one by one."""
    from lorakit.losses import full_loss_sum

    model = tiny_lm_for(TOK)
    exs = prefixed_examples(6)
    n = shared_prefix_length(exs)
    packed = pack_examples(exs, 10_000, seed=0, shared_prefix=n)
    assert len(packed) == 1 and packed[0].num_examples == 6
    batch = make_batches(packed, 1, PAD, 0, 0, shuffle=False)[0]
    model.zero_grad()
    loss, count = full_loss_sum(model, batch)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    total, total_count = 0.0, 0
    for e in exs:
        one = make_batches([e], 1, PAD, 0, 0, shuffle=False)[0]
        part, c = full_loss_sum(model, one)
        part.backward()
        total, total_count = total + float(part.detach()), total_count + c
    assert count == total_count
    assert abs(float(loss) - total) < 1e-4 * abs(total)
    for k, p in model.named_parameters():
        assert float((grads[k] - p.grad).abs().max()) <= 1e-5 * float(p.grad.abs().max()), k  # fp32 summation order
