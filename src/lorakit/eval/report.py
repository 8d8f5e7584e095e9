"""The run report: RUN_DIR/report.html, one self-contained page that opens offline.

Everything is inline: CSS in a <style>, plots as data: PNGs, no scripts, no fonts or URLs
(a Content-Security-Policy forbids any load besides data: images). It reads what the run
directory holds (config.yaml, metrics.jsonl, eval.json, compare.json, the adapter's
adapter_config.json) and says what is missing instead of failing, so it can be written for a
finished run, an interrupted one or one still in progress. Every string from those files is
HTML-escaped: model outputs are data, never markup.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorakit.errors import LorakitError
from lorakit.io import atomic_write_text

REPORT_NAME = "report.html"
SAMPLES_PER_DATASET = 4  # up to half biggest wins, half biggest losses
MAX_TEXT_CHARS = 2000  # a prompt, reference or output longer than this is cut in the report
LOWER_IS_BETTER = ("loss", "ppl", "perplexity")  # metric names containing these: smaller wins


@dataclass
class Run:
    """What a run directory holds; empty or None for a missing piece, `missing` says which."""

    dir: Path
    events: list[dict[str, Any]]
    config_text: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)  # the "end" event, else eval.json
    compare: dict[str, Any] | None = None
    adapter: dict[str, Any] | None = None
    classification: list[dict[str, Any]] = field(default_factory=list)  # classify_eval.json / compare.json results
    missing: list[str] = field(default_factory=list)

    def first(self, event: str) -> dict[str, Any]:
        return next((e for e in self.events if e.get("event") == event), {})

    def of(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]


def write_report(run_dir: Path) -> Path:
    """(Re)write run_dir/report.html from what the run directory holds; returns its path."""
    run = load_run(Path(run_dir))
    path = run.dir / REPORT_NAME
    atomic_write_text(path, render(run))
    return path


def load_run(run_dir: Path) -> Run:
    if not run_dir.exists():
        raise LorakitError(f"{run_dir} does not exist; give the run directory `lorakit train` wrote (its output_dir)")
    if not run_dir.is_dir():
        raise LorakitError(f"{run_dir} is a file; give the run directory `lorakit train` wrote (its output_dir)")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise LorakitError(f"{run_dir} has no metrics.jsonl, so it is not a training run; "
                           "give the output_dir of a `lorakit train` run")
    missing: list[str] = []
    run = Run(run_dir, _read_events(metrics, missing), missing=missing)
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        run.config_text = config_path.read_text(encoding="utf-8", errors="replace")
        try:
            loaded = yaml.safe_load(run.config_text)
            run.config = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError:
            run.missing.append("config.yaml does not parse as YAML; it is shown as text")
    else:
        run.missing.append("config.yaml is missing: no resolved config to show")
    eval_json = _read_json(run_dir / "eval.json", run.missing)
    run.summary = run.first("end") or eval_json or {}
    if not run.summary:
        run.missing.append("no end summary (no `end` event, no eval.json): the run was interrupted or is still "
                           "running; `lorakit train CONFIG --resume` finishes it")
    if not run.of("train"):
        run.missing.append("metrics.jsonl holds no train events: no training curves")
    run.compare = _read_json(run_dir / "compare.json", run.missing)
    if run.compare is None:
        run.missing.append("compare.json is missing: no before/after table or sample generations; "
                           "`lorakit compare` (or `lorakit demo`) writes it")
    adapter_file = "selective.json" if _get(run.config, "adapter", "method") == "selective" else "adapter_config.json"
    run.adapter = _read_json(run_dir / "adapter" / adapter_file, run.missing)
    run.classification = classification_results(run_dir, run.compare, run.missing)
    if run.adapter is None and _get(run.config, "adapter", "method") != "full" and not run.classification:
        run.missing.append(f"adapter/{adapter_file} is missing: the adapter was not saved (yet)")
    return run


def _read_events(path: Path, missing: list[str]) -> list[dict[str, Any]]:
    events, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            event = None
        if isinstance(event, dict):
            events.append(event)
        else:
            bad += 1  # a line cut short by a kill
    if bad:
        missing.append(f"{bad} line(s) of metrics.jsonl did not parse (cut short by a kill?) and were skipped")
    return events


def _read_json(path: Path, missing: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        missing.append(f"{path.name} does not parse ({err}); it is left out")
        return None
    if not isinstance(data, dict):
        missing.append(f"{path.name} is not a JSON object; it is left out")
        return None
    return data


def _get(d: Any, *keys: str) -> Any:
    for key in keys:
        d = d.get(key) if isinstance(d, dict) else None
    return d


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value: Any, digits: int = 4) -> str:
    """A value for display (not yet escaped): thousands separators, `digits` significant digits."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:.{digits}g}"


def fmt_seconds(s: Any) -> str:
    if not _num(s):
        return "—"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _last(events: list[dict[str, Any]], key: str) -> Any:
    return next((e[key] for e in reversed(events) if _num(e.get(key))), None)


def _max(events: list[dict[str, Any]], key: str) -> Any:
    values = [e[key] for e in events if _num(e.get(key))]
    return max(values) if values else None


def render(run: Run) -> str:
    from lorakit import __version__
    from lorakit.eval.plots import run_plots

    plots = "".join(f'<figure><img alt="{_e(title)}" src="{uri}"></figure>' for title, uri in run_plots(run.events))
    cmp = run.compare or {}
    labels = [str(x) for x in cmp.get("labels")] if isinstance(cmp.get("labels"), list) else []
    body = [
        _header(run),
        _section("What is missing or skipped", "<ul>" + "".join(f"<li>{_e(m)}</li>" for m in run.missing) + "</ul>",
                 "missing") if run.missing else "",
        _section("Key numbers", _key_numbers(run)),
        _classification(run.classification),
        _section("Before and after",
                 _before_after(cmp, labels) if run.compare else _none("no compare.json in this run directory")),
        _section("Curves", f'<div class="plots">{plots}</div>' if plots else _none("no curves: no logged steps")),
        _section("Evaluation during training", _eval_table(run)),
        _datasets(cmp, labels),
        _forgetting(cmp, labels),
        _scales(cmp, labels),
        _section("Resolved config",
                 f"<pre>{_e(run.config_text)}</pre>" if run.config_text else _none("no config.yaml")),
    ]
    generated = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">\n"
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>lorakit report: {_e(run.dir.resolve().name)}</title>\n<style>{CSS}</style></head>\n<body>\n"
        + "\n".join(part for part in body if part)
        + f"\n<footer>Written by lorakit {_e(__version__)} on {_e(generated)}; "
        f"<code>lorakit report {_e(run.dir)}</code> writes it again.</footer>\n</body></html>\n"
    )


def _section(title: str, content: str, cls: str = "") -> str:
    return f'<section class="{cls}"><h2>{_e(title)}</h2>\n{content}</section>'


def _none(text: str) -> str:
    return f'<p class="none">{_e(text)}</p>'


def _header(run: Run) -> str:
    a, cfg = run.adapter or {}, run.config
    method = _get(cfg, "adapter", "method") or ("lora" if a else None)
    quant = _get(cfg, "quantization", "method")
    if method and quant and quant != "none":
        method = f"{method} ({quant} base)"
    r, alpha = a.get("r", _get(cfg, "adapter", "r")), a.get("lora_alpha", _get(cfg, "adapter", "alpha"))
    targets = a.get("target_modules", _get(cfg, "adapter", "target_modules"))
    if isinstance(targets, list):
        targets = ", ".join(map(str, targets))
    mtime = (run.dir / "metrics.jsonl").stat().st_mtime
    rows = [
        ("run directory", str(run.dir.resolve())),
        ("base model", _get(cfg, "model", "name") or a.get("base_model_name_or_path")),
        ("method", method),
        ("adapter", _adapter_text(method, r, alpha, targets, a)),
        ("last logged", dt.datetime.fromtimestamp(mtime).astimezone().strftime("%Y-%m-%d %H:%M %Z")),
        ("status", "finished" if run.first("end") else "no end event (interrupted or still running)"),
    ]
    meta = "".join(f"<dt>{_e(k)}</dt><dd>{_e(fmt(v))}</dd>" for k, v in rows)
    return f'<header><h1>lorakit run report</h1><dl class="meta">{meta}</dl></header>'


def _adapter_text(method: str | None, r: Any, alpha: Any, targets: Any, a: dict[str, Any]) -> str | None:
    """The header's adapter line: rank and alpha (LoRA, DoRA), scaled layers (IA3), trained patterns (selective)."""
    kind = (method or "").split(" ")[0]
    if kind == "full":
        return None
    if kind == "ia3":
        return f"IA3 vectors on {targets}, feedforward {a.get('feedforward_modules')}"
    if kind == "selective":
        return f"trained parameters matching {a.get('patterns')}: {len(a.get('tensors') or {})} tensors"
    return f"r {fmt(r)}, alpha {fmt(alpha)}, targets {targets}" if r is not None else None


def _key_numbers(run: Run) -> str:
    start, s, train = run.first("start"), run.summary, run.of("train")
    trainable = start.get("trainable_params")
    total = start.get("total_params", start.get("all_params"))
    if _num(trainable) and _num(total) and total:
        trainable = f"{fmt(trainable)} ({100 * trainable / total:.3g}%)"
    steps = s.get("step", _last(train, "step"))
    elapsed = s.get("elapsed_s", _last(train, "elapsed"))
    trained = s.get("trained_tokens", _last(train, "trained_tokens"))
    tps = s.get("trained_tokens_per_s")
    if tps is None and _num(trained) and _num(elapsed) and elapsed > 0:
        tps = round(trained / elapsed, 2)
    cuda = _max(train, "cuda_peak_mb")
    peak = s.get("peak_rss_mb", _max(train, "peak_rss_mb"))
    eval_loss = s.get("eval_loss", _last(run.of("eval"), "eval_loss"))
    ppl = s.get("eval_ppl", math.exp(min(eval_loss, 50.0)) if _num(eval_loss) else None)
    cards = [
        ("steps", f"{fmt(steps)} / {fmt(start.get('total_steps'))}" if start.get("total_steps") else steps),
        ("trained tokens", trained), ("all tokens", s.get("tokens", _last(train, "tokens"))),
        ("training time", fmt_seconds(elapsed)), ("trained tokens/s", tps),
        ("peak RSS", f"{fmt(peak)} MB" if _num(peak) else None),
        ("CUDA peak allocated", f"{fmt(cuda)} MB" if cuda is not None else None),
        ("trainable params", trainable), ("adapted modules", start.get("adapted_modules")),
        ("final eval loss", eval_loss), ("final perplexity", ppl), ("best eval loss", s.get("best_eval_loss")),
        (f"best {s.get('best_metric')} (adapter-best)", f"{fmt(s.get('best_value'))} at step {fmt(s.get('best_step'))}"
         if s.get("best_metric") else None),
        ("early stopped at step", s.get("early_stopped_at")),
        ("last train loss", s.get("train_loss_last", _last(train, "loss"))),
        ("examples (train / eval)", f"{fmt(start.get('examples'))} / {fmt(start.get('eval_examples'))}"
         if start else None),
        ("device, precision", f"{start.get('device')}, {start.get('precision')}" if start else None),
    ]
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(fmt(v))}</div></div>'
        for k, v in cards if v is not None) + "</div>"


def classification_results(run_dir: Path, compare: dict[str, Any] | None, missing: list[str]) -> list[dict[str, Any]]:
    """The classifier evaluations a run directory holds: classify_eval.json (training's test split), then
    compare.json's classification results (`lorakit compare --config/--adapter ... --out`)."""
    found = []
    path = run_dir / "classify_eval.json"
    data = _read_json(path, missing) if path.exists() else None
    for source in (data, compare):
        results = source.get("results") if isinstance(source, dict) else None
        if isinstance(results, list):
            found += [r for r in results if isinstance(r, dict) and isinstance(r.get("metrics"), dict)
                      and isinstance(r["metrics"].get("confusion"), list)]
    return found


def _classification(results: list[dict[str, Any]]) -> str:
    """Accuracy, macro-F1, ECE and per-class precision / recall per classifier, and each confusion matrix."""
    from lorakit.eval.plots import confusion_plot

    if not results:
        return ""
    labels = [str(x) for x in results[0]["metrics"].get("labels", [])]
    rows, plots = [], []
    for r in results:
        m = r["metrics"]
        per = m.get("per_class") or {}
        rows.append([_e(r.get("name")), _e(r.get("data")), _e(fmt(m.get("n"))), _e(fmt(m.get("accuracy"))),
                     _e(fmt(m.get("macro_f1"))), _e(fmt(m.get("ece"))),
                     *[_e(f"{fmt(_get(per, lab, 'precision'), 3)} / {fmt(_get(per, lab, 'recall'), 3)}")
                       for lab in labels]])
        try:
            uri = confusion_plot(f"{r.get('name')}", [str(x) for x in m.get("labels", [])], m["confusion"])
            plots.append(f'<figure><img alt="confusion matrix of {_e(r.get("name"))}" src="{uri}"></figure>')
        except (TypeError, ValueError, IndexError):
            plots.append(_none(f"the confusion matrix of {r.get('name')} is damaged"))
    table = _table(["model", "data", "rows", "accuracy", "macro-F1", "ECE (10 bins)",
                    *[f"{lab}: precision / recall" for lab in labels]], rows)
    return _section("Classification", table + f'<div class="plots">{"".join(plots)}</div>')


def _table(head: list[str], rows: list[list[str]]) -> str:
    """Cells are already HTML; a row of `head` is escaped here."""
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    return f"<table><thead><tr>{th}</tr></thead><tbody>" + "".join(
        "<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows) + "</tbody></table>"


def _lower_is_better(metric: str) -> bool:
    return any(word in metric.lower() for word in LOWER_IS_BETTER)


def _value_row(name: str, values: dict[str, Any], labels: list[str], higher: bool, delta: bool = True) -> list[str]:
    """Metric name, then one cell per label; the best value highlighted, later labels with their change."""
    values = values if isinstance(values, dict) else {}
    nums = [values[x] for x in labels if _num(values.get(x))]
    best = (max(nums) if higher else min(nums)) if len(set(nums)) > 1 else None
    base = values.get(labels[0])
    cells = [_e(name)]
    for i, label in enumerate(labels):
        v = values.get(label)
        text = _e(fmt(v))
        if delta and i > 0 and _num(v) and _num(base):
            text += f' <span class="delta">({v - base:+.3g})</span>'
        cells.append(f'<span class="best">{text}</span>' if _num(v) and v == best else text)
    return cells


def _before_after(cmp: dict[str, Any], labels: list[str]) -> str:
    if len(labels) < 2:
        return _none("compare.json names fewer than two labels; nothing to compare")
    rows = []
    summary = cmp.get("summary")
    if isinstance(summary, list) and summary:
        for item in (x for x in summary if isinstance(x, dict)):
            name = str(item.get("metric", "?"))
            higher = item.get("higher_is_better", not _lower_is_better(name))
            rows.append(_value_row(name, item.get("values"), labels, bool(higher)))
    else:
        for ds, d in _datasets_of(cmp):
            for metric, values in (d.get("metrics") or {}).items():
                rows.append(_value_row(f"{ds}: {metric}", values, labels, not _lower_is_better(metric)))
    if not rows:
        return _none("compare.json holds no metrics")
    return _table(["metric", *labels], rows) + '<p class="note">Best value highlighted; in brackets the change ' \
        f"from {_e(labels[0])}.</p>"


def _datasets_of(cmp: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    datasets = cmp.get("datasets")
    return [(str(k), v) for k, v in datasets.items() if isinstance(v, dict)] if isinstance(datasets, dict) else []


def _datasets(cmp: dict[str, Any], labels: list[str]) -> str:
    if len(labels) < 2 or not _datasets_of(cmp):
        return ""
    parts = []
    for name, d in _datasets_of(cmp):
        where = [str(d["path"])] if d.get("path") else []
        where += [f"{fmt(d['n'])} examples"] if d.get("n") is not None else []
        metrics = d.get("metrics") if isinstance(d.get("metrics"), dict) else {}
        rows = [_value_row(m, v, labels, not _lower_is_better(m)) for m, v in metrics.items()]
        table = _table(["metric", *labels], rows) if rows else _none("no metrics")
        samples = _samples(d.get("examples"), labels, next(iter(metrics), None))
        parts.append(f'<h3>{_e(name)}</h3><p class="note">{_e(", ".join(where))}</p>{table}{samples}')
    return _section("Datasets and sample generations", "".join(parts))


def pick_samples(examples: list[dict[str, Any]], labels: list[str], metric: str | None,
                 k: int = SAMPLES_PER_DATASET) -> list[tuple[str, dict[str, Any]]]:
    """(tag, example): the biggest wins and losses of labels[1] over labels[0] by `metric` (default:
    the first one scored), half and half where both exist, topped up with other examples in file order."""
    if metric is None:
        first = [_get(ex, "scores", labels[0]) for ex in examples]
        metric = next((m for s in first if isinstance(s, dict) for m in s), None)
    deltas = []
    for i, ex in enumerate(examples):
        a, b = (_get(ex, "scores", label, metric) if metric else None for label in labels[:2])
        if _num(a) and _num(b) and a != b:
            deltas.append((b - a, i))
    sign = -1 if metric and _lower_is_better(metric) else 1
    wins = sorted(((d, i) for d, i in deltas if sign * d > 0), key=lambda t: -abs(t[0]))
    losses = sorted(((d, i) for d, i in deltas if sign * d < 0), key=lambda t: -abs(t[0]))
    n_win = min(len(wins), max(k // 2, k - len(losses)))
    picked = [(f"{labels[1]} wins: {metric} {d:+.3g}", i) for d, i in wins[:n_win]]
    picked += [(f"{labels[1]} loses: {metric} {d:+.3g}", i) for d, i in losses[: k - n_win]]
    taken = {i for _, i in picked}
    picked += [("", i) for i in range(len(examples)) if i not in taken][: k - len(picked)]
    return [(tag, examples[i]) for tag, i in picked]


def _text(value: Any) -> str:
    if value is None:
        return _none("(none)")
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, indent=1)
    if len(text) > MAX_TEXT_CHARS:
        text = text[:MAX_TEXT_CHARS] + f"… ({len(text) - MAX_TEXT_CHARS:,} more characters)"
    return f"<pre>{_e(text)}</pre>"


def _samples(examples: Any, labels: list[str], metric: str | None) -> str:
    examples = [x for x in examples if isinstance(x, dict)] if isinstance(examples, list) else []
    if not examples:
        return _none("no sample generations")
    cards = []
    for tag, ex in pick_samples(examples, labels, metric):
        outs = "".join(
            f'<div class="out"><h4>{_e(label)}</h4><div class="scores">'
            + _e(", ".join(f"{m} {fmt(v, 3)}" for m, v in (_get(ex, "scores", label) or {}).items()))
            + f"</div>{_text(_get(ex, 'outputs', label))}</div>" for label in labels)
        tag_html = f'<div class="tag">{_e(tag)}</div>' if tag else ""
        cards.append(f'<div class="sample">{tag_html}<h4>prompt</h4>{_text(ex.get("prompt"))}'
                     f'<h4>reference</h4>{_text(ex.get("reference"))}'
                     f'<div class="outs" style="grid-template-columns: repeat({len(labels)}, 1fr)">{outs}</div></div>')
    return f"<p class=\"note\">{len(cards)} of {len(examples)} examples shown.</p>" + "".join(cards)


def _forgetting(cmp: dict[str, Any], labels: list[str]) -> str:
    f = cmp.get("forgetting")
    if not isinstance(f, dict) or len(labels) < 2:
        return ""
    rows = []
    if isinstance(f.get("perplexity"), dict):
        rows.append(_value_row("perplexity (lower is better)", f["perplexity"], labels, higher=False))
    if isinstance(f.get("retention"), dict):
        threshold = f" (warning below {fmt(f.get('threshold'))})" if _num(f.get("threshold")) else ""
        rows.append(_value_row("retention" + threshold, f["retention"], labels, higher=True, delta=False))
    warnings = [str(w) for w in f.get("warnings") or []]
    return _section("Forgetting", (_table(["", *labels], rows) if rows else "") + (
        '<ul class="warnings">' + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul>"
        if warnings else _none("no forgetting warnings")))


def _scales(cmp: dict[str, Any], labels: list[str]) -> str:
    """`compare --scale`: per adapter, the plot and the table of what each strength taught and kept."""
    from lorakit.eval.plots import scale_plots

    scales = cmp.get("scales")
    if not isinstance(scales, dict) or not scales or not labels:
        return ""
    plots = "".join(f'<figure><img alt="{_e(title)}" src="{uri}"></figure>' for title, uri in scale_plots(cmp))
    tables = []
    for adapter, rows in scales.items():
        rows = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
        names = list(dict.fromkeys(n for r in rows if isinstance(r.get("primary"), dict) for n in r["primary"]))
        metric = {n: next((m for r in rows if (m := _get(r, "primary", n, "metric"))), "?") for n in names}
        head = ["scale", *(f"{n}: {metric[n]}" for n in names),
                "general answer retention", "text perplexity"]
        body = [[_e(fmt(r.get("scale"))), *(_e(fmt(_get(r, "primary", n, "value"))) for n in names),
                 _e(fmt(r.get("retention"))), _e(fmt(r.get("perplexity")))] for r in rows]
        tables.append(f"<h3>{_e(adapter)}</h3>" + _table(head, body))
    return _section("Adapter strength", f'<div class="plots">{plots}</div>' + "".join(tables) +
                    '<p class="note">Each adapter evaluated with its update multiplied by the scale '
                    "(<code>lorakit merge --scale</code> merges the same model); scale 0 in the plot is "
                    f"{_e(labels[0])}.</p>")


def _eval_table(run: Run) -> str:
    by_step: dict[Any, dict[str, Any]] = {}
    for e in run.of("eval"):
        by_step.setdefault(e.get("step"), {}).update(eval_loss=e.get("eval_loss"), eval_ppl=e.get("eval_ppl"))
    for e in run.of("gen_eval"):
        if isinstance(e.get("metrics"), dict):
            by_step.setdefault(e.get("step"), {}).update(e["metrics"])
    if not by_step:
        return _none("no eval events in metrics.jsonl (train.eval_every: 0 evaluates at the end only)")
    columns = list(dict.fromkeys(k for row in by_step.values() for k in row))
    steps = sorted(by_step, key=lambda s: s if _num(s) else -1)
    return _table(["step", *columns], [[_e(fmt(s))] + [_e(fmt(by_step[s].get(c))) for c in columns] for s in steps])


CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#1d2330;
 background:#f6f7f9;margin:0 auto;max-width:1180px;padding:24px}
h1{margin:0 0 12px;font-size:26px}h2{font-size:19px;margin:0 0 12px;border-bottom:1px solid #e3e6eb;padding-bottom:6px}
h3{font-size:16px;margin:22px 0 4px}h4{font-size:13px;margin:10px 0 4px;color:#4a5568;text-transform:uppercase;
 letter-spacing:.03em}
header,section{background:#fff;border:1px solid #e3e6eb;border-radius:8px;padding:18px 22px;margin-bottom:18px}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:4px 18px;margin:0}dt{color:#5a6475}dd{margin:0}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px}
.card{border:1px solid #e3e6eb;border-radius:6px;padding:8px 12px}.card .k{font-size:12px;color:#5a6475}
.card .v{font-size:18px;font-weight:600;overflow-wrap:anywhere}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:14px}
figure{margin:0}figure img{width:100%;height:auto;border:1px solid #eef0f3}
table{border-collapse:collapse;margin:6px 0}th,td{border:1px solid #e3e6eb;padding:4px 10px;text-align:right}
th{background:#f0f2f5}td:first-child,th:first-child{text-align:left}
.best{background:#d9f2dd;font-weight:600;padding:1px 4px;border-radius:3px}.delta{color:#5a6475;font-size:12px}
pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f6f7f9;border:1px solid #eef0f3;border-radius:4px;
 padding:8px;margin:0;font:13px/1.4 ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace}
.sample{border:1px solid #e3e6eb;border-radius:6px;padding:10px 14px;margin:12px 0}
.outs{display:grid;gap:10px}.outs pre{max-height:22em;overflow:auto}
.scores{font-size:12px;color:#5a6475;margin-bottom:4px}
.tag{display:inline-block;font-size:12px;background:#eef2ff;border-radius:3px;padding:1px 6px}
.missing{background:#fffbea;border-color:#f0e2a8}.warnings li{color:#9a3412}
.none,.note{color:#5a6475;font-size:13px}footer{color:#5a6475;font-size:12px;text-align:center}
"""
