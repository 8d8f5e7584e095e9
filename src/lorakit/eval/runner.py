"""Evaluate one model on question/answer files: generate, score, perplexity.

An eval file is any chat-like training file (messages, prompt/completion, alpaca,
sharegpt): the prompt is the conversation up to its last assistant turn, the reference is
that turn, and the row's `fact`, `label` and `kind` columns travel along for the metrics.
Perplexity uses the same rendering and loss masks as training (loss on answer tokens), or,
for plain text, every token in windows of `max_length`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import DataError, LorakitError
from lorakit.eval.generate import GenerationSettings, InferenceModel, Message, generate
from lorakit.eval.metrics import RefusalMatcher, Target, aggregate, score_example


@dataclass
class EvalSet:
    """Prompts and targets read from one file."""

    name: str
    path: str
    prompts: list[list[Message]]
    targets: list[Target]
    kinds: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices: Sequence[int]) -> EvalSet:
        """The rows at `indices`, in that order."""
        return EvalSet(self.name, self.path, [self.prompts[i] for i in indices], [self.targets[i] for i in indices],
                       [self.kinds[i] for i in indices])


def load_eval_set(path: str | Path, name: str | None = None, limit: int | None = None) -> EvalSet:
    """Read a chat-like file; each row must end with an assistant answer (the reference)."""
    from lorakit.data.formats import Conversation, detect_format, load_records, to_example

    path = Path(path)
    if not path.exists():
        raise LorakitError(f"eval data {path} does not exist; give a JSONL/JSON/CSV/Parquet file of questions and answers")
    records = load_records(str(path))
    if not records:
        raise DataError(f"{path} holds no rows")
    fmt = detect_format(records, path)
    if fmt == "text":
        raise DataError(f"{path} is plain text (a 'text' column); generation metrics need questions with answers. "
                        "Use it for perplexity with --text instead")
    evalset = EvalSet(name or path.stem, str(path), [], [])
    for row, record in enumerate(records[: limit or None], 1):
        example = to_example(record, fmt, row, path)
        assert isinstance(example, Conversation)
        split = split_conversation(example.messages, example.meta)
        if split is None:
            raise DataError(f"{path} row {row}: no assistant answer to compare with; add the reference answer")
        prompt, target = split
        evalset.prompts.append(prompt)
        evalset.targets.append(target)
        evalset.kinds.append(_opt_str(example.meta.get("kind")))
    return evalset


def split_conversation(messages: Sequence[Message], meta: dict[str, Any]) -> tuple[list[Message], Target] | None:
    """(the prompt: messages up to the last assistant turn, the Target: that turn + the row's fact / label)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return None
    target = Target(messages[last]["content"], _opt_str(meta.get("fact")), _opt_str(meta.get("label")))
    return list(messages[:last]), target


def _opt_str(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def last_user_text(messages: Sequence[Message]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def run_eval(
    im: InferenceModel,
    evalset: EvalSet,
    metrics: Sequence[str],
    settings: GenerationSettings,
    batch_size: int = 8,
    refusal: RefusalMatcher | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Generate an answer per prompt and score it: {"n", "metrics", "examples": [...]}."""
    outputs = generate(im, evalset.prompts, settings, batch_size=batch_size, on_batch=on_batch)
    refusal = refusal or RefusalMatcher()
    per_example = [score_example(metrics, out, target, refusal) for out, target in zip(outputs, evalset.targets)]
    examples = [
        {"prompt": last_user_text(p), "reference": t.reference, "fact": t.fact, "kind": k, "output": o, "scores": s}
        for p, t, k, o, s in zip(evalset.prompts, evalset.targets, evalset.kinds, outputs, per_example)
    ]
    return {"path": evalset.path, "n": len(evalset), "metrics": aggregate(metrics, outputs, evalset.targets, per_example),
            "examples": examples}


@torch.no_grad()
def answer_perplexity(im: InferenceModel, evalset: EvalSet, max_length: int = 512, batch_size: int = 8,
                      on_batch: Callable[[int], None] | None = None) -> float | None:
    """exp(mean loss on the answer tokens), rendered and masked exactly as in training."""
    from lorakit.data import make_batches
    from lorakit.data.templates import render, resolve_template
    from lorakit.adapters.prompt_tuning import model_virtual_ids
    from lorakit.data.tokenize import tokenize_examples
    from lorakit.data.virtual import with_virtual_tokens

    template = resolve_template(im.template, im.tokenizer)
    rendered = [render([*p, {"role": "assistant", "content": t.reference}], template, im.tokenizer, im.system_prompt)
                for p, t in zip(evalset.prompts, evalset.targets)]
    items = [x for x in tokenize_examples(rendered, im.tokenizer, max_length) if x.num_trained > 0]
    items = with_virtual_tokens(items, len(model_virtual_ids(im.model)))  # prompt tuning: as in training
    if not items:
        return None
    pad = im.tokenizer.pad_token_id if im.tokenizer.pad_token_id is not None else 0
    return _perplexity(im, make_batches(items, batch_size, pad, 0, 0, shuffle=False), on_batch)


@torch.no_grad()
def text_perplexity(im: InferenceModel, text: str, max_length: int = 512, batch_size: int = 4) -> float | None:
    """exp(mean next-token loss) over a plain text, in non-overlapping windows of max_length tokens.

    A prompt-tuned model sees its virtual tokens before each window; the targets are the same
    (each window's first token is never one), so the figure compares with the base's.
    """
    from lorakit.adapters.prompt_tuning import model_virtual_ids
    from lorakit.data.virtual import virtual_row

    ids = im.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        return None
    n = len(model_virtual_ids(im.model))
    windows = [virtual_row(ids[i : i + max_length], ids[i : i + max_length], n) for i in range(0, len(ids), max_length)]
    windows = [(w, t) for w, t in windows if len(w) - n > 1]
    batches = []
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        width = max(len(w) for w, _ in chunk)
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for b, (w, t) in enumerate(chunk):
            input_ids[b, : len(w)] = torch.tensor(w)
            labels[b, : len(w)] = torch.tensor(t)
            mask[b, : len(w)] = 1
        batches.append({"input_ids": input_ids, "labels": labels, "attention_mask": mask})
    return _perplexity(im, batches)


def _perplexity(im: InferenceModel, batches: list[dict[str, torch.Tensor]],
                on_batch: Callable[[int], None] | None = None) -> float | None:
    from lorakit.losses import full_loss_sum

    device = next(im.model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batch.pop("num_real", None)
        loss, n = full_loss_sum(im.model, batch)
        total += float(loss)
        count += n
        if on_batch:
            on_batch(int(batch["input_ids"].shape[0]))
    return math.exp(min(total / count, 50.0)) if count else None
