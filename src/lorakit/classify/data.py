"""Labelled rows for `task: classification`: reading, the label set, the prompt, classification.json.

A row is a text and (in training and evaluation data) a label. The label set comes from the
training data (sorted) or from `classification.labels`; everything else is checked against it,
and each mistake is a one-line error naming the file, the row and the label.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lorakit.data.readers import iter_records
from lorakit.errors import DataError, LorakitError
from lorakit.io import atomic_write_text

TASK_FILE = "classification.json"
"""Written next to a classifier's weights (adapter/ or model/) and in the run directory."""
DEFAULT_PROMPT = "{text}\n\nAnswer with one of: {labels}."


@dataclass
class Row:
    text: str
    label: str | None
    row: int
    """1-based row number in its file, for error messages."""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskSpec:
    """What reloading a classifier needs beside its weights: classification.json."""

    method: str  # lm_label | head
    labels: list[str]
    prompt: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    template: str = "auto"
    system_prompt: str | None = None
    max_length: int = 512
    base_model: str | None = None
    training: str = "lora"  # lora | full | none (an untuned model)

    def write(self, directory: Path) -> None:
        atomic_write_text(Path(directory) / TASK_FILE, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, directory: str | Path) -> TaskSpec | None:
        """classification.json in `directory`; None when there is none."""
        path = Path(directory) / TASK_FILE
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            names = {f.name for f in fields(cls)}
            spec = cls(**{k: v for k, v in data.items() if k in names})
        except (OSError, ValueError, TypeError) as err:
            raise LorakitError(f"{path} cannot be read ({err}); the classifier's metadata is damaged") from None
        if spec.method not in ("lm_label", "head") or not isinstance(spec.labels, list) or len(spec.labels) < 2:
            raise LorakitError(f"{path}: method {spec.method!r} / labels {spec.labels!r} are not a classifier's; "
                               "the metadata is damaged")
        return spec

    def user_text(self, text: str) -> str:
        """The user turn of the lm_label method: the prompt around the text."""
        prompt = self.prompt or DEFAULT_PROMPT
        return prompt.replace("{labels}", ", ".join(self.labels)).replace("{text}", text)


def read_rows(path: str | Path, text_column: str, label_column: str | None) -> list[Row]:
    """Every row's text (non-empty) and, when `label_column` is given, its label (present, non-empty)."""
    rows = []
    for n, record in enumerate(iter_records(path), 1):
        if text_column not in record:
            raise DataError(f"{path} row {n}: no column {text_column!r} (columns: {', '.join(record)}); "
                            "set data.text_column")
        text = record[text_column]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path} row {n}: the text ({text_column!r}) is empty; remove the row or give it text")
        label = None
        if label_column is not None:
            value = record.get(label_column)
            if value is None or not str(value).strip():
                raise DataError(f"{path} row {n}: no label in column {label_column!r}; label the row or remove it "
                                "(set data.label_column if the labels are in another column)")
            label = str(value)
        meta = {k: v for k, v in record.items() if k not in (text_column, label_column)}
        rows.append(Row(text, label, n, meta))
    return rows


def label_set(rows: list[Row], path: str | Path, declared: list[str] | None) -> list[str]:
    """The labels of a training set: `declared` (every row's label must be in it), else the sorted labels seen."""
    if declared is not None:
        labels = [str(x) for x in declared]
        check_labels(rows, labels, path, "in classification.labels")
        return labels
    labels = sorted({r.label for r in rows if r.label is not None})
    if len(labels) < 2:
        only = labels[0] if labels else None
        raise DataError(f"{path}: the label column holds one class ({only!r}) in all {len(rows)} rows; "
                        "classification needs at least two labels")
    return labels


def check_labels(rows: list[Row], labels: list[str], path: str | Path, where: str = "in the training data") -> None:
    """Every row's label is one of `labels`; the first that is not is a one-line error."""
    known = set(labels)
    for r in rows:
        if r.label is not None and r.label not in known:
            raise DataError(f"{path} row {r.row}: label {r.label!r} is not {where} (labels: {', '.join(labels)}); "
                            "fix the row or add the label there")
