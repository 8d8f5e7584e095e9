"""sweep.json: the plan and every trial's state, the one file a sweep resumes from.

The plan (config file and its hash, --set, the axes or ranges, the evaluation) decides whether a
second `lorakit sweep` in the same directory continues the sweep or is refused: a different plan
never reuses or overwrites trials. What ranks the trials (--metric, --direction) is not part of
a grid's plan, so a finished sweep can be ranked again by another metric without training;
for an Optuna search it steers the sampling and is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.io import atomic_write_text

STATE_NAME = "sweep.json"
TRIAL_RESULT = "trial.json"  # in each trial's run directory, written by whoever ran it
VERSION = 1
PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"


@dataclass
class TrialRecord:
    index: int
    params: dict[str, str]  # config key -> raw value (the --set string)
    values: dict[str, Any] = field(default_factory=dict)  # config key -> the value as the config reads it
    search_params: dict[str, Any] | None = None  # Optuna's own values (for the next trials' history)
    status: str = PENDING
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float | None = None

    @property
    def name(self) -> str:
        return trial_name(self.index)

    @property
    def finished(self) -> bool:
        return self.status in (DONE, FAILED)

    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.params.items()]

    def record_result(self, result: dict[str, Any]) -> None:
        self.status, self.error = result["status"], result.get("error")
        self.metrics, self.elapsed_s = dict(result.get("metrics") or {}), result.get("elapsed_s")


def trial_name(index: int) -> str:
    return f"trial-{index:03d}"


@dataclass
class SweepState:
    plan: dict[str, Any]
    trials: list[TrialRecord] = field(default_factory=list)
    metric: str = "eval_loss"
    direction: str = "min"

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "plan": self.plan, "metric": self.metric, "direction": self.direction,
                "trials": [dict(asdict(t), name=t.name) for t in self.trials]}

    def save(self, sweep_dir: Path) -> None:
        atomic_write_text(sweep_dir / STATE_NAME, json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n")

    @classmethod
    def read(cls, sweep_dir: Path) -> SweepState | None:
        """The sweep.json in sweep_dir (None when there is none); a damaged one is a one-line error."""
        path = sweep_dir / STATE_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            trials = [TrialRecord(**{k: v for k, v in t.items() if k != "name"}) for t in data["trials"]]
            return cls(data["plan"], trials, data["metric"], data["direction"])
        except (ValueError, KeyError, TypeError) as err:
            raise LorakitError(f"{path} is damaged ({type(err).__name__}: {err}); move it away and run the "
                               "sweep into a new --out directory") from None


def plan_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first plan field that differs (None when the plans are the same)."""
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return key
    return None
