"""Early stopping on a generation metric (config `train.early_stop`).

After each generation eval (config `eval:`, every `eval.every` steps) the loop hands the
metrics to `EarlyStop.update`: a new best (strictly higher) is kept as adapter-best/; after
`patience` evals in a row without one, training stops and finishes normally (final adapter,
eval.json, report). The state travels in checkpoints, so a resumed run keeps its best and count,
and a run that stopped stays stopped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lorakit.errors import LorakitError


@dataclass
class EarlyStop:
    metric: str
    patience: int
    best: float | None = None
    best_step: int | None = None
    bad: int = 0  # generation evals in a row without a new best
    stopped_at: int | None = None  # set by the loop when it stops

    def update(self, step: int, value: float | None) -> bool:
        """Record the metric's value at `step` (None: not scored, no improvement); True when it is a new best."""
        if value is not None and (self.best is None or value > self.best):
            self.best, self.best_step, self.bad = value, step, 0
            return True
        self.bad += 1
        return False

    @property
    def patience_spent(self) -> bool:
        return self.bad >= self.patience

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None

    def state(self) -> dict[str, Any]:
        return asdict(self)

    def restore(self, state: dict[str, Any] | None) -> None:
        """Continue from a checkpoint's state (one written with the same metric; else start afresh)."""
        if state and state.get("metric") == self.metric:
            self.best, self.best_step = state.get("best"), state.get("best_step")
            self.bad, self.stopped_at = int(state.get("bad", 0)), state.get("stopped_at")


def check_rows(metric: str, targets: list[Any]) -> None:
    """Fail before training when the generation eval could never score `metric`."""
    if not targets:
        raise LorakitError("train.early_stop needs eval rows to generate answers for, and the eval split has none; "
                           "set data.eval or data.eval_ratio > 0")
    if metric in ("fact", "label") and not any(getattr(t, metric) for t in targets):  # Target.fact / .label
        raise LorakitError(f"train.early_stop.metric is {metric}, but none of the {len(targets)} generation eval rows "
                           f"has a `{metric}` field; add it to the eval rows or stop on another metric")
