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

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.data.templates import TEMPLATES
from lorakit.errors import DataError, LorakitError

GENERAL_PROMPTS = Path(__file__).parent / "prompts" / "general.jsonl"
KIND = "replay"
SOURCE = "self-distilled"


@dataclass
class ReplayOptions:
    model: str | None = None
    adapter: Path | None = None
    prompts: Path = GENERAL_PROMPTS
    out: Path = Path("replay.jsonl")
    system: str | None = None
    config: Path | None = None
    template: str | None = None
    max_new_tokens: int = 128
    limit: int | None = None
    batch_size: int = 32
    dtype: str = "auto"
    force: bool = False
    trust_remote_code: bool = False


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
    """Answer every prompt with the base model (greedy) and write the kept answers as JSONL rows.

    With a rich `console`, a progress bar shows while the answers are generated.
    """
    from lorakit.eval.generate import GenerationSettings, generate_answers
    from lorakit.io import atomic_write_text

    started = time.perf_counter()
    out = Path(opts.out)
    if out.exists() and not opts.force:
        raise LorakitError(f"{out} already exists; choose another --out or pass --force to replace it")
    if opts.system is not None and opts.config is not None:
        raise LorakitError("give --system or --config, not both (--config supplies the run's system prompt)")
    if opts.limit is not None and opts.limit < 1:
        raise LorakitError(f"--limit must be >= 1, got {opts.limit}")
    settings = GenerationSettings(max_new_tokens=opts.max_new_tokens)
    settings.check()
    if opts.batch_size < 1:
        raise LorakitError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.template is not None and opts.template not in ("auto", *TEMPLATES):
        raise LorakitError(f"--template {opts.template!r} is not a template; use auto or one of {', '.join(TEMPLATES)}")
    prompts = read_prompts(opts.prompts)[: opts.limit]
    im = _load_model(opts)
    with progress(console, len(prompts), "replay") as advance:
        answers = generate_answers(im, prompts, settings, opts.batch_size, on_batch=advance)
    rows = [replay_row(p, a.text) for p, a in zip(prompts, answers) if a.text and a.ended]
    empty = sum(not a.text for a in answers)
    cut = sum(bool(a.text) and not a.ended for a in answers)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return ReplayResult(out, len(prompts), len(rows), empty, cut, time.perf_counter() - started, opts.max_new_tokens)


@contextmanager
def progress(console: Any | None, total: int, label: str) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on `console` (advance by n), or nothing without a console."""
    if console is None:
        yield None
        return
    from lorakit.eval.commands import generation_progress

    with generation_progress(console, total, label) as advance:
        yield advance


def _load_model(opts: ReplayOptions):
    """The model to answer with, asked in the run's template and system prompt.

    Precedence: --template / --system, then --config's data section, then what the adapter
    recorded, then the tokenizer's own template and no system prompt.
    """
    from lorakit.eval.generate import load_for_inference

    model, dtype, trust = opts.model, opts.dtype, opts.trust_remote_code
    template, system = opts.template, opts.system
    if opts.config is not None:
        from lorakit.config import load_config

        cfg = load_config(opts.config)
        model = model or cfg.model.name
        dtype = dtype if dtype != "auto" else cfg.model.dtype
        trust = trust or cfg.model.trust_remote_code
        template = template or cfg.data.template
        system = cfg.data.system_prompt
    if model is None and opts.adapter is None:
        raise LorakitError("give --model (or --config, whose model.name is used)")
    im = load_for_inference(model, opts.adapter, dtype, trust_remote_code=trust)
    if template is not None:
        im.template = template
    if opts.config is not None or opts.system is not None:
        im.system_prompt = system
    return im
