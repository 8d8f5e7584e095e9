"""synth_report.json and synth_report.html: what `lorakit synth qa` asked, kept and rejected, and why.

The HTML page is self-contained (inline CSS, a content-security policy that loads nothing) and
every value in it is escaped.
"""

from __future__ import annotations

import html
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SAMPLES = 20


def samples(rows: Sequence[dict], seed: int, n: int = SAMPLES) -> list[dict]:
    """Up to n rows, chosen with `seed`, in file order."""
    if len(rows) <= n:
        return list(rows)
    picked = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in picked]


def write_report(folder: Path, report: dict[str, Any]) -> None:
    from lorakit.io import atomic_write_text

    atomic_write_text(folder / "synth_report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(folder / "synth_report.html", render(report))


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def render(report: dict[str, Any]) -> str:
    calls, tokens, files = report["calls"], report["tokens"], report["files"]
    parts = [
        "<h1>lorakit synth qa</h1>",
        f"<p>Teacher: {_e(report['teacher'])}. {_e(report['documents'])} documents, {_e(report['windows'])} "
        f"windows, {_e(round(report['seconds']))} s.</p>",
        "<h2>Teacher calls</h2>",
        _table(["calls", "from cache", "failed", "malformed (after a retry)", "prompt tokens", "reply tokens"],
               [[calls["total"], calls["cached"], calls["failed"], calls["malformed"], tokens["prompt"],
                 tokens["completion"]]]),
        *([f"<h2>Answer-first: {_e(report['answer_first']['sentence_answers'])} (sentence, answer) pairs</h2>",
           _table(list(report["answer_first"]["calls_by_stage"]), [list(report["answer_first"]["calls_by_stage"].values())])]
          if "answer_first" in report else []),
        "<h2>Rows</h2>",
        _table(["candidates", "kept", *report["rejected"]],
               [[report["candidates"], report["kept"], *report["rejected"].values()]]),
        _table(["file", "rows"], [[k, v] for k, v in files.items()]),
        f"<p>{_e(report['moved_by_ngram_guard'])} held-out or unanswerable questions moved to train by the "
        f"{_e(report['settings']['ngram_guard'])}-gram guard.</p>",
    ]
    for kind, rows in report["samples"].items():
        parts.append(f"<h2>Samples: {_e(kind)}</h2>")
        parts.append(_table(["question", "answer", "fact", "source"],
                            [[r["messages"][0]["content"], r["messages"][1]["content"], r["fact"],
                              f"{r['source']['file']} {r['source']['span']}"] for r in rows]))
    rejected = report.get("rejected_samples", [])
    if rejected:
        parts.append("<h2>Rejected samples</h2>")
        parts.append(_table(["reason", "question", "answer", "fact"],
                            [[r["reason"], r["question"], r["answer"], r["fact"]] for r in rejected]))
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}")
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
            f"<title>lorakit synth qa</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
