"""`lorakit sweep`: check the whole plan, then run its trials (resuming), writing the results after each.

Everything that can be wrong with the input (an unknown key, a value of the wrong type, an empty
grid, a metric no trial reports, a different plan in the sweep directory) is a one-line error
before the first trial starts. Results are rewritten atomically after every trial: sweep.json
(plan and state, what a rerun resumes from), sweep.csv and sweep.html.
"""

from __future__ import annotations

import difflib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.config import DEFAULT_METRICS, Config, load_config
from lorakit.errors import LorakitError
from lorakit.io import atomic_write_text
from lorakit.sweep import grid as g
from lorakit.sweep.evaluate import BASE_CACHE, Evaluation, base_result
from lorakit.sweep.page import render
from lorakit.sweep.results import best, csv_text, default_direction, ranked, score
from lorakit.sweep.runner import read_result, run_trial, start_worker, worker_result
from lorakit.sweep.search import raw_params, suggest
from lorakit.sweep.state import DONE, FAILED, PENDING, RUNNING, SweepState, TrialRecord, plan_difference


@dataclass
class SweepOptions:
    config: Path
    grid: list[str] = field(default_factory=list)
    paired: list[str] = field(default_factory=list)
    metric: str | None = None
    direction: str | None = None
    parallel: int = 1
    out: Path | None = None
    search: str = "grid"
    trials: int = 20
    ranges: list[str] = field(default_factory=list)
    seed: int = 0
    eval_data: list[str] = field(default_factory=list)
    general: str | None = None
    text: str | None = None
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    max_new_tokens: int = 64
    batch_size: int = 8
    retry_failed: bool = False
    sets: list[str] = field(default_factory=list)


@dataclass
class Sweep:
    """A checked plan: what run_sweep needs."""

    opts: SweepOptions
    cfg: Config
    axes: list[g.Axis]
    ranges: list[g.Range]
    ev: Evaluation
    metric: str
    direction: str
    out: Path
    plan: dict[str, Any]
    trials: list[TrialRecord]  # a grid's trials; an Optuna search asks its trials as it goes


def prepare(opts: SweepOptions) -> Sweep:
    """Read the config and the options (the command line first, then the config's sweep section), check all."""
    if opts.search not in ("grid", "optuna"):
        raise LorakitError(f"--search {opts.search!r}: choose grid or optuna")
    if opts.parallel < 1:
        raise LorakitError(f"--parallel must be >= 1, got {opts.parallel}")
    cfg = load_config(opts.config, opts.sets)
    own = bool(opts.grid or opts.paired or opts.ranges)
    axes = ([g.parse_grid(x) for x in (opts.grid if own else cfg.sweep.grid)]
            + [g.parse_paired(x) for x in (opts.paired if own else cfg.sweep.paired)])
    ranges = [g.parse_range(x) for x in opts.ranges]
    if opts.search == "grid":
        if ranges:
            raise LorakitError("--range is for --search optuna; a grid sweeps --grid / --paired values")
        g.check_axes(axes)
        params = g.expand(axes)
        values = g.check_values(opts.config, opts.sets, params)
        trials = [TrialRecord(i, p, v) for i, (p, v) in enumerate(zip(params, values))]
    else:
        trials = _check_search(opts, axes, ranges)
    ev = Evaluation(list(opts.eval_data or cfg.sweep.eval_data), opts.general or cfg.sweep.general,
                    opts.text or cfg.sweep.text, list(opts.metrics), opts.max_new_tokens, opts.batch_size)
    if ev.generates or ev.text:
        ev.metrics = ev.options().metrics
    metric = opts.metric or cfg.sweep.metric
    _check_metric(metric, ev.metric_names(cfg))
    direction = opts.direction or cfg.sweep.direction
    direction = default_direction(metric) if direction == "auto" else direction
    if direction not in ("min", "max"):
        raise LorakitError(f"--direction {direction!r}: choose min, max or auto")
    out = Path(opts.out or cfg.sweep.out or f"{cfg.output_dir.rstrip('/')}-sweep")
    plan = _plan(opts, axes, ranges, ev, metric, direction)
    return Sweep(opts, cfg, axes, ranges, ev, metric, direction, out, plan, trials)


def _check_search(opts: SweepOptions, axes: list[g.Axis], ranges: list[g.Range]) -> list[TrialRecord]:
    if not ranges and not axes:
        raise LorakitError("--search optuna needs --range KEY=LOW:HIGH[:log] (or --grid values to choose from)")
    if opts.trials < 1:
        raise LorakitError(f"--trials must be >= 1, got {opts.trials}")
    if axes:
        g.check_axes(axes)
    g.check_ranges(ranges)
    ends = [{r.key: (str(int(v)) if r.integer else repr(v))} for r in ranges for v in (r.low, r.high)]
    g.check_values(opts.config, opts.sets, ends + [p for a in axes for p in g.expand([a])])
    return []


def _check_metric(metric: str, names: list[str]) -> None:
    if metric in names:
        return
    close = difflib.get_close_matches(metric, names, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}? " if close else ""
    raise LorakitError(f"--metric {metric}: no trial will report it; {hint}the trials report {', '.join(names)}"
                       " (--eval-data adds generation metrics, --general retention, --text text_perplexity)")


def _plan(opts: SweepOptions, axes: list[g.Axis], ranges: list[g.Range], ev: Evaluation, metric: str,
          direction: str) -> dict[str, Any]:
    """What makes two sweeps the same sweep (see state.py)."""
    import hashlib

    config = Path(opts.config)
    plan: dict[str, Any] = {
        "config": str(config), "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
        "set": list(opts.sets), "search": opts.search, "axes": [a.to_json() for a in axes], "eval": ev.to_json(),
    }
    if opts.search == "optuna":
        plan.update(ranges=[r.to_json() for r in ranges], trials=opts.trials, seed=opts.seed,
                    objective={"metric": metric, "direction": direction})
    return plan


def open_state(sweep: Sweep) -> SweepState:
    """A new sweep directory, or the same plan's sweep.json continued (its unfinished trials to run)."""
    out = sweep.out
    state = SweepState.read(out)
    if state is None:
        # a base_eval.json alone is welcome: another sweep's base evaluation, used when its key matches
        if out.exists() and (not out.is_dir() or any(p.name != BASE_CACHE for p in out.iterdir())):
            raise LorakitError(f"{out} exists and holds no sweep.json; choose another --out (nothing is overwritten)")
        out.mkdir(parents=True, exist_ok=True)
        state = SweepState(sweep.plan, list(sweep.trials))
    else:
        differs = plan_difference(state.plan, sweep.plan)
        if differs is not None:
            raise LorakitError(f"{out} holds a sweep with a different plan ({differs} differs); use another --out, "
                               "or the same command to continue that sweep")
    state.metric, state.direction = sweep.metric, sweep.direction
    for t in state.trials:
        if t.status in (PENDING, RUNNING):  # a worker may have finished after the sweep was stopped
            result = read_result(out / t.name)
            t.status = PENDING
            if result is not None:
                t.record_result(result)
        if t.status == FAILED and sweep.opts.retry_failed:
            t.status, t.error = PENDING, None
    return state


def write_outputs(state: SweepState, out: Path) -> None:
    state.save(out)
    atomic_write_text(out / "sweep.csv", csv_text(state))
    atomic_write_text(out / "sweep.html", render(state, out.name))


def next_trial(sweep: Sweep, state: SweepState, busy: set[int]) -> TrialRecord | None:
    """The next trial to run: an unfinished one, else (Optuna) a new one asked of the sampler."""
    waiting = [t for t in state.trials if t.status == PENDING and t.index not in busy]
    if waiting:
        return waiting[0]
    if sweep.opts.search != "optuna" or len(state.trials) >= sweep.opts.trials:
        return None
    index = len(state.trials)
    history = [(t.search_params or {}, score(t, sweep.metric) if t.status == DONE else None)
               for t in state.trials if t.finished]
    sampled = suggest(index, sweep.opts.seed, sweep.ranges, sweep.axes, sweep.direction == "min", history)
    params = raw_params(sampled, sweep.ranges, sweep.axes)
    trial = TrialRecord(index, params, search_params=sampled)
    trial.values = g.check_values(sweep.opts.config, sweep.opts.sets, [params])[0]
    state.trials.append(trial)
    return trial


def run_sweep(opts: SweepOptions, console: Any) -> SweepState:
    """Check everything, then run every unfinished trial (N at a time), rewriting the outputs after each."""
    sweep = prepare(opts)
    state = open_state(sweep)
    todo = sum(t.status == PENDING for t in state.trials) + (
        max(0, opts.trials - len(state.trials)) if opts.search == "optuna" else 0)
    console.print(f"sweep {sweep.out}: {len(state.trials) if opts.search == 'grid' else opts.trials} trials, "
                  f"{todo} to run, ranked by {sweep.metric} ({sweep.direction})", markup=False)
    write_outputs(state, sweep.out)
    if todo and sweep.ev.needs_base:
        console.print("the base model's evaluation: read from base_eval.json, or run once and kept there", markup=False)
        base_result(sweep.ev, load_config(opts.config, opts.sets), sweep.out)
    if opts.parallel == 1:
        _run_in_process(sweep, state, console)
    else:
        _run_workers(sweep, state, console)
    _print_top(state, console)
    return state


def _finish(sweep: Sweep, state: SweepState, trial: TrialRecord, result: dict[str, Any], console: Any) -> None:
    trial.record_result(result)
    write_outputs(state, sweep.out)
    shown = " ".join(f"{k}={v}" for k, v in trial.params.items())
    what = (f"{sweep.metric} {score(trial, sweep.metric)}" if trial.status == DONE else f"failed: {trial.error}")
    console.print(f"{trial.name} ({shown}): {what} [{trial.elapsed_s} s]", markup=False, highlight=False)


def _run_in_process(sweep: Sweep, state: SweepState, console: Any) -> None:
    while (trial := next_trial(sweep, state, set())) is not None:
        trial.status = RUNNING
        write_outputs(state, sweep.out)
        _finish(sweep, state, trial, run_trial(sweep.out, state.plan, trial), console)


def _run_workers(sweep: Sweep, state: SweepState, console: Any) -> None:
    """--parallel N: N worker processes at once, cores // N torch threads each."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // sweep.opts.parallel)
    console.print(f"{sweep.opts.parallel} trials at a time, {threads} torch threads each ({cores} cores)", markup=False)
    running: dict[int, tuple[TrialRecord, Any]] = {}
    try:
        while True:
            while len(running) < sweep.opts.parallel and (trial := next_trial(sweep, state, set(running))):
                trial.status = RUNNING
                write_outputs(state, sweep.out)
                running[trial.index] = (trial, start_worker(sweep.out, trial, threads))
            if not running:
                return
            _reap(sweep, state, running, console, lambda: time.sleep(0.2))
    finally:
        for _, proc in running.values():  # interrupted: the workers stop too; their trials resume next time
            proc.terminate()


def _reap(sweep: Sweep, state: SweepState, running: dict[int, tuple[TrialRecord, Any]], console: Any,
          wait: Callable[[], None]) -> None:
    finished = [i for i, (_, proc) in running.items() if proc.poll() is not None]
    if not finished:
        wait()
    for i in finished:
        trial, proc = running.pop(i)
        _finish(sweep, state, trial, worker_result(sweep.out, trial, proc), console)


def _print_top(state: SweepState, console: Any, k: int = 5) -> None:
    top = best(state.trials, state.metric, state.direction)
    for t in ranked(state.trials, state.metric, state.direction)[:k]:
        if score(t, state.metric) is None:
            break
        shown = " ".join(f"{key}={v}" for key, v in t.params.items())
        mark = "  <- best" if t is top else ""
        console.print(f"  {t.name}  {state.metric} {score(t, state.metric):.4g}  {shown}{mark}", markup=False,
                      highlight=False)
    failed = [t for t in state.trials if t.status == FAILED]
    if failed:
        console.print(f"{len(failed)} trial(s) failed (errors in sweep.csv; --retry-failed runs them again)",
                      markup=False)
