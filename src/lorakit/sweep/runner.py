"""One trial: `lorakit train`'s run in SWEEP_DIR/trial-NNN, then what the trial reports.

A trial runs in this process (--parallel 1) or as a worker process (`python -m lorakit.sweep.runner
SWEEP_DIR INDEX`, --parallel N: N at once, each with cores // N torch threads). Either way it
writes its result to trial-NNN/trial.json; the sweep reads it back. A run directory that already
holds a run (a trial killed midway) is continued with train's resume: from its newest checkpoint,
or from step 0 when it saved none; a trial whose training finished but whose evaluation did not
is only evaluated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.io import atomic_write_text
from lorakit.sweep.evaluate import Evaluation, base_result, run_metrics, trial_metrics
from lorakit.sweep.grid import load_trial_config
from lorakit.sweep.state import DONE, FAILED, TRIAL_RESULT, SweepState, TrialRecord


def one_line(err: BaseException) -> str:
    """What a failed trial records: a user error's first line, or the exception's type and first line."""
    first = (str(err).strip().splitlines() or [""])[0][:300]
    if isinstance(err, LorakitError):
        return first or type(err).__name__
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def trained(run_dir: Path) -> bool:
    """The run finished training: its eval.json is written after the adapter (or model)."""
    return (run_dir / "eval.json").is_file() and ((run_dir / "adapter").is_dir() or (run_dir / "model").is_dir())


def run_trial(sweep_dir: Path, plan: dict[str, Any], trial: TrialRecord, console: Any = None) -> dict[str, Any]:
    """Train (or continue) and evaluate one trial; its result, also written to trial-NNN/trial.json."""
    from lorakit.train.loop import train

    run_dir = sweep_dir / trial.name
    started = time.perf_counter()
    try:
        config = Path(plan["config"]) if plan["config"] else None
        cfg = load_trial_config(config, plan["set"], trial.params, str(run_dir))
        if not trained(run_dir):
            resume = (run_dir / "config.yaml").exists() or (run_dir / "checkpoints").exists()
            train(cfg, resume=resume, console=console, quiet=console is None)
        metrics = run_metrics(run_dir)
        ev = Evaluation(**plan["eval"])
        if ev.generates or ev.text:
            base_cfg = load_trial_config(config, plan["set"], {}, str(run_dir))
            base = base_result(ev, base_cfg, sweep_dir) if ev.needs_base else None
            metrics.update(trial_metrics(ev, cfg, run_dir, base))
        result = {"status": DONE, "error": None, "metrics": metrics}
    except Exception as err:  # noqa: BLE001 - a failed trial is recorded and the sweep goes on
        if os.environ.get("LORAKIT_DEBUG"):
            raise
        result = {"status": FAILED, "error": one_line(err), "metrics": {}}
    result["elapsed_s"] = round(time.perf_counter() - started, 2)
    if run_dir.is_dir():
        atomic_write_text(run_dir / TRIAL_RESULT, json.dumps(result, indent=1) + "\n")
    return result


def read_result(run_dir: Path) -> dict[str, Any] | None:
    """A trial's trial.json (None when absent or unreadable: the trial did not finish)."""
    try:
        result = json.loads((run_dir / TRIAL_RESULT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and result.get("status") in (DONE, FAILED) else None


def start_worker(sweep_dir: Path, trial: TrialRecord, threads: int) -> subprocess.Popen:
    """A worker process for `trial` with `threads` torch threads; its output goes to trial-NNN.log."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               LORAKIT_SWEEP_THREADS=str(threads))
    log = open(sweep_dir / f"{trial.name}.log", "ab")  # noqa: SIM115 - closed when the worker is reaped
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.sweep.runner", str(sweep_dir), str(trial.index)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def worker_result(sweep_dir: Path, trial: TrialRecord, proc: subprocess.Popen) -> dict[str, Any]:
    """What a finished worker left: its trial.json, or a failure naming its exit code and log."""
    proc.log.close()  # type: ignore[attr-defined]
    result = read_result(sweep_dir / trial.name)
    if result is None:
        log = sweep_dir / f"{trial.name}.log"
        result = {"status": FAILED, "metrics": {}, "elapsed_s": None,
                  "error": f"the worker process exited with code {proc.returncode} before writing its result; see {log}"}
    return result


def worker_main(argv: list[str]) -> int:
    """`python -m lorakit.sweep.runner SWEEP_DIR INDEX`: run one trial of the sweep.json there."""
    import torch

    sweep_dir, index = Path(argv[0]), int(argv[1])
    threads = int(os.environ.get("LORAKIT_SWEEP_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    state = SweepState.read(sweep_dir)
    if state is None:
        sys.stderr.write(f"error: no sweep.json in {sweep_dir}\n")
        return 2
    trial = state.trials[index]
    result = run_trial(sweep_dir, state.plan, trial)
    print(f"{trial.name}: {result['status']}" + (f" ({result['error']})" if result.get("error") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
