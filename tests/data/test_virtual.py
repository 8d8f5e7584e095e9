"""Prompt tuning's virtual tokens in packed rows: each example computes what it computes alone.

The reference for every example is its own unpacked, unpadded run with the virtual tokens
prepended (what PeftModel.forward computes, tested in tests/adapters/test_prompt_tuning.py).
With data.share_prefix the virtual tokens (and the system turn after them) are in a row once;
without it every example carries its own copy.
"""

from __future__ import annotations

import pytest
import torch

from lorakit.adapters.prompt_tuning import inject_prompt_tuning, virtual_token_ids
from lorakit.data import make_batches, pack_examples, render, shared_prefix_length, tokenize_examples
from lorakit.data.tokenize import IGNORE
from lorakit.data.virtual import with_virtual_tokens
from lorakit.losses import full_loss_sum
from lorakit.train.loss import fast_loss_sum
from tests.conftest import tiny_lm_for, tiny_tokenizer

N = 4
SYSTEM = "you answer questions about the world, hello."


def examples(tok):
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in
             [("what is the capital of france?", "paris."), ("hello world", "hello, how are you?"),
              ("the quick brown fox", "jumps over the lazy dog."), ("fox?", "brown.")]]
    rendered = [render(c, "chatml", tok, SYSTEM) for c in convs]
    return with_virtual_tokens(tokenize_examples(rendered, tok, 128), N)


def alone(model, ex) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(logits (T, V), loss sum, trained count) of one example run by itself."""
    batch = make_batches([ex], 1, 0, 0, 0, shuffle=False)[0]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
        loss, n = full_loss_sum(model, batch)
    return logits, loss, n


@pytest.mark.parametrize("share", [True, False])
def test_a_packed_row_computes_what_each_example_computes_alone(share: bool) -> None:
    tok = tiny_tokenizer()
    model = tiny_lm_for(tok)
    torch.manual_seed(0)
    inject_prompt_tuning(model, N)
    exs = examples(tok)
    assert all(ex.input_ids[:N] == virtual_token_ids(N) and ex.labels[: N + 1] == [IGNORE] * (N + 1) for ex in exs)
    prefix = shared_prefix_length(exs) if share else 0
    if share:  # the virtual tokens and the system turn, once per row
        assert prefix > N + 10
    rows = pack_examples(exs, 512, seed=0, shared_prefix=prefix)
    assert len(rows) == 1 and rows[0].num_examples == len(exs)
    row = rows[0]
    assert row.input_ids.count(-1) == (1 if share else len(exs))  # one copy of the virtual tokens, or one each
    batch = make_batches(rows, 1, 0, 0, 0, shuffle=False)[0]
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       position_ids=batch["position_ids"], use_cache=False).logits[0]
        packed_loss, packed_n = full_loss_sum(model, batch)
        fast_loss, fast_n = fast_loss_sum(model, batch)
    starts = [i for i, p in enumerate(row.position_ids) if p == prefix]  # each example's first own token
    assert len(starts) == len(exs)
    total, count = 0.0, 0
    for start in starts:
        ex = next(e for e in exs if row.input_ids[start : start + len(e.input_ids) - prefix] == e.input_ids[prefix:])
        ref, loss, n = alone(model, ex)
        got = packed[start : start + len(ex.input_ids) - prefix]
        assert (got - ref[prefix:]).abs().max().item() <= 1e-5
        total, count = total + float(loss), count + n
    assert packed_n == fast_n == count
    assert abs(float(packed_loss) - total) <= 1e-5 * max(1.0, total)
    assert abs(float(fast_loss) - total) <= 1e-5 * max(1.0, total)


def test_gradients_reach_only_the_virtual_tokens() -> None:
    tok = tiny_tokenizer()
    model = tiny_lm_for(tok)
    layer = inject_prompt_tuning(model, N)
    exs = examples(tok)
    rows = pack_examples(exs, 512, seed=0, shared_prefix=shared_prefix_length(exs))
    loss, _ = full_loss_sum(model, make_batches(rows, 1, 0, 0, 0, shuffle=False)[0])
    loss.backward()
    assert layer.prompt_embeddings.grad is not None and float(layer.prompt_embeddings.grad.abs().sum()) > 0
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.embed_tokens.prompt_embeddings"]
