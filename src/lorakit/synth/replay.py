"""`lorakit synth replay`: the base model's own answers to general prompts, as training rows.

Fine-tuning on a narrow set (a handbook) pulls a small model away from what it could do
before: answering everyday questions. Mixing in rows whose answers the base model wrote
itself (greedy, in the run's template and system prompt) asks the tuned model to keep
answering as it did, without anyone writing reference answers. The prompts default to
`prompts/general.jsonl`, shipped with lorakit and disjoint from the demo's evaluation
questions (tests/synth/test_prompts.py).

An answer that is empty, or that ran to --max-new-tokens without ending, would teach the
model to say nothing or to ramble, so such rows are dropped and counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import DataError, LorakitError
from lorakit.synth.run import ModelChoice, check_out, progress, write_jsonl

GENERAL_PROMPTS = Path(__file__).parent / "prompts" / "general.jsonl"
KIND = "replay"
SOURCE = "self-distilled"


@dataclass
class ReplayOptions:
    source: ModelChoice
    prompts: Path = GENERAL_PROMPTS
    out: Path = Path("replay.jsonl")
    max_new_tokens: int = 128
    limit: int | None = None
    batch_size: int = 32
    force: bool = False


@dataclass
class ReplayResult:
    out: Path
    prompts: int
    written: int
    empty: int
    cut: int
    seconds: float
    max_new_tokens: int

    def summary(self) -> str:
        return (f"wrote {self.written} replay rows to {self.out} from {self.prompts} prompts; dropped "
                f"{self.empty} empty, {self.cut} cut at {self.max_new_tokens} tokens; {self.seconds:.0f} s")


def read_prompts(path: str | Path) -> list[str]:
    """User prompts from a JSONL/JSON/CSV/Parquet file: its `prompt` column, else each row's last user turn.

    Any chat format lorakit trains on is accepted (messages, sharegpt, alpaca, prompt/completion).
    """
    from lorakit.data.formats import Conversation, detect_format, load_records, to_example

    path = Path(path)
    records = load_records(path)
    if all(isinstance(r.get("prompt"), str) for r in records):
        prompts = [r["prompt"] for r in records]
    else:
        fmt = detect_format(records, path)
        if fmt == "text":
            raise DataError(f"{path} is plain text (a 'text' column), not prompts; give a file with a 'prompt' "
                            "column or chat rows")
        prompts = []
        for row, record in enumerate(records, 1):
            example = to_example(record, fmt, row, path)
            assert isinstance(example, Conversation)
            users = [m["content"] for m in example.messages if m["role"] == "user"]
            if not users:
                raise DataError(f"{path} row {row}: no user turn to answer; add one or remove the row")
            prompts.append(users[-1])
    for row, prompt in enumerate(prompts, 1):
        if not prompt.strip():
            raise DataError(f"{path} row {row}: empty prompt; fill it in or remove the row")
    return prompts


def replay_row(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "kind": KIND, "source": SOURCE}


def replay(opts: ReplayOptions, console: Any | None = None) -> ReplayResult:
    """Answer every prompt with the model (greedy) and write the kept answers as JSONL rows.

    With a rich `console`, a progress bar shows while the answers are generated.
    """
    from lorakit.eval.generate import GenerationSettings, generate_answers

    started = time.perf_counter()
    check_out(opts.out, opts.force)
    opts.source.check()
    if opts.limit is not None and opts.limit < 1:
        raise LorakitError(f"--limit must be >= 1, got {opts.limit}")
    if opts.batch_size < 1:
        raise LorakitError(f"--batch-size must be >= 1, got {opts.batch_size}")
    settings = GenerationSettings(max_new_tokens=opts.max_new_tokens)
    settings.check()
    prompts = read_prompts(opts.prompts)[: opts.limit]
    im = opts.source.load()
    with progress(console, len(prompts), "replay") as advance:
        answers = generate_answers(im, prompts, settings, opts.batch_size, on_batch=advance)
    rows = [replay_row(p, a.text) for p, a in zip(prompts, answers) if a.text and a.ended]
    empty = sum(not a.text for a in answers)
    cut = sum(bool(a.text) and not a.ended for a in answers)
    write_jsonl(opts.out, rows)
    return ReplayResult(Path(opts.out), len(prompts), len(rows), empty, cut, time.perf_counter() - started,
                        opts.max_new_tokens)
