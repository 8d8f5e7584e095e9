"""`lorakit disagree`'s outputs: the review queue (JSONL), the capture summary and the offline HTML page."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.classify.commands import Labelled
from lorakit.classify.disagree import CHECKPOINTS, Capture, capture_curve, rank_rows
from lorakit.eval.plots import Series, line_plot
from lorakit.io import atomic_write_text


def queue_rows(lab: Labelled, order: np.ndarray, entropy: np.ndarray, kl: np.ndarray) -> list[dict[str, Any]]:
    """One record per row in queue order: rank, row, text, disagreement, each model's label and probability."""
    out = []
    for rank, i in enumerate(order, 1):
        models = {}
        for m, name in enumerate(lab.names):
            k = int(lab.probs[m, i].argmax())
            models[name] = {"label": lab.labels[k], "probability": round(float(lab.probs[m, i, k]), 6),
                            "probabilities": {lab_: round(float(x), 6) for lab_, x in zip(lab.labels, lab.probs[m, i])}}
        record = {"rank": rank, "row": lab.rows[i], "text": lab.texts[i], "vote_entropy": round(float(entropy[i]), 6),
                  "mean_kl": round(float(kl[i]), 6), "models": models}
        if lab.gold is not None:
            record["label"] = lab.gold[i]
        out.append(record)
    return out


def build_queue(lab: Labelled) -> tuple[list[dict[str, Any]], Capture | None]:
    order, entropy, kl = rank_rows(lab.probs)
    capture = None
    if lab.gold is not None:
        gold = np.array([lab.labels.index(g) for g in lab.gold])
        capture = capture_curve(lab.probs, gold, order, lab.names)
    return queue_rows(lab, order, entropy, kl), capture


def summary(capture: Capture) -> dict[str, Any]:
    return {"total_model_errors": capture.total_model_errors, "total_label_errors": capture.total_label_errors,
            "at": [capture.at(k) for k in CHECKPOINTS]}


def capture_lines(capture: Capture) -> list[str]:
    lines = [f"errors: {capture.total_model_errors} model errors, {capture.total_label_errors} label errors "
             "(gold label differs from the models' consensus)"]
    for point in summary(capture)["at"]:
        lines.append(f"top {point['k']:.0%} ({point['rows']} rows): {point['model_errors']:.1%} of model errors, "
                     f"{point['label_errors']:.1%} of label errors; random order {point['random']:.1%} "
                     f"({_ratio(point['model_errors'], point['random'])} / "
                     f"{_ratio(point['label_errors'], point['random'])} of random); best possible order "
                     f"{point['best_model_errors']:.1%} of model errors")
    return lines


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def capture_plot(capture: Capture) -> str | None:
    x = [100 * f for f in capture.fraction]
    lines = [Series("model errors (by disagreement)", x, [100 * v for v in capture.model_errors]),
             Series("label errors (by disagreement)", x, [100 * v for v in capture.label_errors]),
             Series("random order (expected)", x, x, dashed=True),
             Series("best possible order (model errors)", x, [100 * v for v in capture.best_model_errors], dashed=True)]
    lines += [Series(f"errors of {name}", x, [100 * v for v in curve], dashed=True)
              for name, curve in capture.per_model.items()]
    return line_plot("Error capture: share of errors in the top k% of the queue", "% of errors found",
                     lines, xlabel="% of rows reviewed (queue order)", integer_x=False)


def write_html(path: Path, lab: Labelled, records: list[dict[str, Any]], capture: Capture | None) -> None:
    """A self-contained page (inline PNG, CSP, everything escaped): the curve, the summary, the top of the queue."""
    e = html.escape
    parts = [f"<h1>Disagreement queue: {len(records)} rows, {len(lab.names)} models</h1>",
             "<p>Models: " + ", ".join(f"<code>{e(n)}</code>" for n in lab.names) + "</p>"]
    if capture is not None:
        uri = capture_plot(capture)
        if uri:
            parts.append(f'<img alt="error-capture curve" src="{uri}">')
        parts.append("<ul>" + "".join(f"<li>{e(line)}</li>" for line in capture_lines(capture)) + "</ul>")
    else:
        parts.append("<p>No gold labels (--labels): the queue is not evaluated.</p>")
    head = "".join(f"<th>{e(h)}</th>" for h in ["rank", "row", "vote entropy", "mean KL", *lab.names,
                                                 *(["gold"] if lab.gold is not None else []), "text"])
    body = []
    for r in records[:50]:
        cells = [str(r["rank"]), str(r["row"]), f"{r['vote_entropy']:.3f}", f"{r['mean_kl']:.3f}",
                 *[f"{m['label']} ({m['probability']:.2f})" for m in r["models"].values()],
                 *([r["label"]] if "label" in r else []), r["text"][:300]]
        body.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
    parts.append(f"<h2>Top of the queue</h2><table><tr>{head}</tr>{''.join(body)}</table>")
    atomic_write_text(path, (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">\n<title>lorakit disagree</title><style>body{font-family:sans-serif;"
        "max-width:70em;margin:2em auto}table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;"
        "padding:.2em .4em;vertical-align:top}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"))


def write_queue(out: Path, records: list[dict[str, Any]], capture: Capture | None) -> None:
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    if capture is not None:
        atomic_write_text(out.with_suffix(".capture.json"), json.dumps(
            {**summary(capture), "fraction": capture.fraction, "model_errors": capture.model_errors,
             "label_errors": capture.label_errors, "best_model_errors": capture.best_model_errors,
             "per_model": capture.per_model}) + "\n")


def run_disagree(model_args: list[str], data: Path, out: Path, labels: str | None, html_out: Path | None,
                 config: Path | None, batch_size: int, limit: int | None, dtype: str, console: Any,
                 force: bool = False) -> None:
    """Load every model, label every row, rank, write the queue (and the capture curve / page with gold labels)."""
    from lorakit.classify.commands import config_spec, label_everything, parse_model_args
    from lorakit.classify.predict import load_classifier
    from lorakit.errors import LorakitError

    models = parse_model_args(model_args)
    for target in (out, html_out, out.with_suffix(".capture.json") if labels else None):
        if target is not None and target.is_dir():
            raise LorakitError(f"{target} is a directory; give a file path")
        if target is not None and target.exists() and not force:
            raise LorakitError(f"{target} exists; pass --force to replace it, or choose another path")
    spec = config_spec(config)
    names: set[str] = set()
    classifiers = []
    for m in models:
        name = str(m.adapter) if m.adapter else f"{m.model} (untuned)"
        name = name if name not in names else f"{name} #{len(classifiers) + 1}"
        names.add(name)
        classifiers.append(load_classifier(m.model, m.adapter, spec, dtype, name=name))
    lab = label_everything(classifiers, data, labels, batch_size, limit, console)
    records, capture = build_queue(lab)
    write_queue(out, records, capture)
    console.print(f"wrote {out} ({len(records)} rows, most disagreement first)", highlight=False, markup=False)
    if capture is not None:
        for line in capture_lines(capture):
            console.print(line, highlight=False, markup=False)
    if html_out is not None:
        write_html(html_out, lab, records, capture)
        console.print(f"wrote {html_out}", highlight=False, markup=False)
