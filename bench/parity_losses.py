"""Per-step losses of the quickstart and of the demo's first 20 steps, recorded or compared.

A refactoring that claims to change no behaviour (issue 16's tidy-up) records the losses on the
commit before it and checks them on the commit after, to 1e-6:

    python bench/parity_losses.py --record bench/results/parity_losses.json   # before
    python bench/parity_losses.py --check  bench/results/parity_losses.json   # after

Each run is `lorakit train` in a subprocess with `log_every=1` and checkpoints off, on the shipped
configs (the quickstart: LoRA on every linear layer of SmolLM2-135M, fp32; the demo: LoRA on the
upper MLPs with the KL anchor, precision auto) and, for the demo, once more in fp32, so that a
difference that only bf16 rounding would explain can be told from a real one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import cpu_name  # bench/machine.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "quickstart": ("examples/quickstart/lora.yaml", []),
    "demo-20-auto": ("examples/handbook/lora.yaml", ["train.max_steps=20"]),
    "demo-20-fp32": ("examples/handbook/lora.yaml", ["train.max_steps=20", "train.precision=fp32"]),
}
KEYS = ("loss", "grad_norm", "kl", "eval_loss")


def run(name: str, config: str, sets: list[str], tmp: Path, threads: int) -> list[dict]:
    out = tmp / name
    cmd = [sys.executable, "-m", "lorakit", "train", str(ROOT / config), "--set", f"output_dir={out}",
           "--set", "train.log_every=1", "--set", "train.save_every=0"]
    for s in sets:
        cmd += ["--set", s]
    # the thread count changes the order of float reductions: both sides must use the same
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: r[k] for k in ("step", *KEYS) if k in r} for r in rows]


def compare(before: dict, after: dict, tol: float) -> list[str]:
    problems = []
    for name, rows in before["runs"].items():
        got = after["runs"].get(name)
        if got is None or len(got) != len(rows):
            problems.append(f"{name}: {len(rows)} logged rows before, {0 if got is None else len(got)} after")
            continue
        for a, b in zip(rows, got):
            for k in KEYS:
                if (k in a) != (k in b):
                    problems.append(f"{name} step {a.get('step')}: {k} logged on one side only")
                elif k in a and not abs(a[k] - b[k]) <= tol:
                    problems.append(f"{name} step {a['step']}: {k} {a[k]!r} before, {b[k]!r} after")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", type=Path)
    mode.add_argument("--check", type=Path)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--only", nargs="*", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the runs (--check: the recorded one)")
    args = ap.parse_args()
    before = json.loads(args.check.read_text()) if args.check else None
    threads = before.get("threads", 2) if before else args.threads
    os.environ.setdefault("PYTHONHASHSEED", "0")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {n: run(n, *RUNS[n], Path(tmp), threads) for n in args.only}
    result = {"commit": commit, "cpu": cpu_name(), "threads": threads, "runs": runs,
              "command": "python bench/parity_losses.py " + " ".join(sys.argv[1:])}
    if args.record:
        tmp_path = args.record.with_suffix(".tmp")
        tmp_path.write_text(json.dumps(result, indent=1) + "\n")
        tmp_path.replace(args.record)
        print(f"recorded {sum(len(r) for r in runs.values())} rows at {commit} in {args.record}")
        return 0
    assert before is not None
    before["runs"] = {n: r for n, r in before["runs"].items() if n in args.only}
    problems = compare(before, result, args.tol)
    worst = max((abs(a[k] - b[k]) for n in before["runs"] for a, b in zip(before["runs"][n], runs[n])
                 for k in KEYS if k in a and k in b and math.isfinite(a[k]) and math.isfinite(b[k])), default=0.0)
    for p in problems:
        print(p)
    print(f"{'DIFFERENT' if problems else 'equal'}: {before['commit']} vs {commit}, largest difference {worst:.3g} (tol {args.tol})")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
