"""The CLI's classification paths: `lorakit eval` / `compare` on classifiers, and `lorakit disagree`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.classify.data import TaskSpec, check_labels, read_rows
from lorakit.classify.predict import Classifier, load_classifier
from lorakit.classify.run import evaluate, summary_line, task_spec
from lorakit.errors import LorakitError
from lorakit.io import atomic_write_text


def config_spec(config: Path | None) -> TaskSpec | None:
    """The TaskSpec of a `task: classification` config (labels from its data.train); None without a config."""
    if config is None:
        return None
    from lorakit.config import load_config

    cfg = load_config(config)
    if cfg.task != "classification":
        raise LorakitError(f"{config} is not a classification config (task: {cfg.task}); set task: classification")
    return task_spec(cfg, training="none")[0]


def is_classification(model: str | None, adapters: list[Path], config: Path | None) -> bool:
    """Whether eval / compare should score classifiers: a classification config, or classification.json beside
    the weights."""
    if config is not None:
        return True
    dirs = [*adapters, *([Path(model)] if model and Path(model).is_dir() else [])]
    return any((d / "classification.json").exists() for d in dirs)


def metrics_table(results: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    labels = results[0]["metrics"]["labels"]
    table = Table(title="classification", show_lines=False)
    for head in ["model", "accuracy", "macro-F1", "ECE", *[f"{lab} P/R" for lab in labels], "s"]:
        table.add_column(head, overflow="fold")
    for r in results:
        m = r["metrics"]
        pr = [f"{m['per_class'][lab]['precision']:.3f}/{m['per_class'][lab]['recall']:.3f}" for lab in labels]
        table.add_row(r["name"], f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}", f"{m['ece']:.4f}", *pr,
                      f"{r['elapsed_s']:.0f}")
    return table


def run_classification_eval(model: str | None, adapters: list[Path], data: list[Path], config: Path | None,
                            out: Path | None, batch_size: int, limit: int | None, dtype: str, console: Any,
                            with_base: bool = False) -> list[dict[str, Any]]:
    """Score each classifier (the untuned base first when `with_base`) on each labelled file; --out JSON."""
    spec = config_spec(config)
    if not data:
        raise LorakitError("give --data FILE (rows with the text and label columns)")
    if not adapters and model is None:
        raise LorakitError("give --model and/or --adapter")
    targets: list[tuple[str | None, Path | None]] = [(model, a) for a in adapters]
    if with_base or not adapters:
        base_spec = spec or (TaskSpec.read(adapters[0]) if adapters else None)
        if base_spec is not None and base_spec.method == "head" and adapters:
            console.print("the untuned base is left out: a head method's fresh head has not been trained")
        else:
            targets.insert(0, (model or (base_spec.base_model if base_spec else None), None))
    results = []
    for m, a in targets:
        clf = load_classifier(m, a, _untuned(spec, a, adapters), dtype, name=str(a) if a else f"{m} (untuned)")
        for path in data:
            rows = read_rows(path, clf.spec.text_column, clf.spec.label_column)[:limit]
            check_labels(rows, clf.spec.labels, path, "in the classifier's label set")
            results.append(evaluate(clf, rows, str(path), batch_size))
            console.print(summary_line(results[-1]), highlight=False, markup=False)
    console.print(metrics_table(results))
    if out is not None:
        atomic_write_text(out, json.dumps({"results": results}, indent=2) + "\n")
        console.print(f"wrote {out}", highlight=False, markup=False)
    return results


def _untuned(spec: TaskSpec | None, adapter: Path | None, adapters: list[Path]) -> TaskSpec | None:
    """The spec an untuned model is scored with: the config's, else the first adapter's (its labels and prompt)."""
    if adapter is not None or spec is not None:
        return spec
    first = TaskSpec.read(adapters[0]) if adapters else None
    if first is None:
        return None
    return TaskSpec(**{**first.__dict__, "training": "none"})


@dataclass
class ModelArg:
    model: str | None = None
    adapter: Path | None = None


def parse_model_args(args: list[str]) -> list[ModelArg]:
    """`--model A [--adapter X] --model B ...` in order: each --adapter belongs to the --model before it (an
    --adapter with none before it, or after another --adapter, stands alone: its recorded base)."""
    models: list[ModelArg] = []
    it = iter(args)
    for flag in it:
        value = next(it, None)
        if flag not in ("--model", "--adapter") or value is None or value.startswith("--"):
            raise LorakitError(f"disagree: unexpected {flag!r}; give --model NAME [--adapter DIR] for each model")
        if flag == "--model":
            models.append(ModelArg(model=value))
        elif models and models[-1].adapter is None:
            models[-1].adapter = Path(value)
        else:
            models.append(ModelArg(adapter=Path(value)))
    if len(models) < 2:
        raise LorakitError(f"disagree needs at least two models, got {len(models)}; repeat --model (and --adapter)")
    return models


@dataclass
class Labelled:
    names: list[str]
    labels: list[str]
    probs: np.ndarray  # (M, N, K)
    texts: list[str]
    gold: list[str] | None = None
    rows: list[int] = field(default_factory=list)


def label_everything(classifiers: list[Classifier], data: Path, gold_column: str | None, batch_size: int,
                     limit: int | None, console: Any) -> Labelled:
    """Every model's probabilities on every row of `data`, in one label order (the first model's)."""
    labels = classifiers[0].spec.labels
    for clf in classifiers[1:]:
        if sorted(clf.spec.labels) != sorted(labels):
            raise LorakitError(f"{clf.name} has labels {clf.spec.labels}, {classifiers[0].name} has {labels}; "
                               "the models must share one label set")
    rows = read_rows(data, classifiers[0].spec.text_column, gold_column)[:limit]
    if gold_column is not None:
        check_labels(rows, labels, data, "in the models' label set")
    texts = [r.text for r in rows]
    probs = []
    for clf in classifiers:
        p = clf.probabilities(texts, batch_size).numpy()
        probs.append(p[:, [clf.spec.labels.index(lab) for lab in labels]])
        console.print(f"labelled {len(texts)} rows with {clf.name}", highlight=False, markup=False)
    gold = [r.label for r in rows] if gold_column is not None else None
    return Labelled([c.name for c in classifiers], labels, np.stack(probs), texts, gold, [r.row for r in rows])
