"""The base model and its adapters side by side: metrics, per-example wins and losses, forgetting.

`evaluate_model` runs one model over every eval set (generation metrics, answer perplexity)
and optionally a general text (perplexity). `build_comparison` lines the results up in the
`compare.json` shape that `report.py` renders, and adds the forgetting check: on a general
question set, the share of the answers the base model got right that each tuned model still
gets right (answer retention), and the change in perplexity on general text; either past its
threshold gives a warning. With adapters run at several strengths (`compare --scale`), each
(adapter, scale) is one model of the comparison, and the `scales` section lines up, per adapter
and scale, what the tune taught (each set's primary metric) against what it cost (retention,
perplexity).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from lorakit.eval.generate import GenerationSettings, InferenceModel
from lorakit.eval.metrics import RefusalMatcher
from lorakit.eval.runner import EvalSet, answer_perplexity, run_eval, text_perplexity

LOWER_IS_BETTER = {"perplexity"}


@dataclass
class ModelResult:
    label: str
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    text_perplexity: float | None = None


def evaluate_model(  # perplexity: every set, none, or the named sets
    im: InferenceModel,
    label: str,
    sets: Sequence[EvalSet],
    metrics: Sequence[str],
    settings: GenerationSettings,
    batch_size: int = 8,
    refusal: RefusalMatcher | None = None,
    perplexity: bool | Collection[str] = True,
    text: str | None = None,
    max_length: int = 512,
    on_batch: Callable[[int], None] | None = None,
) -> ModelResult:
    result = ModelResult(label)
    for s in sets:
        out = run_eval(im, s, metrics, settings, batch_size, refusal, on_batch)
        if perplexity is True or (perplexity and s.name in perplexity):
            out["metrics"]["perplexity"] = answer_perplexity(im, s, max_length, batch_size, on_batch)
        result.datasets[s.name] = out
    if text is not None:
        result.text_perplexity = text_perplexity(im, text, max_length)
    return result


def primary_metric(dataset: dict[str, Any]) -> str | None:
    """The metric that decides wins and losses: fact (or refusal, or label) where the rows have one."""
    values = dataset["metrics"]
    for name in ("fact", "label", "refusal", "token_f1", "rougeL", "exact_match"):
        if values.get(name) is not None:
            return name
    return next((k for k, v in values.items() if v is not None and k not in LOWER_IS_BETTER), None)


def retention(base: dict[str, Any], tuned: dict[str, Any], metric: str) -> float | None:
    """Of the examples the base model answered right (score >= 0.5), the share the tuned model still does."""
    right = [i for i, ex in enumerate(base["examples"]) if (ex["scores"].get(metric) or 0.0) >= 0.5]
    if not right:
        return None
    kept = sum(1 for i in right if (tuned["examples"][i]["scores"].get(metric) or 0.0) >= 0.5)
    return kept / len(right)


def wins_and_losses(base: dict[str, Any], tuned: dict[str, Any], metric: str, k: int = 3) -> tuple[list, list]:
    """The k examples the tuned model improved most and the k it worsened most, by `metric`."""
    diffs = []
    for i, (b, t) in enumerate(zip(base["examples"], tuned["examples"])):
        vb, vt = b["scores"].get(metric), t["scores"].get(metric)
        if vb is not None and vt is not None and vt != vb:
            diffs.append((vt - vb, i))
    wins = [i for d, i in sorted(diffs, key=lambda x: (-x[0], x[1])) if d > 0][:k]
    losses = [i for d, i in sorted(diffs, key=lambda x: (x[0], x[1])) if d < 0][:k]
    return wins, losses


def build_comparison(
    results: Sequence[ModelResult],
    general: str | None = None,
    retention_threshold: float = 0.9,
    perplexity_threshold: float = 0.10,
    scales: dict[str, list[tuple[float, str]]] | None = None,
) -> dict[str, Any]:
    """compare.json: labels, per-dataset metrics and examples side by side, forgetting check.

    `scales`: adapter -> [(scale, label of its result)] when adapters ran at several strengths;
    adds the `scales` section (see `scale_section`).
    """
    labels = [r.label for r in results]
    base = results[0]
    datasets: dict[str, Any] = {}
    for name, first in base.datasets.items():
        metric_names = list(first["metrics"])
        entry: dict[str, Any] = {
            "path": first["path"], "n": first["n"],
            "metrics": {m: {r.label: r.datasets[name]["metrics"].get(m) for r in results} for m in metric_names},
            "primary_metric": primary_metric(first),
            "examples": [],
        }
        for i, ex in enumerate(first["examples"]):
            entry["examples"].append({
                "prompt": ex["prompt"], "reference": ex["reference"], "fact": ex.get("fact"), "kind": ex.get("kind"),
                "outputs": {r.label: r.datasets[name]["examples"][i]["output"] for r in results},
                "scores": {r.label: r.datasets[name]["examples"][i]["scores"] for r in results},
            })
        datasets[name] = entry
    forgetting = forgetting_check(results, general, retention_threshold, perplexity_threshold)
    summary = []
    for name, entry in datasets.items():
        for metric, values in entry["metrics"].items():
            summary.append({"metric": f"{name}: {metric}", "values": values,
                            "higher_is_better": metric not in LOWER_IS_BETTER})
    if forgetting.get("retention"):
        summary.append({"metric": "general answer retention", "values": {base.label: 1.0, **forgetting["retention"]},
                        "higher_is_better": True})
    if forgetting.get("perplexity"):
        summary.append({"metric": "general text perplexity", "values": forgetting["perplexity"],
                        "higher_is_better": False})
    comparison = {"labels": labels, "summary": summary, "datasets": datasets, "forgetting": forgetting}
    if scales:
        comparison["scales"] = scale_section(results, datasets, forgetting, scales)
    return comparison


def scale_section(results: Sequence[ModelResult], datasets: dict[str, Any], forgetting: dict[str, Any],
                  scales: dict[str, list[tuple[float, str]]]) -> dict[str, list[dict[str, Any]]]:
    """Per adapter, one entry per scale (ascending): every dataset's metrics, the primary metric of
    each non-general set, answer retention on the general set and general-text perplexity."""
    by_label = {r.label: r for r in results}
    general = forgetting.get("dataset")
    out: dict[str, list[dict[str, Any]]] = {}
    for adapter, runs in scales.items():
        rows = []
        for scale, label in sorted(runs):
            r = by_label[label]
            primary = {name: {"metric": entry["primary_metric"],
                              "value": r.datasets[name]["metrics"].get(entry["primary_metric"])}
                       for name, entry in datasets.items() if name != general and entry["primary_metric"]}
            rows.append({"scale": scale, "label": label,
                         "metrics": {name: d["metrics"] for name, d in r.datasets.items()},
                         "primary": primary,
                         "retention": (forgetting.get("retention") or {}).get(label),
                         "perplexity": r.text_perplexity})
        out[adapter] = rows
    return out


def forgetting_check(results: Sequence[ModelResult], general: str | None, retention_threshold: float,
                     perplexity_threshold: float) -> dict[str, Any]:
    base, tuned = results[0], results[1:]
    out: dict[str, Any] = {"threshold": retention_threshold, "perplexity_threshold": perplexity_threshold,
                           "warnings": []}
    if general is not None and general in base.datasets:
        metric = primary_metric(base.datasets[general])
        out["dataset"], out["metric"] = general, metric
        if metric is not None:
            out["retention"] = {r.label: retention(base.datasets[general], r.datasets[general], metric) for r in tuned}
            for label, value in out["retention"].items():
                if value is not None and value < retention_threshold:
                    out["warnings"].append(
                        f"{label} keeps {100 * value:.0f}% of the general answers the base model got right "
                        f"({general}, {metric}); below the {100 * retention_threshold:.0f}% threshold: it forgot")
    if base.text_perplexity is not None:
        out["perplexity"] = {r.label: r.text_perplexity for r in results}
        for r in tuned:
            if r.text_perplexity is not None and r.text_perplexity > base.text_perplexity * (1 + perplexity_threshold):
                rise = r.text_perplexity / base.text_perplexity - 1
                out["warnings"].append(
                    f"{r.label} raises perplexity on general text by {100 * rise:.0f}% "
                    f"({base.text_perplexity:.2f} -> {r.text_perplexity:.2f}); above the "
                    f"{100 * perplexity_threshold:.0f}% threshold")
    return out
