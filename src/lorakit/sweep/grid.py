"""What a sweep runs: --grid / --paired axes and --range bounds parsed, expanded and checked.

A trial is a list of config overrides (the `--set key=value` strings `lorakit train` takes);
every key is a config field's dotted name and every value is checked through the config's own
validation (config.load_config) before any trial starts, so a typo or a value of the wrong type
is a one-line error naming the key and the value, not a failed trial an hour in.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.config import Config, ConfigError, load_config
from lorakit.errors import LorakitError

# never swept: where each trial writes is the sweep's choice, and the sweep section describes the sweep itself
FIXED_KEYS = ("output_dir",)
FIXED_SECTIONS = ("sweep",)


@dataclass
class Axis:
    """One --grid key (one key) or one --paired group (keys that move together): its points in order."""

    keys: list[str]
    points: list[list[str]]  # per point, one raw value string per key

    def to_json(self) -> dict[str, Any]:
        return {"keys": self.keys, "points": self.points}


@dataclass
class Range:
    """One --range KEY=lo:hi[:log] for the Optuna search."""

    key: str
    low: float
    high: float
    log: bool = False
    integer: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def split_values(text: str, sep: str = ",") -> list[str]:
    """Split at `sep` outside brackets, so a YAML list value such as [q_proj,v_proj] stays whole."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == sep and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def parse_grid(item: str) -> Axis:
    """ "train.lr=5e-4,1e-3" -> Axis(["train.lr"], [["5e-4"], ["1e-3"]])."""
    key, sep, values = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise LorakitError(f"--grid {item!r}: expected KEY=V1,V2,..., e.g. --grid train.lr=5e-4,1e-3,2e-3")
    points = [v for v in split_values(values) if v != ""]
    if not points:
        raise LorakitError(f"--grid {item!r}: no values; give KEY=V1,V2,... with at least one value")
    if len(set(points)) != len(points):
        raise LorakitError(f"--grid {item!r}: a value is given twice; give each value once")
    return Axis([key], [[v] for v in points])


def parse_paired(item: str) -> Axis:
    """ "adapter.r,adapter.alpha=8:16,16:32" -> the keys and one value per key at each point."""
    keys_text, sep, values = item.partition("=")
    keys = [k.strip() for k in keys_text.split(",")]
    example = "e.g. --paired adapter.r,adapter.alpha=8:16,16:32"
    if not sep or len(keys) < 2 or not all(keys):
        raise LorakitError(f"--paired {item!r}: expected K1,K2=a1:b1,a2:b2 (two or more keys), {example}")
    points = []
    for point in split_values(values):
        if not point:
            continue
        parts = split_values(point, ":")
        if len(parts) != len(keys) or not all(parts):
            raise LorakitError(f"--paired {item!r}: {point!r} has {len(parts)} values for {len(keys)} keys; "
                               f"give one value per key, separated by ':', {example}")
        points.append(parts)
    if not points:
        raise LorakitError(f"--paired {item!r}: no values; {example}")
    return Axis(keys, points)


def parse_range(item: str) -> Range:
    """ "train.lr=1e-5:1e-2:log" -> Range (the key's type, int or float, is filled by check_ranges)."""
    key, sep, spec = item.partition("=")
    parts = spec.split(":")
    example = "e.g. --range train.lr=1e-5:1e-2:log"
    if not sep or not key.strip() or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
        raise LorakitError(f"--range {item!r}: expected KEY=LOW:HIGH or KEY=LOW:HIGH:log, {example}")
    try:
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise LorakitError(f"--range {item!r}: LOW and HIGH must be numbers, {example}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise LorakitError(f"--range {item!r}: LOW must be below HIGH (got {low:g} and {high:g}), {example}")
    if len(parts) == 3 and low <= 0:
        raise LorakitError(f"--range {item!r}: a log range needs LOW > 0, got {low:g}")
    return Range(key.strip(), low, high, log=len(parts) == 3)


def expand(axes: list[Axis]) -> list[dict[str, str]]:
    """The cartesian product of the axes, first axis slowest: one {key: raw value} per trial."""
    trials = []
    for combo in itertools.product(*[axis.points for axis in axes]):
        params: dict[str, str] = {}
        for axis, point in zip(axes, combo):
            params.update(zip(axis.keys, point))
        trials.append(params)
    return trials


# ----------------------------------------------------------------------------- checking against the config


def config_keys(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every settable dotted name of the config -> its type hint (nested sections, optional ones too)."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        section = tp if dataclasses.is_dataclass(tp) else (inner[0] if inner else None)
        if section is not None:
            out.update(config_keys(section, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


def check_key(key: str, flag: str) -> None:
    """A key a sweep may set, or a one-line error with the closest valid name."""
    if key in FIXED_KEYS or key.split(".")[0] in FIXED_SECTIONS:
        raise LorakitError(f"{flag} {key}: the sweep sets this itself; sweep a training setting instead")
    valid = [k for k in config_keys() if k not in FIXED_KEYS and k.split(".")[0] not in FIXED_SECTIONS]
    if key in valid:
        return
    same_leaf = [k for k in valid if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    close = same_leaf or difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else "see `lorakit config show` for the valid names"
    raise LorakitError(f"{flag} {key}: unknown config key; {hint}")


def check_axes(axes: list[Axis]) -> None:
    """Known keys, each swept once; at least one trial."""
    if not axes:
        raise LorakitError("nothing to sweep: give --grid KEY=V1,V2,... or --paired K1,K2=a1:b1,a2:b2 "
                           "(or sweep.grid in the config)")
    seen: set[str] = set()
    for axis in axes:
        flag = "--grid" if len(axis.keys) == 1 else "--paired"
        for key in axis.keys:
            check_key(key, flag)
            if key in seen:
                raise LorakitError(f"{flag} {key}: this key is swept twice; give it in one --grid or --paired only")
            seen.add(key)


def resolved_value(cfg: Config, key: str) -> Any:
    """The value at a dotted key of a loaded config (None inside an unset optional section)."""
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part, None)
    return node


def load_trial_config(config: Path | None, sets: list[str], params: dict[str, str], output_dir: str) -> Config:
    """The config one trial trains with: the file, the sweep's --set, the trial's values, its directory."""
    return load_config(config, [*sets, *(f"{k}={v}" for k, v in params.items()), f"output_dir={output_dir}"])


def check_values(config: Path | None, sets: list[str], trials: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Every value alone, then every trial whole, through the config's validation; the typed values per trial.

    A problem is one line naming the key and the value (the first problem; fix it and run again).
    """
    for key, raw in dict.fromkeys((k, v) for t in trials for k, v in t.items()):
        try:
            load_config(config, [*sets, f"{key}={raw}"])
        except ConfigError as err:
            raise LorakitError(f"sweep value {key}={raw}: {_problem(err, config, key)}") from None
    typed = []
    for i, params in enumerate(trials):
        try:
            cfg = load_trial_config(config, sets, params, "sweep-check")
        except ConfigError as err:
            shown = " ".join(f"{k}={v}" for k, v in params.items())
            raise LorakitError(f"trial {i} ({shown}): {_problem(err, config, None)}") from None
        typed.append({k: resolved_value(cfg, k) for k in params})
    return typed


def _problem(err: ConfigError, config: Path | None, key: str | None) -> str:
    """The config problem about `key` (else the first), without the file-name prefix load_config adds."""
    prefix = f"{config if config is not None else 'config'}: "
    lines = [p.removeprefix(prefix) for p in err.problems or [str(err)]]
    return next((p for p in lines if key is not None and p.startswith(f"{key}:")), lines[0])


def check_ranges(ranges: list[Range]) -> None:
    """Each --range key is a number field (int or float) of the config; sets Range.integer."""
    keys = config_keys()
    for r in ranges:
        check_key(r.key, "--range")
        tp = keys[r.key]
        if tp not in (int, float):
            raise LorakitError(f"--range {r.key}: a range needs a number setting; {r.key} is not one "
                               "(sweep it with --grid instead)")
        r.integer = tp is int
        if r.integer and (r.low != int(r.low) or r.high != int(r.high)):
            raise LorakitError(f"--range {r.key}={r.low:g}:{r.high:g}: {r.key} is an integer setting; "
                               "give whole-number bounds")
