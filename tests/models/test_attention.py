"""The training attention (grouped K/V heads, one additive mask per forward) computes what transformers' sdpa does."""

from __future__ import annotations

import pytest
import torch

from lorakit.adapters.inject import inject_lora
from lorakit.data.batching import make_batches
from lorakit.data.packing import PackedSequence
from lorakit.models.attention import NAME, gqa_attention
from lorakit.train.support import cpu_bf16_supported
from tests.conftest import tiny_model


def shared_prefix_batch() -> dict[str, torch.Tensor]:
    """Two packed rows with a 5-token shared prefix: (2, 1, T, T) boolean mask, positions continuing after it."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for lengths in ((6, 9, 4), (12, 7)):
        prefix = torch.randint(0, 128, (5,), generator=g).tolist()
        ids, pos, seg = list(prefix), list(range(5)), [0] * 5
        for k, n in enumerate(lengths, 1):
            ids += torch.randint(0, 128, (n,), generator=g).tolist()
            pos += range(5, 5 + n)
            seg += [k] * n
        rows.append(PackedSequence(ids, [-100] + ids[1:], pos, len(lengths), seg))
    return make_batches(rows, 2, 0, 0, 0, shuffle=False)[0]


def forward_backward(model: torch.nn.Module, batch: dict, autocast: bool = False) -> tuple[torch.Tensor, list, int]:
    """Logits, LoRA gradients and the bytes autograd saved (storages once, weights left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.autograd.graph.saved_tensors_hooks(
            pack, lambda t: t):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       position_ids=batch["position_ids"], use_cache=False).logits.float()
    (logits.square().mean()).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return logits.detach(), grads, sum(saved.values())


def adapted() -> torch.nn.Module:
    model = tiny_model("llama")
    inject_lora(model, ["all-linear"], r=4, alpha=8)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would hide any difference in the LoRA path's gradients
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(name)))
    return model.train()


@pytest.mark.parametrize("autocast", [False, True])
def test_same_logits_and_gradients_as_sdpa_with_less_saved(autocast: bool) -> None:
    if autocast and not cpu_bf16_supported():
        pytest.skip("no bf16 on this CPU")
    model, batch = adapted(), shared_prefix_batch()
    assert model.config._attn_implementation == "sdpa"
    want_logits, want_grads, want_bytes = forward_backward(model, batch, autocast)
    undo = gqa_attention(model)
    assert undo is not None and model.config._attn_implementation == NAME
    got_logits, got_grads, got_bytes = forward_backward(model, batch, autocast)
    undo()
    assert model.config._attn_implementation == "sdpa"
    tol = 0 if not autocast else 1e-6
    torch.testing.assert_close(got_logits, want_logits, rtol=tol, atol=tol)
    for got, want in zip(got_grads, want_grads):
        if autocast:  # the kernel sums a K/V head's gradient over its query heads in fp32, repeat_kv's backward in bf16
            assert float((got - want).norm()) <= 1e-2 * float(want.norm()), float((got - want).norm() / want.norm())
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # per layer: K and V at 2 of 4 heads instead of 4, and no mask copy
    b, t = batch["input_ids"].shape
    size = 2 if autocast else 4
    layers = model.config.num_hidden_layers
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    fewer = layers * (2 * b * 2 * t * head_dim * size + (layers - 1) / layers * b * t * t * size)
    assert want_bytes - got_bytes >= 0.99 * fewer, (want_bytes, got_bytes, fewer)


def test_padded_batches_and_generation_unchanged() -> None:
    """No 4D mask of ours: the 2D padding mask and the KV cache still go through transformers' own code."""
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        want_gen = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        undo = gqa_attention(model)
        got = model(input_ids=ids, attention_mask=mask).logits
        got_gen = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        undo()
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1, 3:], want[1, 3:], rtol=1e-6, atol=1e-6)
    assert torch.equal(got_gen, want_gen)


def test_other_attention_implementations_are_left_alone() -> None:
    model = tiny_model("llama")
    model.config._attn_implementation = "eager"
    assert gqa_attention(model) is None
    assert model.config._attn_implementation == "eager"
