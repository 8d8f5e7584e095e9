"""Metrics: one JSON object per event in metrics.jsonl, optional TensorBoard, a rich progress bar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.io import atomic_write_text


class MetricsLog:
    """Append-only metrics.jsonl (flushed per line); TensorBoard scalars when asked for."""

    def __init__(self, run_dir: Path, tensorboard: bool = False, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self._fh = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise LorakitError("train.tensorboard needs the tensorboard package: pip install tensorboard") from None
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """A killed run may have logged steps past its last checkpoint; a resume redoes them."""
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the kill
            if event.get("step", 0) <= step and event.get("event") != "end":
                kept.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def write(self, event: str, **fields: Any) -> None:
        record = {"event": event, **fields}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None and "step" in fields:
            for key, value in fields.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(f"{event}/{key}", value, fields["step"])

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def progress_bar(console: Any, disable: bool = False) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
        transient=False,
    )
