"""The trials ranked by the sweep's metric, the best one, the Pareto front, and sweep.csv."""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from lorakit.sweep.state import DONE, SweepState, TrialRecord

LOWER_IS_BETTER = ("loss", "ppl", "perplexity", "train_s")  # a metric name holding one of these: smaller wins
FACT_METRIC, RETENTION_METRIC = "fact", "retention"


def default_direction(metric: str) -> str:
    return "min" if any(word in metric for word in LOWER_IS_BETTER) else "max"


def score(trial: TrialRecord, metric: str) -> float | None:
    value = trial.metrics.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def ranked(trials: list[TrialRecord], metric: str, direction: str) -> list[TrialRecord]:
    """Finished trials with a score, best first (ties: the earlier trial), then the rest in trial order."""
    scored = [t for t in trials if t.status == DONE and score(t, metric) is not None]
    sign = 1.0 if direction == "min" else -1.0
    scored.sort(key=lambda t: (sign * score(t, metric), t.index))
    return scored + [t for t in trials if t not in scored]


def best(trials: list[TrialRecord], metric: str, direction: str) -> TrialRecord | None:
    top = ranked(trials, metric, direction)
    return top[0] if top and score(top[0], metric) is not None and top[0].status == DONE else None


def pareto_front(points: list[tuple[int, float, float]]) -> list[int]:
    """The ids of the points no other point beats on both coordinates (both higher is better), by x."""
    front = []
    for i, x, y in points:
        dominated = any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for _, x2, y2 in points)
        if not dominated:
            front.append((x, i))
    return [i for _, i in sorted(front)]


def fact_retention_points(trials: list[TrialRecord]) -> list[tuple[int, float, float]]:
    """(trial index, fact, retention) for every finished trial that measured both."""
    out = []
    for t in trials:
        fact, kept = score(t, FACT_METRIC), score(t, RETENTION_METRIC)
        if t.status == DONE and fact is not None and kept is not None:
            out.append((t.index, fact, kept))
    return out


def swept_keys(state: SweepState) -> list[str]:
    """The config keys whose value differs between trials, in the order the plan names them."""
    keys = list(dict.fromkeys(k for t in state.trials for k in t.params))
    return [k for k in keys if len({repr(t.values.get(k)) for t in state.trials}) > 1]


def metric_columns(trials: list[TrialRecord]) -> list[str]:
    return list(dict.fromkeys(k for t in trials for k in t.metrics))


def csv_text(state: SweepState) -> str:
    """sweep.csv: one row per trial, ranked by the sweep's metric; params, status, every metric, error."""
    keys = list(dict.fromkeys(k for t in state.trials for k in t.params))
    columns = metric_columns(state.trials)
    top = best(state.trials, state.metric, state.direction)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["rank", "trial", "best", *keys, "status", *columns, "elapsed_s", "error"])
    for rank, t in enumerate(ranked(state.trials, state.metric, state.direction), 1):
        has_score = score(t, state.metric) is not None and t.status == DONE
        writer.writerow([rank if has_score else "", t.name, "yes" if t is top else "",
                         *[t.values.get(k, t.params.get(k)) for k in keys], t.status,
                         *[_cell(t.metrics.get(c)) for c in columns], _cell(t.elapsed_s), t.error or ""])
    return buf.getvalue()


def _cell(value: Any) -> Any:
    return "" if value is None else value
