"""Every adapter method on the demo's data, side by side: what it costs and what it teaches.

Each method trains on the handbook (examples/handbook/lora.yaml, or qlora.yaml for the 4-bit
bases) with the same budget (`--epochs`, the same for every row), then is evaluated as
`lorakit demo` evaluates (held-out fact accuracy, refusal rate on held-out unanswerables,
general answers retained, perplexity on general text). The base model is evaluated once
and reused for every row. Each method runs in its own subprocess (its peak RSS is its own)
and its row is written to the results JSON as soon as it finishes; a second run skips the
rows already there. A method the installed lorakit does not accept (its config is refused)
is skipped with a line saying so.

    OMP_NUM_THREADS=1 python bench/methods.py --epochs 1
    OMP_NUM_THREADS=1 python bench/methods.py --epochs 1 --methods lora,ia3

Writes bench/results/methods-e<epochs>.json and .md (with the command line, CPU, load).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LORA = "examples/handbook/lora.yaml"
QLORA = "examples/handbook/qlora.yaml"
NO_KL = "train.kl_to_base.weight=0"  # the KL anchor runs the base through switched-off adapters: none here
LAST6 = r"model\.layers\.(2[4-9])\."

# name -> (config, overrides, what the setting is). Same data, schedule, epochs and seed for all.
METHODS: dict[str, tuple[str, list[str], str]] = {
    "lora": (LORA, [], "r=64, alpha=128, MLPs of blocks 18-29 (the demo's setting), lr 1e-3"),
    "rslora": (LORA, ["adapter.use_rslora=true", "adapter.alpha=32"],
               "rsLoRA r=64, alpha=32 (scaling 4 = alpha/sqrt(r), LoRA's is 2), same targets, lr 1e-3"),
    "dora": (LORA, ["adapter.method=dora"], "DoRA r=64, alpha=128, same targets as LoRA, lr 1e-3"),
    "ia3": (LORA, ["adapter.method=ia3", "adapter.target_modules=[all-linear]", "train.lr=3e-3"],
            "IA3 on PEFT's llama default (k_proj, v_proj, down_proj input), every block, lr 3e-3 (T-Few)"),
    "prompt20": (LORA, ["adapter.method=prompt_tuning", "adapter.num_virtual_tokens=20", "train.lr=3e-2", NO_KL],
                 "prompt tuning, 20 virtual tokens, lr 3e-2"),
    "prompt100": (LORA, ["adapter.method=prompt_tuning", "adapter.num_virtual_tokens=100", "train.lr=3e-2", NO_KL],
                  "prompt tuning, 100 virtual tokens, lr 3e-2"),
    "selective": (LORA, ["adapter.method=selective", f"adapter.trainable=['{LAST6}']", "train.lr=5e-5", NO_KL],
                  "every weight of the last 6 blocks (24-29), lr 5e-5, no KL anchor"),
    "full": (LORA, ["adapter.method=full", "train.lr=5e-5", NO_KL], "every weight, lr 5e-5, no KL anchor"),
    "qlora": (QLORA, [], "QLoRA: the LoRA row on an NF4 base (double quant, blocksize 64)"),
    "qdora": (QLORA, ["adapter.method=dora"], "QDoRA: the DoRA row on an NF4 base"),
}
COLUMNS = ["trainable_params", "adapter_bytes", "train_s", "peak_rss_mb", "heldout_ppl", "heldout_fact", "refusal",
           "retention", "perplexity"]


def demo_pieces(epochs: float, config: str, overrides: list[str], out: Path) -> tuple[Any, Any, Any]:
    """(config, demo data, generation settings) as `lorakit demo` builds them."""
    from lorakit.config import load_config
    from lorakit.demo import load_demo_data
    from lorakit.eval.generate import GenerationSettings

    cfg = load_config(ROOT / config, [*overrides, f"train.epochs={epochs}", f"output_dir={out}", "train.save_every=0"])
    return cfg, load_demo_data(cfg, None, 30), GenerationSettings(max_new_tokens=40)


def heldout_ppl_and_train_facts(cfg: Any, data: Any, adapter: Path | None) -> dict[str, float | None]:
    """exp(mean loss on the held-out answers), masked as in training (learning shows here before greedy answers
    do), and the fact accuracy on the demo's sample of trained questions, as the demo scores it."""
    from lorakit.demo import EVAL_BATCH, METRICS
    from lorakit.eval.generate import GenerationSettings, load_for_inference
    from lorakit.eval.runner import answer_perplexity, run_eval

    im = load_for_inference(cfg.model.name, adapter, cfg.model.dtype)
    im.template, im.system_prompt = cfg.data.template, data.system_prompt
    facts = run_eval(im, data.sets[1], METRICS, GenerationSettings(max_new_tokens=40), EVAL_BATCH)
    return {"heldout_ppl": answer_perplexity(im, data.sets[0], cfg.data.max_length, EVAL_BATCH),
            "train_fact": facts["metrics"].get("fact")}


def evaluate_with_heldout_ppl(cfg: Any, data: Any, settings: Any, adapter: Path | None) -> tuple[Any, float | None]:
    """`lorakit demo`'s evaluation of the tuned model (demo.evaluate_demo_model's calls), plus the held-out answer
    perplexity from the same loaded model (then taken out of the result, which the base's lacks)."""
    from lorakit.demo import EVAL_BATCH, METRICS
    from lorakit.eval.compare import evaluate_model
    from lorakit.eval.generate import load_for_inference

    im = load_for_inference(cfg.model.name, adapter, cfg.model.dtype)
    im.template, im.system_prompt = cfg.data.template, data.system_prompt
    tuned = evaluate_model(im, "tuned", data.sets, METRICS, settings, EVAL_BATCH, None, {"heldout"}, data.text,
                           cfg.data.max_length)
    return tuned, tuned.datasets["heldout"]["metrics"].pop("perplexity", None)


def tuned_model(run_dir: Path, cfg: Any) -> Path | None:
    """The adapter directory, or None after pointing cfg at the whole model full fine-tuning wrote."""
    if (run_dir / "model").is_dir():
        cfg.model.name = str(run_dir / "model")
        return None
    return run_dir / "adapter"


def child_ppl(args: argparse.Namespace) -> None:
    """Only the held-out answer perplexity of a trained row (or the base): for rows recorded without it."""
    name = args.child.removeprefix("ppl:")
    config, overrides, _ = METHODS.get(name, (LORA, [], ""))
    cfg, data, _ = demo_pieces(args.epochs, config, overrides, Path(args.work) / name)
    adapter = None if name == "base" else tuned_model(Path(args.work) / name, cfg)
    print("RESULT " + json.dumps(heldout_ppl_and_train_facts(cfg, data, adapter)), flush=True)


def child_base(args: argparse.Namespace) -> None:
    """The base model's evaluation, once, as JSON (ModelResult)."""
    import dataclasses

    from rich.console import Console

    from lorakit.demo import evaluate_demo_model

    cfg, data, settings = demo_pieces(args.epochs, LORA, [], Path(args.work) / "base")
    t0 = time.perf_counter()
    base = evaluate_demo_model(cfg, data, settings, Console(stderr=True), None, "base")
    Path(args.base_json).write_text(json.dumps({"result": dataclasses.asdict(base), "eval_s": time.perf_counter() - t0,
                                                "load": os.getloadavg()[0]}))


def child_method(args: argparse.Namespace) -> None:
    """Train one method, evaluate it as the demo does, print its row."""
    from rich.console import Console

    from lorakit.demo import summary_rows
    from lorakit.eval.compare import ModelResult, build_comparison
    from lorakit.train.loop import train

    config, overrides, _ = METHODS[args.child]
    run_dir = Path(args.work) / args.child
    cfg, data, settings = demo_pieces(args.epochs, config, overrides, run_dir)
    console = Console(stderr=True)
    load0 = os.getloadavg()[0]
    result = train(cfg, console=console)
    load1 = os.getloadavg()[0]
    adapter = tuned_model(run_dir, cfg)  # full fine-tuning: a whole model directory
    saved = adapter or Path(cfg.model.name)
    t0 = time.perf_counter()
    tuned, ppl = evaluate_with_heldout_ppl(cfg, data, settings, adapter)
    base = ModelResult(**json.loads(Path(args.base_json).read_text())["result"])
    comparison = build_comparison([base, tuned], "general")
    summary = {row["metric"]: row["values"] for row in summary_rows(comparison, "base", "tuned", data.variants)}
    start = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    row = {
        "method": args.child, "setting": METHODS[args.child][2], "epochs": args.epochs, "steps": result.steps,
        "trainable_params": start.get("trainable_params"),
        "adapter_bytes": sum(p.stat().st_size for p in saved.rglob("*") if p.is_file()),
        "train_s": round(result.elapsed, 1), "eval_s": round(time.perf_counter() - t0, 1),
        "peak_rss_mb": round(result.peak_rss_mb or 0.0, 1), "load_avg": [round(load0, 2), round(load1, 2)],
        "heldout_fact": summary["held-out fact accuracy"]["tuned"],
        "refusal": summary["refusal rate on unanswerables"]["tuned"],
        "retention": summary["general answers retained"]["tuned"],
        "perplexity": summary["perplexity on general text"]["tuned"],
        "base": {k: summary[m]["base"] for k, m in (("heldout_fact", "held-out fact accuracy"),
                                                    ("refusal", "refusal rate on unanswerables"),
                                                    ("perplexity", "perplexity on general text"))},
        "final_loss": result.losses[-1] if result.losses else None,
        "heldout_ppl": ppl,
        "train_fact": summary["train fact accuracy"]["tuned"],
        "summary": summary,
    }
    print("RESULT " + json.dumps(row), flush=True)


def accepted(name: str, epochs: float, work: Path) -> str | None:
    """None when the installed lorakit accepts the method's config, else why not (one line)."""
    from lorakit.errors import LorakitError

    config, overrides, _ = METHODS[name]
    try:
        demo_pieces(epochs, config, overrides, work / name)
    except LorakitError as err:
        return str(err).splitlines()[0].replace(f"{ROOT}/", "")
    return None


def run_child(args: argparse.Namespace, what: list[str], log: Path) -> str:
    cmd = [sys.executable, __file__, "--epochs", str(args.epochs), "--work", args.work, "--base-json", args.base_json, *what]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(what)} failed (exit {proc.returncode}); see {log}")
    return proc.stdout


def write_table(results: dict[str, Any], path: Path, command: str) -> None:
    rows = ["| method | setting | trainable params | adapter size | training time | peak RSS | held-out answer ppl "
            "| trained facts | held-out fact acc. | refusal rate | general retained | general-text ppl "
            "| load avg (start, end) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    base = next((r["base"] for r in results["rows"].values()), None)
    if base:
        extra = results.get("base_extra", {})
        rows.append(f"| base model | - | - | - | - | - | {_num(extra.get('heldout_ppl'))} | {_pct(extra.get('train_fact'))} "
                    f"| {100 * base['heldout_fact']:.1f}% "
                    f"| {100 * base['refusal']:.1f}% | 100% | {base['perplexity']:.2f} | |")
    for name in METHODS:
        r = results["rows"].get(name)
        if r is None:
            continue
        size = r["adapter_bytes"] / 1e6
        rows.append(f"| {name} | {r['setting']} | {r['trainable_params']:,} | {size:.2f} MB | {r['train_s']:.0f} s "
                    f"| {r['peak_rss_mb']:.0f} MB | {_num(r.get('heldout_ppl'))} | {_pct(r.get('train_fact'))} "
                    f"| {100 * r['heldout_fact']:.1f}% "
                    f"| {100 * r['refusal']:.1f}% "
                    f"| {100 * (r['retention'] or 0):.1f}% | {r['perplexity']:.2f} | {r['load_avg'][0]}, {r['load_avg'][1]} |")
    for name, why in results.get("skipped", {}).items():
        rows.append(f"| {name} | skipped: {why} | | | | | | | | | | | |")
    head = (f"`{command}`, {results['epochs']} epoch(s) for every row, {results['cpu']}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, model fp32 with bf16 autocast "
            "(train.precision auto), evaluation as `lorakit demo` (218 questions, greedy, <= 40 new tokens).\n\n")
    path.write_text(head + "\n".join(rows) + "\n")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def update_results(out: Path, epochs: float, change: Any) -> dict[str, Any]:
    """Read the results file, apply `change` to it, write it back: two runs on disjoint --methods share one file."""
    results = json.loads(out.read_text()) if out.exists() else {"epochs": epochs, "cpu": cpu_name(), "rows": {}}
    results.setdefault("skipped", {})
    change(results)
    out.write_text(json.dumps(results, indent=1) + "\n")
    return results


def fill_missing(args: argparse.Namespace, out: Path) -> None:
    """The held-out answer perplexity and trained-fact accuracy for the base and for rows recorded without them."""
    work = Path(args.work)
    results = update_results(out, args.epochs, lambda r: None)
    for name in ["base", *results["rows"]]:
        row = results.get("base_extra", {}) if name == "base" else results["rows"][name]
        if row.get("heldout_ppl") is None or "train_fact" not in row:
            stdout = run_child(args, ["--child", f"ppl:{name}"], work / f"ppl-{name}.log")
            found = json.loads(next(x[7:] for x in stdout.splitlines() if x.startswith("RESULT ")))
            if name == "base":
                update_results(out, args.epochs, lambda r: r.setdefault("base_extra", {}).update(found))
            else:
                update_results(out, args.epochs, lambda r, n=name: r["rows"][n].update(found))


def run_method(args: argparse.Namespace, name: str, out: Path, command: str) -> None:
    """Train and evaluate one method (unless done, or refused by the installed lorakit); record its row."""
    work = Path(args.work)
    if name in update_results(out, args.epochs, lambda r: None)["rows"]:
        print(f"{name}: done already, skipped", flush=True)
        return
    why = accepted(name, args.epochs, work)
    if why is not None:
        print(f"{name}: skipped, the installed lorakit does not accept it ({why})", flush=True)
        update_results(out, args.epochs, lambda r: r["skipped"].__setitem__(name, why))
        return
    print(f"{name}: training {args.epochs:g} epoch(s) (load {os.getloadavg()[0]:.2f})", flush=True)
    try:
        stdout = run_child(args, ["--child", name], work / f"{name}.log")
    except RuntimeError as err:
        print(f"{name}: {err}", flush=True)
        return
    row = json.loads(next(line[7:] for line in stdout.splitlines() if line.startswith("RESULT ")))

    def add(results: dict[str, Any]) -> None:
        results["rows"][name] = row
        results["skipped"].pop(name, None)

    write_table(update_results(out, args.epochs, add), out.with_suffix(".md"), command)  # as soon as it is done
    print(f"{name}: {json.dumps({k: row.get(k) for k in COLUMNS})}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    p.add_argument("--epochs", type=float, default=1.0, help="the training budget of every row (the demo: 4)")
    p.add_argument("--work", default="/tmp/lorakit-methods", help="run directories (models, adapters)")
    p.add_argument("--results", default=None, help="results JSON (default bench/results/methods-e<epochs>.json)")
    p.add_argument("--base-json", default=None)
    p.add_argument("--no-fill", action="store_true", help="leave measuring what older rows lack to another run")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.base_json = args.base_json or str(Path(args.work) / "base.json")  # the base does not depend on --epochs
    if args.child == "base":
        return child_base(args)
    if args.child and args.child.startswith("ppl:"):
        return child_ppl(args)
    if args.child:
        return child_method(args)
    os.chdir(ROOT)  # the configs name their data relative to the repository
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        sys.exit(f"error: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    out = Path(args.results or ROOT / "bench" / "results" / f"methods-e{args.epochs:g}.json")
    command = "OMP_NUM_THREADS=1 python bench/methods.py " + " ".join(sys.argv[1:])
    if not Path(args.base_json).exists():
        print(f"base model evaluation (load {os.getloadavg()[0]:.2f})", flush=True)
        run_child(args, ["--child", "base"], Path(args.work) / "base.log")
    for name in names:
        run_method(args, name, out, command)
    if not args.no_fill:
        fill_missing(args, out)
    write_table(update_results(out, args.epochs, lambda r: None), out.with_suffix(".md"), command)


if __name__ == "__main__":
    main()
