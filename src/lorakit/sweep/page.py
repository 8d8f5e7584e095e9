"""sweep.html: the trials ranked, the metric against each swept key, heatmaps, the facts/retention front.

Offline like report.html: inline CSS (report.py's), plots as data: PNGs drawn on matplotlib's Agg
canvas (no pyplot), no scripts or URLs (a Content-Security-Policy forbids any load), every value
escaped.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import math
from typing import Any

from lorakit.eval.plots import COLOURS
from lorakit.eval.report import CSS, fmt
from lorakit.sweep.results import (FACT_METRIC, RETENTION_METRIC, best, fact_retention_points, metric_columns,
                                   pareto_front, ranked, score, swept_keys)
from lorakit.sweep.state import SweepState

MAX_HEATMAPS = 3


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _figure(width: float = 6.0, height: float = 3.6) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plain(text: Any) -> str:
    return str(text).replace("$", r"\$")  # matplotlib would read $...$ as mathtext


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _points(state: SweepState, key: str) -> list[tuple[Any, float]]:
    return [(t.values.get(key), s) for t in state.trials if (s := score(t, state.metric)) is not None]


def key_plot(state: SweepState, key: str) -> str | None:
    """Every scored trial's metric against `key`, and a line through the best trial at each value."""
    points = _points(state, key)
    if not points:
        return None
    fig, ax = _figure()
    xs = [x for x, _ in points]
    order = sorted(set(xs), key=lambda v: (str(type(v)), v)) if _numeric(xs) else list(dict.fromkeys(map(str, xs)))
    pos = {v: (v if _numeric(xs) else i) for i, v in enumerate(order)}
    at = (lambda v: pos[v]) if _numeric(xs) else (lambda v: pos[str(v)])
    pick = min if state.direction == "min" else max
    ax.scatter([at(x) for x, _ in points], [y for _, y in points], color=COLOURS[0], alpha=0.55, s=22,
               label="each trial")
    best_line = [(at(v), pick(y for x, y in points if (x if _numeric(xs) else str(x)) == v)) for v in order]
    ax.plot([p for p, _ in best_line], [y for _, y in best_line], color=COLOURS[1], marker="o", markersize=4,
            label=f"best at each value ({state.direction})")
    if _numeric(xs) and min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log")
    if not _numeric(xs):
        ax.set_xticks(range(len(order)), [_plain(v) for v in order])
    ax.set_xlabel(_plain(key))
    ax.set_ylabel(_plain(state.metric))
    ax.set_title(_plain(f"{state.metric} against {key}"), fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return _uri(fig)


def heatmap(state: SweepState, kx: str, ky: str) -> str | None:
    """The metric over two swept keys (the best trial per cell over the other keys; blank: not run)."""
    trials = [t for t in state.trials if score(t, state.metric) is not None]
    if not trials:
        return None
    xs = sorted({t.values.get(kx) for t in trials}, key=_sort_key)
    ys = sorted({t.values.get(ky) for t in trials}, key=_sort_key)
    pick = min if state.direction == "min" else max
    grid = [[math.nan] * len(xs) for _ in ys]
    for t in trials:
        i, j = ys.index(t.values.get(ky)), xs.index(t.values.get(kx))
        s = score(t, state.metric)
        grid[i][j] = s if math.isnan(grid[i][j]) else pick(grid[i][j], s)
    fig, ax = _figure(6.0, max(2.6, 0.55 * len(ys) + 1.6))
    cmap = "viridis_r" if state.direction == "min" else "viridis"
    image = ax.imshow(grid, cmap=cmap, aspect="auto", origin="lower")
    fig.colorbar(image, ax=ax, label=_plain(state.metric))
    ax.set_xticks(range(len(xs)), [_plain(fmt(v)) for v in xs])
    ax.set_yticks(range(len(ys)), [_plain(fmt(v)) for v in ys])
    ax.set_xlabel(_plain(kx))
    ax.set_ylabel(_plain(ky))
    for i, j in itertools.product(range(len(ys)), range(len(xs))):
        if not math.isnan(grid[i][j]):
            r, g_, b, _ = image.cmap(image.norm(grid[i][j]))
            ink = "black" if 0.299 * r + 0.587 * g_ + 0.114 * b > 0.5 else "white"  # readable on the cell's colour
            ax.text(j, i, fmt(grid[i][j], 3), ha="center", va="center", fontsize=8, color=ink)
    ax.set_title(_plain(f"{state.metric}: {ky} x {kx}"), fontsize=11)
    return _uri(fig)


def _sort_key(v: Any) -> tuple[int, Any]:
    return (0, v) if _numeric([v]) else (1, str(v))


def pareto_plot(state: SweepState) -> str | None:
    """Held-out facts against general answers retained, every trial, the front joined (both: higher wins)."""
    points = fact_retention_points(state.trials)
    if not points:
        return None
    front = pareto_front(points)
    by_id = {i: (x, y) for i, x, y in points}
    fig, ax = _figure()
    ax.scatter([x for _, x, _ in points], [y for _, _, y in points], color=COLOURS[0], s=24, label="trial")
    ax.plot([by_id[i][0] for i in front], [by_id[i][1] for i in front], color=COLOURS[3], marker="o",
            label="Pareto front")
    for i, x, y in points:
        ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlabel(f"{FACT_METRIC} (first --eval-data set)")
    ax.set_ylabel(f"{RETENTION_METRIC} (general answers kept)")
    ax.set_title("What a trial taught against what it kept", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return _uri(fig)


def plots(state: SweepState) -> list[tuple[str, str]]:
    """(caption, data URI) of every plot the trials can fill."""
    keys = swept_keys(state)
    out = [(f"{state.metric} against {k}", key_plot(state, k)) for k in keys]
    out += [(f"{state.metric}: {b} x {a}", heatmap(state, a, b))
            for a, b in list(itertools.combinations(keys, 2))[:MAX_HEATMAPS]]
    out.append(("Pareto front: facts against retention", pareto_plot(state)))
    return [(caption, uri) for caption, uri in out if uri is not None]


def _table(state: SweepState) -> str:
    keys = list(dict.fromkeys(k for t in state.trials for k in t.params))
    columns = [state.metric] + [c for c in metric_columns(state.trials) if c != state.metric]
    top = best(state.trials, state.metric, state.direction)
    head = ["trial", *keys, "status", *columns, "time"]
    rows = []
    for t in ranked(state.trials, state.metric, state.direction):
        mark = ' <span class="best">best</span>' if t is top else ""
        cells = [f'<span style="white-space:nowrap">{_e(t.name)}{mark}</span>', *[_e(fmt(t.values.get(k, t.params.get(k)))) for k in keys],
                 _e(t.status) + (f'<div class="note">{_e(t.error)}</div>' if t.error else ""),
                 *[_e(fmt(t.metrics.get(c))) for c in columns], _e(fmt(t.elapsed_s, 3))]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    return (f'<div style="overflow-x:auto"><table><thead><tr>{th}</tr></thead><tbody>{"".join(rows)}</tbody>'
            "</table></div>")


def render(state: SweepState, title: str) -> str:
    top = best(state.trials, state.metric, state.direction)
    done = sum(t.status == "done" for t in state.trials)
    failed = sum(t.status == "failed" for t in state.trials)
    summary = (f"{len(state.trials)} trials: {done} done, {failed} failed, {len(state.trials) - done - failed} "
               f"not run yet. Ranked by {state.metric} ({'lower' if state.direction == 'min' else 'higher'} is better)")
    if top is not None:
        settings = ", ".join(f"{k}={fmt(v)}" for k, v in top.values.items())
        summary += f"; best: {top.name} ({settings}) with {fmt(score(top, state.metric))}."
    figures = "".join(f'<figure><img alt="{_e(c)}" src="{u}"><figcaption>{_e(c)}</figcaption></figure>'
                      for c, u in plots(state))
    plan = state.plan
    sets = " ".join(f"--set {x}" for x in plan.get("set") or [])
    command = f"config {plan.get('config')} {sets}; {plan.get('search')} search".replace("  ", " ")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">\n"
        f"<title>lorakit sweep: {_e(title)}</title>\n<style>{CSS}</style></head>\n<body>\n"
        f"<header><h1>lorakit sweep: {_e(title)}</h1><p>{_e(summary)}</p><p class=\"note\">{_e(command)}</p>"
        "</header>\n"
        f"<section><h2>Trials</h2>{_table(state)}</section>\n"
        + (f'<section><h2>Plots</h2><div class="plots">{figures}</div></section>\n' if figures else
           '<section><h2>Plots</h2><p class="none">no finished trial reports the metric yet</p></section>\n')
        + "<footer>Each trial's own report.html is in its trial-NNN directory.</footer>\n</body></html>\n"
    )
