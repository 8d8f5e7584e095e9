"""`lorakit synth qa`: training, held-out and unanswerable question sets from the user's own documents.

documents -> token windows -> a teacher asked twice per window (fact questions with other
wordings and reversed questions; unanswerable questions), JSON replies parsed, malformed ones
asked once more -> filters (each rejection counted by reason) -> splits with the n-gram guard
-> train.jsonl, heldout.jsonl, unanswerable.jsonl in lorakit's messages format, and
synth_report.json / .html. Every teacher call is cached in the output folder (teacher.py), so an
interrupted run resumes where it stopped and a rerun with the same inputs writes the same files.

The output folder is lorakit's: it must be new, empty, or hold only what an earlier
`synth qa` wrote there; anything else in it is a one-line error before any work starts.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.synth.teacher import CACHE_DIR, CallStats, Reply, Teacher, TeacherCache, ask

OUTPUTS = ("train.jsonl", "heldout.jsonl", "unanswerable.jsonl", "synth_report.json", "synth_report.html")


@dataclass
class QAOptions:
    docs: list[Path]
    out: Path
    teacher: str | None = None
    """A lorakit model (alias, directory, .gguf, hub id) run locally."""
    teacher_adapter: Path | None = None
    teacher_url: str | None = None
    """An OpenAI-compatible endpoint (…/v1) instead of a local model."""
    teacher_model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    config: Path | None = None
    """A YAML config whose `synth:` section is used (with `overrides` on top)."""
    overrides: list[str] = field(default_factory=list)
    limit: int | None = None
    """Only the first N windows (a quick look at what the teacher writes)."""
    dtype: str = "auto"
    trust_remote_code: bool = False


@dataclass
class QAResult:
    out: Path
    report: dict[str, Any]

    def summary(self) -> str:
        r = self.report
        files = ", ".join(f"{n} {k}" for k, n in r["files"].items())
        rejected = ", ".join(f"{n} {k}" for k, n in r["rejected"].items() if n) or "none"
        return (f"wrote {files} rows to {self.out} from {r['windows']} windows of {r['documents']} documents; "
                f"{r['calls']['total']} teacher calls ({r['calls']['cached']} from cache, {r['calls']['malformed']} "
                f"malformed, {r['calls']['failed']} failed); kept {r['kept']} of {r['candidates']} candidates, "
                f"rejected: {rejected}; {r['seconds']:.0f} s")


def check_out_folder(out: Path) -> None:
    """--out must be new, empty, or hold only an earlier `synth qa`'s files (then it resumes)."""
    if out.exists() and not out.is_dir():
        raise LorakitError(f"--out {out} is a file; give a folder (new, empty, or an earlier synth qa output)")
    if out.is_dir():
        ours = set(OUTPUTS) | {CACHE_DIR}
        names = [p.name for p in out.iterdir()]
        other = sorted(n for n in names if n not in ours and not any(n.startswith(f".{o}.") for o in ours))
        if other:
            shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
            raise LorakitError(f"--out {out} holds files synth qa did not write ({shown}); give a new or empty "
                               "folder so nothing of yours is overwritten")
        if names and CACHE_DIR not in names and "synth_report.json" not in names:
            # only output names, but no trace of a synth qa run: a user's own train.jsonl is not overwritten
            raise LorakitError(f"--out {out} holds {', '.join(sorted(names))} but no synth_report.json or {CACHE_DIR}/ "
                               "of an earlier synth qa run; give a new or empty folder so nothing of yours is "
                               "overwritten")


def make_teacher(opts: QAOptions, cfg: Any) -> Teacher:
    from lorakit.synth.teacher import EndpointTeacher, LocalTeacher, api_key

    if opts.teacher_url:
        if opts.teacher or opts.teacher_adapter:
            raise LorakitError("give --teacher (a local model) or --teacher-url (an endpoint), not both")
        if not opts.teacher_model:
            raise LorakitError("--teacher-url needs --teacher-model NAME (the model the endpoint serves)")
        if opts.api_key_env != "OPENAI_API_KEY" and not os.environ.get(opts.api_key_env):
            raise LorakitError(f"--api-key-env {opts.api_key_env}: that environment variable is not set; export it "
                               "with the endpoint's key")
        return EndpointTeacher(opts.teacher_url, opts.teacher_model, api_key(opts.api_key_env), cfg.max_new_tokens,
                               cfg.temperature, cfg.seed, cfg.concurrency, cfg.timeout_s, cfg.retries, cfg.backoff_s)
    if not opts.teacher and not opts.teacher_adapter:
        raise LorakitError("give a teacher: --teacher MODEL (a lorakit model) or --teacher-url URL "
                           "--teacher-model NAME")
    from lorakit.synth.run import ModelChoice

    source = ModelChoice(opts.teacher, opts.teacher_adapter, dtype=opts.dtype, trust_remote_code=opts.trust_remote_code)
    return LocalTeacher(source, cfg.max_new_tokens, cfg.temperature, cfg.seed, cfg.batch_size)


def synth_qa(opts: QAOptions, console: Any | None = None) -> QAResult:
    from lorakit.config import load_config
    from lorakit.io import remove_stale_temps
    from lorakit.synth.documents import find_documents, read_documents, windows
    from lorakit.synth.pairs import facts_prompt, unanswerable_prompt

    started = time.perf_counter()
    cfg = load_config(opts.config, opts.overrides).synth
    out = Path(opts.out)
    check_out_folder(out)
    if opts.limit is not None and opts.limit < 1:
        raise LorakitError(f"--limit must be >= 1, got {opts.limit}")
    files, skipped = find_documents(opts.docs, out)
    docs = read_documents(files, cfg.text_column)
    teacher = make_teacher(opts, cfg)
    wins = windows(docs, cfg.window_tokens, cfg.overlap_tokens, teacher.count_tokens)[: opts.limit]
    if choose_strategy(cfg.strategy, teacher) == "answer_first":
        return _answer_first(opts, cfg, out, docs, wins, skipped, teacher, console, started)
    asks: list[tuple[int, str, str]] = []  # (window, what, prompt)
    for w in wins:
        if cfg.facts_per_window:
            asks.append((w.index, "facts", facts_prompt(w.text, cfg.facts_per_window, cfg.paraphrases)))
        if cfg.unanswerable_per_window:
            asks.append((w.index, "unanswerable", unanswerable_prompt(w.text, cfg.unanswerable_per_window)))
    _check_context(teacher, [a[2] for a in asks], cfg)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    cache = TeacherCache(out / CACHE_DIR, teacher.identity)
    stats = CallStats()
    with _progress(console, len(asks)) as progress:
        replies = ask(teacher, cache, [a[2] for a in asks], stats, progress)
        data, malformed = _parse_with_retry(teacher, cache, asks, replies, stats, progress)
    cands, incomplete = _candidates(asks, data, cfg.refusal)
    return _finish(opts, cfg, out, docs, wins, skipped, cands, incomplete, malformed, stats, started)


def choose_strategy(strategy: str, teacher: Teacher) -> str:
    """synth.strategy, with auto resolved: answer_first for a local teacher under 1B parameters, else json."""
    from lorakit.synth.answer_first import SMALL_TEACHER

    if strategy != "auto":
        return strategy
    small = teacher.parameters is not None and teacher.parameters < SMALL_TEACHER
    return "answer_first" if small else "json"


def _answer_first(opts: QAOptions, cfg: Any, out: Path, docs: list[Any], wins: list[Any], skipped: list[Path],
                  teacher: Teacher, console: Any | None, started: float) -> QAResult:
    from lorakit.io import remove_stale_temps
    from lorakit.synth.answer_first import AnswerFirst, question_prompt

    if teacher.context is not None:  # the longest sentence's question prompt plus its reply
        from lorakit.synth.spans import sentences

        longest = max((s for w in wins for s in sentences(w.text)), key=len, default="")
        need = teacher.prompt_tokens(question_prompt(longest, longest)) + cfg.question_tokens
        if need > teacher.context:
            raise LorakitError(f"a sentence's question prompt plus synth.question_tokens ({cfg.question_tokens}) is "
                               f"{need} tokens, over the teacher's context of {teacher.context}; use a teacher with a "
                               "longer context or lower synth.question_tokens")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    cache, stats = TeacherCache(out / CACHE_DIR, teacher.identity), CallStats()
    with _progress(console, 0) as progress:
        run = AnswerFirst(teacher, cache, stats, cfg, progress.grow if progress else None, progress)
        cands = run.run(wins, [d.text for d in docs])
    return _finish(opts, cfg, out, docs, wins, skipped, cands, 0, 0, stats, started, run)


def _check_context(teacher: Teacher, prompts: list[str], cfg: Any) -> None:
    """A prompt (window included) plus the reply must fit the local teacher's context."""
    if teacher.context is None or not prompts:
        return
    from lorakit.synth.pairs import RETRY_NOTE, facts_prompt

    fixed = teacher.prompt_tokens(facts_prompt("", cfg.facts_per_window, cfg.paraphrases)) + cfg.max_new_tokens
    if fixed > teacher.context:
        raise LorakitError(f"the teacher's context of {teacher.context} tokens cannot hold the instructions and "
                           f"synth.max_new_tokens ({cfg.max_new_tokens}) even without a window ({fixed} tokens); use a "
                           "teacher with a longer context, or lower synth.max_new_tokens")
    need = max(teacher.prompt_tokens(p + RETRY_NOTE) for p in prompts) + cfg.max_new_tokens  # as asked again
    if need > teacher.context:
        raise LorakitError(f"a window's prompt plus synth.max_new_tokens ({cfg.max_new_tokens}) is {need} tokens, over "
                           f"the teacher's context of {teacher.context}; lower synth.window_tokens "
                           f"({cfg.window_tokens}) or synth.max_new_tokens")


def _parse_with_retry(teacher: Teacher, cache: TeacherCache, asks: list[tuple[int, str, str]], replies: list[Reply],
                      stats: CallStats, progress: _Bar | None) -> tuple[list[Any], int]:
    """Each reply's JSON; a reply without any is asked once more with a reminder, then read as plain text
    ("Question: ... Answer: ..."), then counted as malformed."""
    from lorakit.synth.pairs import RETRY_NOTE, parse_json, parse_text

    data = [parse_json(r.text) if r.error is None else None for r in replies]
    again = [i for i, (d, r) in enumerate(zip(data, replies)) if d is None and r.error is None]
    if again:
        if progress is not None:
            progress.grow(len(again))
        second = ask(teacher, cache, [asks[i][2] + RETRY_NOTE for i in again], stats, progress)
        for i, r in zip(again, second):
            data[i] = parse_json(r.text) if r.error is None else None
        for i, r in zip(again, second):  # no JSON twice: the same content written as plain text
            if data[i] is None:
                data[i] = parse_text(r.text, asks[i][1]) or parse_text(replies[i].text, asks[i][1])
                stats.from_text += data[i] is not None
    stats.retried += len(again)
    malformed = sum(1 for i in again if data[i] is None)
    return data, malformed


def _candidates(asks: list[tuple[int, str, str]], data: list[Any], refusal: str) -> tuple[list[Any], int]:
    from lorakit.synth.pairs import fact_candidates, unanswerable_candidates

    cands, incomplete, group = [], 0, 0
    for (window, what, _), d in zip(asks, data):
        if d is None:
            continue
        if what == "facts":
            found, bad = fact_candidates(d, window, group, refusal)
            incomplete += bad
        else:
            found = unanswerable_candidates(d, window, group, refusal)
        cands += found
        group += len({c.group for c in found})
    return cands, incomplete


def _finish(opts: QAOptions, cfg: Any, out: Path, docs: list[Any], wins: list[Any], skipped: list[Path],
            cands: list[Any], incomplete: int, malformed: int, stats: CallStats, started: float,
            answer_first: Any | None = None) -> QAResult:
    from lorakit.synth.filters import filter_candidates
    from lorakit.synth.report import samples, write_report
    from lorakit.synth.run import write_jsonl
    from lorakit.synth.splits import row, split

    window_text = {w.index: w.text for w in wins}
    kept, rejected, rejected_rows = filter_candidates(cands, window_text, [d.text for d in docs], cfg)
    if answer_first is not None:  # the strategy's own rejections first, in the order they happen
        rejected = Counter({k: answer_first.rejected[k] + rejected[k]
                            for k in dict.fromkeys([*answer_first.rejected, *rejected])})
    parts = split(kept, cfg.heldout_fraction, cfg.unanswerable_fraction, cfg.ngram_guard, cfg.seed)
    source = {w.index: w.source for w in wins}
    rows = {name: [row(c, source[c.window]) for c in getattr(parts, name)]
            for name in ("train", "heldout", "unanswerable")}
    by_kind: dict[str, list[dict]] = {}
    for r in rows["train"] + rows["heldout"] + rows["unanswerable"]:
        by_kind.setdefault(r.get("variant", r["kind"]) if r["kind"] == "fact" else r["kind"], []).append(r)
    teacher = f"{opts.teacher_model} at {opts.teacher_url}" if opts.teacher_url else \
        f"{opts.teacher or ''}{' + ' + str(opts.teacher_adapter) if opts.teacher_adapter else ''}".strip(" +")
    report = {
        "teacher": teacher,
        "strategy": "json" if answer_first is None else "answer_first",
        "documents": len(docs),
        "skipped_files": [str(p) for p in skipped],
        "windows": len(wins),
        "calls": {"total": stats.calls, "cached": stats.cached, "failed": stats.failed, "retried": stats.retried,
                  "read_from_text": stats.from_text, "malformed": malformed,
                  "incomplete_items": incomplete, "teacher_seconds": round(stats.seconds, 1)},
        "tokens": {"prompt": stats.prompt_tokens, "completion": stats.completion_tokens},
        "seconds": round(time.perf_counter() - started, 1),
        "candidates": len(cands),
        "kept": len(kept),
        "rejected": dict(rejected),
        "moved_by_ngram_guard": parts.moved,
        "files": {name: len(r) for name, r in rows.items()},
        "kept_by_kind": dict(Counter({k: len(v) for k, v in by_kind.items()})),
        "settings": asdict(cfg),
        **({} if answer_first is None else {"answer_first": {"sentence_answers": answer_first.items,
                                                             "calls_by_stage": dict(answer_first.calls)}}),
        "samples": {k: samples(v, cfg.seed) for k, v in by_kind.items()},
        "rejected_samples": [{"reason": why, "question": c.question, "answer": c.answer, "fact": c.fact}
                             for c, why in samples(rejected_rows, cfg.seed)],
    }
    write_report(out, report)
    if not kept:
        earlier = [n for n in rows if (out / f"{n}.jsonl").exists()]
        left = f"; {', '.join(f'{n}.jsonl' for n in earlier)} of an earlier run left as they were" if earlier else ""
        raise LorakitError(f"the teacher's replies gave no usable rows ({stats.calls} calls, {malformed} malformed, "
                           f"{len(cands)} candidates all rejected); see {out / 'synth_report.html'}; a larger "
                           f"teacher (--teacher-url) or smaller synth.window_tokens may help{left}")
    for name, r in rows.items():
        write_jsonl(out / f"{name}.jsonl", r)
    return QAResult(out, report)


class _Bar:
    """Advances a rich progress bar by one reply, counting the question/answer items parsed so far."""

    def __init__(self, bar: Any, task: Any) -> None:
        self.bar, self.task, self.pairs = bar, task, 0

    def __call__(self, reply: Reply) -> None:
        from lorakit.synth.pairs import parse_json

        d = parse_json(reply.text) if reply.error is None else None
        items = d.get("facts", d.get("questions")) if isinstance(d, dict) else d
        self.pairs += len(items) if isinstance(items, list) else 0
        self.bar.update(self.task, advance=1, pairs=self.pairs)

    def grow(self, n: int) -> None:
        """n more calls than planned (replies asked again)."""
        self.bar.update(self.task, total=(self.bar.tasks[0].total or 0) + n)


@contextmanager
def _progress(console: Any | None, total: int) -> Iterator[_Bar | None]:
    """A bar with teacher calls done, the question/answer items parsed so far, and the time left."""
    if console is None:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("teacher calls", style="bold"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[pairs]} pairs"), TimeRemainingColumn(), console=console,
                  transient=True) as bar:
        yield _Bar(bar, bar.add_task("synth qa", total=total, pairs=0))
