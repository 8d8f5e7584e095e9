"""`lorakit train` with task: classification, and evaluating classifiers (`lorakit eval` / `compare`).

lm_label runs the ordinary training loop (train.loop) on the rows rendered as conversations (the
prompt around the text as the user turn, the label as the answer: SFT on the label tokens);
head runs classify.head_train. Both write classification.json beside the weights and, when the
config names data.test (else data.eval), classify_eval.json (metrics per model) for report.html.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

from lorakit.classify.data import TaskSpec, check_labels, label_set, read_rows
from lorakit.classify.predict import Classifier, load_classifier
from lorakit.config import Config, dump_config
from lorakit.errors import LorakitError
from lorakit.eval.classification import classification_metrics
from lorakit.io import atomic_write_text

EVAL_FILE = "classify_eval.json"


def task_spec(cfg: Config, training: str | None = None) -> tuple[TaskSpec, list]:
    """The spec a config describes (labels from data.train, checked) and the training rows."""
    path = cfg.data.train_files[0] if len(cfg.data.train_files) == 1 else None
    if path is None:
        raise LorakitError("task: classification takes one data.train file")
    rows = read_rows(path, cfg.data.text_column, cfg.data.label_column)
    labels = label_set(rows, path, cfg.classification.labels)
    spec = TaskSpec(cfg.classification.method, labels, cfg.classification.prompt, cfg.data.text_column,
                    cfg.data.label_column, cfg.data.template, cfg.data.system_prompt, cfg.data.max_length,
                    cfg.model.name, training or cfg.adapter.method)
    return spec, rows


def labelled_split(path: str | Path, spec: TaskSpec, where: str = "in the training data") -> list:
    rows = read_rows(path, spec.text_column, spec.label_column)
    check_labels(rows, spec.labels, path, where)
    return rows


def train_classifier(cfg: Config, console: Any, nproc: int | None = None, resume: bool = False) -> Path:
    """Train the classifier `cfg` describes; returns the run directory (a new one: nothing in an old run is
    replaced)."""
    if nproc is not None or resume:
        raise LorakitError(f"task: classification trains in one process from the start; drop "
                           f"{'--nproc' if nproc is not None else '--resume'}")
    run_dir = Path(cfg.output_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise LorakitError(f"output_dir {run_dir} exists and is not an empty directory; choose another with "
                           "--set output_dir=...")
    spec, rows = task_spec(cfg)
    held = [labelled_split(p, spec) for p in (cfg.data.eval, cfg.data.test) if p]  # label errors before training
    console.print(f"classification ({spec.method}, {cfg.adapter.method}): {len(rows)} rows, labels "
                  f"{', '.join(spec.labels)}")
    if spec.method == "lm_label":
        weights = _train_lm_label(cfg, spec, rows, held[0] if cfg.data.eval else None, console)
    else:
        from lorakit.classify.head_run import train_head_classifier

        weights = train_head_classifier(cfg, spec, rows, console)
    spec.write(weights)
    spec.write(run_dir)
    test = cfg.data.test or cfg.data.eval
    if test:
        clf = load_classifier(None, weights, dtype=cfg.model.dtype, name=cfg.adapter.method)
        result = evaluate(clf, labelled_split(test, spec), str(test))
        atomic_write_text(run_dir / EVAL_FILE, json.dumps({"data": str(test), "results": [result]}, indent=2) + "\n")
        console.print(summary_line(result))
    from lorakit.eval.report import write_report

    write_report(run_dir)
    return run_dir


def _train_lm_label(cfg: Config, spec: TaskSpec, rows: list, eval_rows: list | None, console: Any) -> Path:
    """The rows as conversations in run_dir/classify_data/, then the ordinary training loop on them."""
    from lorakit.classify.lm_label import conversation, fit_text, text_room
    from lorakit.models.load import load_tokenizer
    from lorakit.train.loop import train

    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code, cfg.model.revision)
    room = text_room(spec, tokenizer)
    data_dir = Path(cfg.output_dir) / "classify_data"
    data_dir.mkdir(parents=True, exist_ok=True)

    def write(name: str, part: list) -> str:
        lines = [json.dumps({"messages": conversation(spec, fit_text(r.text, room, tokenizer), r.label)}) for r in part]
        atomic_write_text(data_dir / name, "".join(line + "\n" for line in lines))
        return str(data_dir / name)

    inner = copy.deepcopy(cfg)
    inner.task, inner.data.format, inner.data.test = "sft", "messages", None
    inner.data.train = write("train.jsonl", rows)
    inner.data.eval = write("eval.jsonl", eval_rows) if eval_rows else None
    train(inner, console=console)
    dump_config(cfg, Path(cfg.output_dir) / "config.yaml")  # the user's config, not the inner one
    out = Path(cfg.output_dir)
    return out / "adapter" if (out / "adapter").exists() else out / "model"


def evaluate(clf: Classifier, rows: list, data: str, batch_size: int = 8, progress: Any = None) -> dict[str, Any]:
    """Metrics and per-row predictions of one classifier on labelled rows."""
    start = time.perf_counter()
    probs = clf.probabilities([r.text for r in rows], batch_size, progress).numpy()
    elapsed = time.perf_counter() - start
    metrics = classification_metrics([r.label for r in rows], probs, clf.spec.labels)
    predictions = [{"row": r.row, "label": r.label, "predicted": clf.spec.labels[int(p.argmax())],
                    "probabilities": {lab: round(float(x), 6) for lab, x in zip(clf.spec.labels, p)}}
                   for r, p in zip(rows, probs)]
    return {"name": clf.name, "data": data, "method": clf.spec.method, "training": clf.spec.training,
            "metrics": metrics, "elapsed_s": round(elapsed, 2), "predictions": predictions}


def summary_line(result: dict[str, Any]) -> str:
    m = result["metrics"]
    return (f"{result['name']}: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, ECE {m['ece']:.4f} "
            f"({m['n']} rows)")
