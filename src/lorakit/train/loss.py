"""Causal-LM loss on trained tokens only, without full-vocabulary logits.

`model(input_ids).logits` materializes (B, T, V) logits: for SmolLM2 (V = 49,152) at 4 x 512
tokens that is 400 MB in fp32, plus as much again for its gradient, though only the answer
tokens carry loss. We run the decoder, keep the hidden states at positions whose *next*
token is trained, and apply the output head to those rows in chunks, each under activation
checkpointing, so at most one (chunk, V) block of logits exists at a time.

Models whose head is not a plain `lm_head(hidden)` (logit soft-capping, scaling) would get a
wrong loss this way, so `check_fast_loss` compares both paths on a probe batch once at the
start of training and falls back to the full logits (lorakit.losses.full_loss_sum) when they
disagree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorakit.data.tokenize import IGNORE
from lorakit.losses import full_loss_sum

CHUNK = 1024  # at most this many rows of hidden states per head application
LOGIT_ELEMENTS = 1 << 23  # ... and at most about this many logits per chunk (32 MiB in fp32)


def chunk_rows(head: nn.Module) -> int:
    """Rows per head application: the chunk's logits, their log-softmax and its gradient exist at once in
    backward, at the start of backward when every activation is still kept, so the chunk adds to the
    peak: 1024 rows of SmolLM2's 49,152 logits were 3 x 200 MB; 160 rows are 3 x 31 MB, and a
    (160, 576) x (576, 49152) matmul is still large enough to run at full speed."""
    vocab = getattr(head, "out_features", None)
    if vocab is None and isinstance(getattr(head, "weight", None), torch.Tensor):
        vocab = head.weight.shape[0]
    if not vocab:
        return CHUNK
    return max(16, min(CHUNK, (LOGIT_ELEMENTS // vocab) // 16 * 16))


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The transformer body and output head of a HF causal LM, if it has the usual shape."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "base_model", None)
    if head is None or body is None or body is model:
        return None
    return body, head


def _head_ce_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (chunk, V)
    return F.cross_entropy(logits, targets, reduction="sum")


def body_hidden(body: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The decoder's last hidden states (B, T, H) for the batch."""
    out = body(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
    )
    return out[0] if isinstance(out, tuple) else out.last_hidden_state  # (B, T, H)


def selected_hidden(body: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states (N, H) at positions predicting a trained token, and those targets (N,)."""
    return trained_rows(body_hidden(body, batch), batch)


def trained_rows(hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`hidden` (B, T, H) at positions predicting a trained token (N, H), and those targets (N,)."""
    targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE
    return hidden[:, :-1][keep], targets[keep]


class _FrozenHeadCE(torch.autograd.Function):
    """The chunked loss over a frozen head, its gradient computed chunk by chunk in the forward.

    With the head frozen (LoRA and its kin: tied embeddings, or an untrained lm_head), backward
    needs from the head only d loss / d hidden, an (N, hidden) tensor. The checkpointed path
    computes each chunk's logits twice (forward, then again in backward); this one computes
    them once: in the forward, each chunk's loss and, by autograd on that chunk alone, its
    gradient, kept for backward, which scales it by the incoming gradient. The loss is the same
    bits; the gradient is the same math with the loss scale applied last instead of first
    (fp32 rounding). On SmolLM2 at 4 x 512 tokens, one head matmul less per trained token
    (~0.4 s of a 8.7 s fp32 CPU step).
    """

    @staticmethod
    def forward(ctx, hidden, head, targets, rows):  # type: ignore[override]
        total = hidden.new_zeros((), dtype=torch.float32)
        grads = torch.empty_like(hidden)
        for start in range(0, int(targets.numel()), rows):
            h = hidden[start : start + rows].detach().requires_grad_(True)
            with torch.enable_grad():
                part = _head_ce_sum(head, h, targets[start : start + rows])
                (grads[start : start + rows],) = torch.autograd.grad(part, h)
            total = total + part.detach()
        ctx.save_for_backward(grads)
        return total

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (grads,) = ctx.saved_tensors
        return grads * grad.to(grads.dtype), None, None, None


def _frozen(head: nn.Module) -> bool:
    return not any(p.requires_grad for p in head.parameters())


def head_ce_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over rows of `hidden` (N, H), the head applied chunk_rows(head) rows at a time."""
    rows = chunk_rows(head)
    if torch.is_grad_enabled() and hidden.requires_grad and _frozen(head):
        return _FrozenHeadCE.apply(hidden, head, targets, rows)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, int(targets.numel()), rows):
        h, t = hidden[start : start + rows], targets[start : start + rows]
        if torch.is_grad_enabled():
            total = total + checkpoint(_head_ce_sum, head, h, t, use_reentrant=False)
        else:
            total = total + _head_ce_sum(head, h, t)
    return total


def fast_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of token cross-entropies over trained targets, and their count."""
    parts = decoder_and_head(model)
    assert parts is not None
    body, head = parts
    hidden, targets = selected_hidden(body, batch)
    n = int(targets.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0
    return head_ce_sum(head, hidden, targets), n


@torch.no_grad()
def check_fast_loss(model: nn.Module, batch: dict[str, torch.Tensor], rtol: float = 1e-3) -> bool:
    """True when the chunked loss equals the model's own logits' loss on `batch`."""
    if decoder_and_head(model) is None:
        return False
    try:
        fast, n_fast = fast_loss_sum(model, batch)
    except (TypeError, ValueError, AttributeError):
        return False
    full, n_full = full_loss_sum(model, batch)
    if n_fast != n_full or n_full == 0:
        return n_fast == n_full
    return bool(torch.isclose(fast, full, rtol=rtol, atol=1e-4 * n_full))
