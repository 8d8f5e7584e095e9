"""Line plots for the run report, rendered with matplotlib's Agg canvas to inline PNG.

No pyplot: each plot is its own Figure on a FigureCanvasAgg, so nothing global (the
interactive backend, open figures) is touched, and the report renders on a machine
without a display.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from typing import Any

# the tab10 colours in a fixed order, so a metric keeps its colour across plots
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


@dataclass
class Series:
    label: str
    steps: list[float]
    values: list[float]
    dashed: bool = False


def series(events: list[dict[str, Any]], key: str, label: str | None = None, dashed: bool = False) -> Series | None:
    """The finite numeric values of `key` over the events' steps (None when there are none)."""
    points = [(e["step"], e[key]) for e in events if _number(e.get("step")) and _number(e.get(key))]
    if not points:
        return None
    return Series(label or key, [float(s) for s, _ in points], [float(v) for _, v in points], dashed)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def line_plot(title: str, ylabel: str, lines: list[Series | None], logy: bool = False, xlabel: str = "step",
              integer_x: bool = True) -> str | None:
    """A PNG of `lines` against step (or `xlabel`) as a data: URI (None when no line has a point)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    lines = [s for s in lines if s is not None]
    if not lines:
        return None
    fig = Figure(figsize=(6.0, 3.3), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, s in enumerate(lines):
        few = len(s.steps) <= 40  # markers while the points can be told apart
        ax.plot(s.steps, s.values, label=s.label, color=COLOURS[i % len(COLOURS)],
                linestyle="--" if s.dashed else "-", marker="o" if few else None, markersize=3.5, linewidth=1.6)
    if logy and all(v > 0 for s in lines for v in s.values):
        ax.set_yscale("log")
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize=8, frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def labelled_points(title: str, xlabel: str, ylabel: str, points: list[tuple[str, float, float]],
                    logx: bool = False, hlines: list[tuple[str, float]] = ()) -> str | None:
    """A PNG scatter of (label, x, y) points, each with its label beside it, as a data: URI (None when empty).

    An empty label leaves its point unlabelled. `hlines`: (label, y) reference levels, drawn as
    dashed grey lines across the plot, their labels joined into one note above the highest."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = [(label, float(x), float(y)) for label, x, y in points if _number(x) and _number(y)]
    if not points:
        return None
    fig = Figure(figsize=(6.4, 4.0), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (label, x, y) in enumerate(points):
        ax.plot([x], [y], marker="o", linestyle="none", color=COLOURS[i % len(COLOURS)], markersize=5)
        # alternate above/below so neighbours at the same bits (nf4 vs nf4-dq) stay readable
        if label:
            ax.annotate(_plain(label), (x, y), textcoords="offset points", xytext=(5, 5 if i % 2 else -10),
                        fontsize=7)
    if logx and all(x > 0 for _, x, _ in points):
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 4, 8, 16, 32 rather than 2^2 ...
    levels = [(label, float(y)) for label, y in hlines if _number(y)]
    for _, y in levels:
        ax.axhline(y, color="#7f7f7f", linestyle="--", linewidth=1)
    if levels:  # one note: reference levels are often too close for a label each
        ax.annotate(_plain(", ".join(label for label, _ in levels)), (0.99, max(y for _, y in levels)),
                    xycoords=("axes fraction", "data"), ha="right", va="bottom", fontsize=7, color="#555555")
    ax.margins(x=0.12, y=0.12)  # room for the labels of the outermost points
    ax.set_title(_plain(title), fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def run_plots(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(caption, data URI) for each plot the run's events can fill, in report order."""
    train = [e for e in events if e.get("event") == "train"]
    evals = [e for e in events if e.get("event") == "eval"]
    gen = [dict(e["metrics"], step=e.get("step")) for e in events
           if e.get("event") == "gen_eval" and isinstance(e.get("metrics"), dict)]
    gen_names = list(dict.fromkeys(k for g in gen for k in g if k != "step"))
    specs = [
        ("Training and eval loss", "loss",
         [series(train, "loss", "train loss"), series(evals, "eval_loss", "eval loss", dashed=True)]),
        ("KL to the base model (train.kl_to_base)", "KL (nats / position)", [series(train, "kl", "KL(base || tuned)")]),
        ("Learning rate", "lr", [series(train, "lr", "learning rate")]),
        ("Generation metrics on the eval sample", "score", [series(gen, name) for name in gen_names]),
        ("Throughput", "tokens / s", [series(train, "tokens_per_s", "tokens/s")]),
        ("Memory", "MB", [series(train, "rss_mb", "RSS"), series(train, "peak_rss_mb", "peak RSS", dashed=True),
                          series(train, "cuda_peak_mb", "CUDA peak allocated")]),
    ]
    plots = []
    for title, ylabel, lines in specs:
        uri = line_plot(title, ylabel, lines)
        if uri is not None:
            plots.append((title, uri))
    return plots


def scale_plots(comparison: dict[str, Any]) -> list[tuple[str, str]]:
    """(caption, data URI) per adapter of compare.json's `scales`: each set's primary metric and the
    general answer retention against the adapter's strength, from scale 0 (the base model)."""
    scales, datasets, labels = (comparison.get(k) for k in ("scales", "datasets", "labels"))
    if not isinstance(scales, dict) or not isinstance(datasets, dict) or not isinstance(labels, list) or not labels:
        return []
    base = labels[0]
    plots = []
    for adapter, rows in scales.items():
        rows = [r for r in rows if isinstance(r, dict) and _number(r.get("scale"))] if isinstance(rows, list) else []
        primary = dict.fromkeys((name, p.get("metric")) for r in rows if isinstance(r.get("primary"), dict)
                                for name, p in r["primary"].items() if isinstance(p, dict))
        lines = []
        for name, metric in primary:
            at_base = _at(datasets, name, "metrics", metric, base)
            points = [(0.0, at_base)] + [(r["scale"], _at(r, "primary", name, "value")) for r in rows]
            lines.append(_xy(f"{name}: {metric}", points))
        if any(_number(r.get("retention")) for r in rows):
            kept = [(0.0, 1.0)] + [(r["scale"], r.get("retention")) for r in rows]
            lines.append(_xy("general answer retention", kept, dashed=True))
        uri = line_plot(_plain(f"{adapter}: taught vs kept"), "score", lines, xlabel="adapter scale (0 = base model)",
                        integer_x=False)
        if uri is not None:
            plots.append((f"Adapter strength: {adapter}", uri))
    return plots


def _at(d: Any, *keys: Any) -> Any:
    for key in keys:
        d = d.get(key) if isinstance(d, dict) else None
    return d


def _xy(label: str, points: list[tuple[Any, Any]], dashed: bool = False) -> Series | None:
    points = [(float(x), float(y)) for x, y in points if _number(x) and _number(y)]
    if not points:
        return None
    return Series(_plain(label), [x for x, _ in points], [y for _, y in points], dashed)


def _plain(text: str) -> str:
    """Text matplotlib draws as is: a `$` would start mathtext."""
    return str(text).replace("$", r"\$")


def _png_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def confusion_plot(title: str, labels: list[str], confusion: list[list[int]]) -> str:
    """A confusion matrix (rows gold, columns predicted) as a PNG data: URI, each cell's count written in it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = len(labels)
    size = min(2.4 + 0.55 * k, 8.0)
    fig = Figure(figsize=(size + 0.8, size), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(confusion, cmap="Blues")
    top = max((max(row) for row in confusion), default=0)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(confusion[i][j]), ha="center", va="center", fontsize=9,
                    color="white" if confusion[i][j] > top / 2 else "black")
    names = [_plain(label) for label in labels]
    ax.set_xticks(range(k), names, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(_plain(title), fontsize=11)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _png_uri(fig)
