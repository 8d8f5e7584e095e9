"""classification.method lm_label: a causal LM answers with the label; the label set constrains the answer.

Each row is asked once per label: the conversation (user turn = the prompt around the text,
assistant turn = the label) is rendered and tokenized exactly as training renders it
(data.templates.render + data.tokenize: the trained tokens are the label and the end-of-turn
token). The label's score is the sum of those tokens' log-probabilities after the prompt, so a
multi-token label counts whole and one label cannot win by being a prefix of another; a softmax
over the label set turns the scores into one probability per label, and every row gets exactly
one label (the argmax).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lorakit.classify.data import TaskSpec
from lorakit.data.formats import Message
from lorakit.data.templates import render
from lorakit.data.tokenize import IGNORE, tokenize_examples
from lorakit.errors import LorakitError


def conversation(spec: TaskSpec, text: str, label: str | None = None) -> list[Message]:
    messages = [{"role": "user", "content": spec.user_text(text)}]
    if label is not None:
        messages.append({"role": "assistant", "content": label})
    return messages


def text_room(spec: TaskSpec, tokenizer: Any) -> int:
    """Tokens left for the text once the prompt and the longest label are in max_length."""
    longest = max(spec.labels, key=lambda label: len(tokenizer(label, add_special_tokens=False)["input_ids"]))
    overhead = len(tokenize_examples([render(conversation(spec, "", longest), spec.template, tokenizer,
                                             spec.system_prompt)], tokenizer, 10**9)[0].input_ids)
    if spec.max_length - overhead < 1:
        raise LorakitError(f"data.max_length {spec.max_length} leaves no room for the text after the prompt and "
                           f"the longest label ({overhead} tokens); raise data.max_length or shorten the prompt")
    return spec.max_length - overhead


def fit_text(text: str, room: int, tokenizer: Any) -> str:
    """`text` cut at a token boundary (the start kept) to at most `room` tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= room else tokenizer.decode(ids[:room])


def label_sequences(spec: TaskSpec, texts: Sequence[str], tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """Per text, per label (row-major): (input_ids, labels) as training tokenizes them."""
    room = text_room(spec, tokenizer)
    rendered = [render(conversation(spec, fit_text(t, room, tokenizer), label), spec.template, tokenizer,
                       spec.system_prompt) for t in texts for label in spec.labels]
    return [(ex.input_ids, ex.labels) for ex in tokenize_examples(rendered, tokenizer, 10**9)]


def sequence_logprobs(model: nn.Module, seqs: Sequence[tuple[list[int], list[int]]], pad_id: int,
                      batch_size: int = 8, progress: Callable[[int], None] | None = None) -> list[float]:
    """Sum of log p(token | earlier tokens) over each sequence's trained positions (labels != -100).

    Batches of similar length, left-padded (positions from the attention mask), logits only for the
    last positions that hold trained tokens (`logits_to_keep`): the vocabulary projection is not
    paid for the prompt.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    out = [0.0] * len(seqs)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        lengths = [len(seqs[i][0]) for i in idx]
        firsts = [next(t for t, lab in enumerate(seqs[i][1]) if lab != IGNORE and t > 0) for i in idx]
        width, keep = max(lengths), max(n - f + 1 for n, f in zip(lengths, firsts))
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - lengths[r]:] = torch.tensor(seqs[i][0])
            mask[r, width - lengths[r]:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                           logits_to_keep=keep).logits.float()  # (B, keep, V)
        logp = torch.log_softmax(logits, dim=-1)
        for r, i in enumerate(idx):
            total = 0.0
            for t, lab in enumerate(seqs[i][1]):
                if t > 0 and lab != IGNORE:
                    total += float(logp[r, keep - lengths[r] + t - 1, lab])
            out[i] = total
        if progress is not None:
            progress(len(idx))
    return out


def _first_trained(labels: list[int]) -> int:
    return next(t for t, lab in enumerate(labels) if lab != IGNORE and t > 0)


def shared_prefix(group: Sequence[tuple[list[int], list[int]]]) -> int:
    """Tokens every sequence of `group` starts with, ending before the last prompt token (whose logits score the
    first label token, so it runs with the labels)."""
    p = min(_first_trained(labels) for _, labels in group) - 1
    first = group[0][0]
    for ids, _ in group[1:]:
        n = 0
        while n < p and ids[n] == first[n]:
            n += 1
        p = n
    return p


def grouped_logprobs(model: nn.Module, groups: Sequence[Sequence[tuple[list[int], list[int]]]], pad_id: int,
                     batch_size: int = 8, progress: Callable[[int], None] | None = None) -> list[list[float]]:
    """sequence_logprobs for groups of K sequences that share a prefix (one row's prompt with each label).

    The prefixes run once, left-padded, into a KV cache that is repeated K times; then each sequence's
    own tokens (the last prompt token, the label, the end of turn) run right-padded on top of it. Equal
    to scoring each sequence alone (tested); for the two labels of the benchmark about half the work.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    k = len(groups[0])
    order = sorted(range(len(groups)), key=lambda i: len(groups[i][0][0]))
    out: list[list[float]] = [[] for _ in groups]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        prefix = [shared_prefix(groups[i]) for i in idx]
        width = max(prefix)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - prefix[r]:] = torch.tensor(groups[i][0][0][: prefix[r]])
            mask[r, width - prefix[r]:] = 1
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids.to(device), attention_mask=mask.to(device), past_key_values=cache, use_cache=True,
                  position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device), logits_to_keep=1)
        cache.batch_repeat_interleave(k)
        rest = [(groups[i][j], prefix[r]) for r, i in enumerate(idx) for j in range(k)]  # (B*K) rows, row-major
        scores = _continue(model, cache, mask.repeat_interleave(k, dim=0), rest, pad_id, device)
        for r, i in enumerate(idx):
            out[i] = scores[r * k : (r + 1) * k]
        if progress is not None:
            progress(len(idx) * k)
    return out


def _continue(model: nn.Module, cache: Any, prefix_mask: torch.Tensor, rest: list[tuple[tuple[list[int], list[int]], int]],
              pad_id: int, device: torch.device) -> list[float]:
    """Each sequence's tokens after its prefix, right-padded on the cache; the summed trained-token log-probs."""
    width = max(len(seq[0]) - p for seq, p in rest)
    ids = torch.full((len(rest), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rest), width), dtype=torch.long)
    positions = torch.zeros((len(rest), width), dtype=torch.long)
    for r, ((seq_ids, _), p) in enumerate(rest):
        n = len(seq_ids) - p
        ids[r, :n], mask[r, :n] = torch.tensor(seq_ids[p:]), 1
        positions[r] = p + torch.arange(width)
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=torch.cat([prefix_mask, mask], 1).to(device),
                       position_ids=positions.to(device), past_key_values=cache).logits.float()  # (B*K, width, V)
    logp = torch.log_softmax(logits, dim=-1)
    return [sum(float(logp[r, t - 1 - p, lab]) for t, lab in enumerate(labels) if t > 0 and lab != IGNORE)
            for r, ((_, labels), p) in enumerate(rest)]


def label_probabilities(model: nn.Module, tokenizer: Any, spec: TaskSpec, texts: Sequence[str], batch_size: int = 8,
                        progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """(N, K) probabilities over spec.labels: softmax of each label's token-sequence log-probability."""
    seqs = label_sequences(spec, texts, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    k = len(spec.labels)
    groups = [seqs[i * k : (i + 1) * k] for i in range(len(texts))]
    if all(shared_prefix(g) > 0 for g in groups):
        scores = [s for row in grouped_logprobs(model, groups, pad, batch_size, progress) for s in row]
    else:
        scores = sequence_logprobs(model, seqs, pad, batch_size, progress)
    return torch.softmax(torch.tensor(scores, dtype=torch.float64).view(len(texts), k), dim=-1)
