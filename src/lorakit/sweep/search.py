"""`--search optuna`: the next trial's values from Optuna's TPE sampler, given the trials so far.

Trial i is always asked of a fresh study seeded with `seed + i` that holds every earlier finished
trial (its values and score): the same seed and the same scores give the same trials, whether
the sweep ran in one go or was resumed. Number settings come from --range (float or int, log
optional); --grid keys and --paired groups are categorical choices.
"""

from __future__ import annotations

import math
from typing import Any

from lorakit.errors import LorakitError
from lorakit.sweep.grid import Axis, Range


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise LorakitError("--search optuna needs the optuna package: pip install 'lorakit[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def distributions(ranges: list[Range], axes: list[Axis]) -> dict[str, Any]:
    """One Optuna distribution per --range key and per --grid / --paired axis (named by its keys)."""
    optuna = _optuna()
    dists: dict[str, Any] = {}
    for r in ranges:
        if r.integer:
            dists[r.key] = optuna.distributions.IntDistribution(int(r.low), int(r.high), log=r.log)
        else:
            dists[r.key] = optuna.distributions.FloatDistribution(r.low, r.high, log=r.log)
    for axis in axes:
        dists[",".join(axis.keys)] = optuna.distributions.CategoricalDistribution([":".join(p) for p in axis.points])
    return dists


def raw_params(sampled: dict[str, Any], ranges: list[Range], axes: list[Axis]) -> dict[str, str]:
    """Optuna's values -> the trial's {config key: raw value string} (as --set takes them)."""
    out: dict[str, str] = {}
    for r in ranges:
        value = sampled[r.key]
        out[r.key] = str(int(value)) if r.integer else repr(float(value))
    for axis in axes:
        choice = sampled[",".join(axis.keys)]
        point = next(p for p in axis.points if ":".join(p) == choice)
        out.update(zip(axis.keys, point))
    return out


def suggest(index: int, seed: int, ranges: list[Range], axes: list[Axis], minimize: bool,
            history: list[tuple[dict[str, Any], float | None]]) -> dict[str, Any]:
    """Optuna's values for trial `index` (TPE, seeded with seed + index) after `history`:
    (Optuna values, score or None for a failed trial) of every earlier trial that ended."""
    optuna = _optuna()
    dists = distributions(ranges, axes)
    study = optuna.create_study(direction="minimize" if minimize else "maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed + index))
    for params, score in history:
        done = score is not None and math.isfinite(score)
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=dists, value=score if done else None,
            state=optuna.trial.TrialState.COMPLETE if done else optuna.trial.TrialState.FAIL))
    return dict(study.ask(dists).params)
