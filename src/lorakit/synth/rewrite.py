"""`lorakit synth rewrite`: training answers restated by the model itself (SDFT).

Self-Distillation Fine-Tuning (Yang et al., ACL 2024, "Self-Distillation Bridges Distribution
Gap in Language Model Fine-Tuning") shows that much of the forgetting in fine-tuning comes from
training on answers written unlike anything the model would say. It asks the seed model to
rewrite each reference answer in its own words, given the task and the reference, and trains on
the rewrite. The rewrite keeps the content and moves the wording toward the model's own
distribution, so fewer weights have to move.

A rewrite is only useful if it still says the fact, so it is kept when the row's fact string
occurs in it (`fact_match`, the demo's metric) and it does not refuse where the original did
not; otherwise the original answer stays. Rows of kind refusal or replay (their wording is the
point, or is the model's already) and rows without a fact are copied unchanged.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import DataError, LorakitError
from lorakit.synth.run import ModelChoice, check_out, progress, write_jsonl

# After the SDFT paper's template (its appendix: "Below are an instruction that describes a task
# along with a reference answer. Using the reference answer as a guide, write your own response.").
REWRITE_PROMPT = (
    "Below is a question and a reference answer. Rewrite the answer in your own words. Keep every name, "
    "number and fact of the reference answer, answer the question directly, and add nothing the reference "
    "does not say.\n\nQuestion: {question}\n\nReference answer: {answer}"
)
COPY_KINDS = ("refusal", "replay")
# A label the model sometimes puts before its rewrite ("The answer to this question is: ..."), seen with
# SmolLM2-135M-Instruct; cut before the rewrite is judged.
LEAD_IN = re.compile(r"^\s*(?:here is |here's )?(?:the |my )?(?:rewritten |reference |new )?(?:answer|response|rewrite)"
                     r"(?: to (?:this|the) question)?(?: is)?\s*:\s*", re.IGNORECASE)


@dataclass
class RewriteOptions:
    source: ModelChoice
    data: Path
    out: Path
    fact_column: str = "fact"
    refusals: list[str] = field(default_factory=list)
    max_new_tokens: int = 128
    batch_size: int = 32
    force: bool = False


@dataclass
class RewriteResult:
    out: Path
    rows: int
    kept: int
    """Rows whose answer is now the model's rewrite."""
    fact_lost: int
    refused: int
    """Rewrites that refused where the original answered."""
    unfinished: int
    """Rewrites that were empty or ran to max_new_tokens."""
    same: int
    """Kept rewrites with the original's words (after normalisation): the model copied the reference."""
    copied: int
    """Rows not sent to the model: kind refusal / replay, or no fact."""
    seconds: float

    @property
    def rejected(self) -> int:
        return self.fact_lost + self.refused + self.unfinished

    def summary(self) -> str:
        return (f"wrote {self.rows} rows to {self.out}: {self.kept} rewritten and kept ({self.same} in the original's "
                f"words), {self.rejected} rewrites "
                f"rejected ({self.fact_lost} fact lost, {self.refused} refused, {self.unfinished} empty or cut), "
                f"{self.copied} copied unchanged (refusal or replay kind, or no fact); {self.seconds:.0f} s")


def clean_rewrite(text: str) -> str:
    """The rewrite without a leading "The answer is:"-style label."""
    return LEAD_IN.sub("", text, count=1).strip()


def judge_rewrite(original: str, rewrite: str, fact: str, refusal: Any, ended: bool = True) -> str:
    """Why a rewrite is rejected ("fact lost", "refused", "unfinished"), or "kept".

    `refusal` is a RefusalMatcher (answer -> 1.0 when it refuses).
    """
    from lorakit.eval.metrics import fact_match

    if not rewrite.strip() or not ended:
        return "unfinished"
    if not fact_match(rewrite, fact):
        return "fact lost"
    if refusal(rewrite) and not refusal(original):
        return "refused"
    return "kept"


@dataclass
class _Row:
    record: dict[str, Any]
    fmt: str
    question: str | None = None
    answer: str | None = None
    fact: str | None = None
    verdict: str | None = None
    """judge_rewrite's word, on rows sent to the model."""
    same: bool = False


def rewrite(opts: RewriteOptions, console: Any | None = None) -> RewriteResult:
    """Rewrite the answers of `opts.data` with the model (greedy) and write every row to `opts.out`."""
    from lorakit.eval.generate import GenerationSettings, generate_answers
    from lorakit.eval.metrics import RefusalMatcher, normalize_answer

    started = time.perf_counter()
    check_out(opts.out, opts.force)
    opts.source.check()
    if opts.batch_size < 1:
        raise LorakitError(f"--batch-size must be >= 1, got {opts.batch_size}")
    settings = GenerationSettings(max_new_tokens=opts.max_new_tokens)
    settings.check()
    refusal = RefusalMatcher(opts.refusals) if opts.refusals else RefusalMatcher()
    rows = read_rows(opts.data, opts.fact_column)
    todo = [r for r in rows if r.fact is not None]
    if todo:
        im = opts.source.load()
        prompts = [REWRITE_PROMPT.format(question=r.question, answer=r.answer) for r in todo]
        with progress(console, len(prompts), "rewrite") as advance:
            answers = generate_answers(im, prompts, settings, opts.batch_size, on_batch=advance)
        for r, a in zip(todo, answers):
            text = clean_rewrite(a.text)
            r.verdict = judge_rewrite(r.answer or "", text, r.fact or "", refusal, a.ended)
            if r.verdict == "kept":
                r.record = with_answer(r.record, r.fmt, text)
                r.same = normalize_answer(text) == normalize_answer(r.answer or "")
    write_jsonl(opts.out, [{**r.record, "rewritten": r.verdict == "kept"} for r in rows])
    counts = [sum(r.verdict == k for r in todo) for k in ("kept", "fact lost", "refused", "unfinished")]
    return RewriteResult(Path(opts.out), len(rows), *counts, sum(r.same for r in todo), len(rows) - len(todo),
                         time.perf_counter() - started)


def read_rows(path: Path, fact_column: str) -> list[_Row]:
    """Every row of a chat-format training file; question, answer and fact set on the rows to rewrite."""
    from lorakit.data.formats import Conversation, detect_format, load_records, to_example

    records = load_records(path)
    fmt = detect_format(records, path)
    if fmt == "text":
        raise DataError(f"{path} is plain text (a 'text' column); rewriting needs questions with answers")
    if not any(fact_column in r for r in records):
        raise DataError(f"{path} has no {fact_column!r} column, so no rewrite could be checked; "
                        "give --fact-column NAME (the column holding each answer's key fact)")
    rows = []
    for i, record in enumerate(records, 1):
        example = to_example(record, fmt, i, path)
        assert isinstance(example, Conversation)
        row = _Row(dict(record), fmt)
        fact, kind = record.get(fact_column), record.get("kind")
        users = [m["content"] for m in example.messages if m["role"] == "user"]
        if isinstance(fact, str) and fact.strip() and kind not in COPY_KINDS and users \
                and example.messages[-1]["role"] == "assistant":
            row.question, row.answer, row.fact = users[-1], example.messages[-1]["content"], fact
        rows.append(row)
    return rows


def with_answer(record: dict[str, Any], fmt: str, answer: str) -> dict[str, Any]:
    """`record` with its final assistant answer replaced, in the row's own format."""
    record = dict(record)
    if fmt == "alpaca":
        record["output"] = answer
    elif fmt == "prompt_completion" and isinstance(record["completion"], str):
        record["completion"] = answer
    else:
        column, key = {"messages": ("messages", "content"), "sharegpt": ("conversations", "value"),
                       "prompt_completion": ("completion", "content")}[fmt]
        value = record[column]
        turns = [dict(t) for t in (json.loads(value) if isinstance(value, str) else value)]  # CSV: a JSON string
        turns[-1][key] = answer
        record[column] = turns
    return record
