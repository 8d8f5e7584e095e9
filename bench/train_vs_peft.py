"""lorakit vs Hugging Face PEFT + TRL SFTTrainer: one whole epoch each, whole-process wall time and peak RSS.

The protocol of issue 23: SmolLM2-135M-Instruct, LoRA r=16 / alpha=32 on all linear layers, dropout
0, one epoch over the same file of 96 conversational prompt/completion rows (16-200 words; loss on
the completion only), max length 512, batch 4, in fp32 and in bf16 autocast. Three configurations:

- lorakit as shipped: packing with the shared system-turn prefix, the fused LoRA MLP, and whatever
  else its defaults do (`train.precision` fp32 / bf16);
- PEFT + TRL SFTTrainer with `packing=True` (its BFD packing into rows of max_length, padding-free);
- PEFT + TRL SFTTrainer without packing (rows padded to the longest of each batch);
- optionally (`--configs ... lorakit-budget`), lorakit with `train.memory_budget_gb` (`--budget-gb`).

TRL runs with its own defaults otherwise (notably SFTConfig's `gradient_checkpointing=True`), as a
new user gets them; `bf16=True` for bf16. Each run is its own process, timed from start to exit
(`os.wait4` gives its wall time and peak RSS), and the configurations alternate within a repeat.
Reported per run: optimizer steps, processed tokens (every non-padding token the model ran),
trained tokens (the completion tokens the loss covers), wall time, peak RSS.

    python bench/train_vs_peft.py                  # both precisions, 2 repeats (about an hour on 2 cores)
    python bench/train_vs_peft.py --precisions fp32 --repeats 1 --model tiny

Writes bench/results/train_vs_peft-<model>.md with the command line, CPU and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name  # bench/machine.py (the script's folder is on sys.path)

WORDS = ["the", "harbour", "council", "approved", "a", "new", "ferry", "timetable", "for", "the", "northern", "islands", "after", "a", "long", "debate", "about", "fuel", "costs", "winter", "storms", "and", "the", "needs", "of", "fishermen", "who", "leave", "before", "dawn", "each", "morning", "while", "teachers", "asked", "for", "later", "departures", "so", "that", "children", "could", "reach", "school", "safely"]


def make_data(path: Path, n: int = 96, seed: int = 0) -> None:
    """Conversational prompt/completion rows of 16-200 words (a question of 8-30 words, an answer of the rest)."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for i in range(n):
            words = rng.randint(16, 200)
            asked = rng.randint(8, min(30, words - 8))
            q = " ".join(rng.choice(WORDS) for _ in range(asked - 2))  # "Question i:" are two words
            a = " ".join(rng.choice(WORDS) for _ in range(words - asked))
            fh.write(json.dumps({"prompt": [{"role": "user", "content": f"Question {i}: {q}?"}],
                                 "completion": [{"role": "assistant", "content": a.capitalize() + "."}]}) + "\n")


def model_dir(name: str, work: Path) -> str:
    """A plain HF directory both tools load the same way."""
    if name == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.conftest import save_tiny_model_dir

        out = work / "tiny-model"
        if not out.exists():
            save_tiny_model_dir(out)
        return str(out)
    from lorakit.models import resolve_model
    from lorakit.models.load import model_directory

    return model_directory(resolve_model(name))


CONFIGS = {
    "lorakit": "lorakit (packing, shared prefix, fused MLP)",
    "lorakit-budget": "lorakit with train.memory_budget_gb",
    "trl-packing": "PEFT + TRL SFTTrainer, packing=True",
    "trl-no-packing": "PEFT + TRL SFTTrainer, no packing (padded per batch)",
    "trl-packing-tcmalloc": "PEFT + TRL SFTTrainer, packing=True, tcmalloc preloaded",
    "trl-no-packing-tcmalloc": "PEFT + TRL SFTTrainer, no packing, tcmalloc preloaded",
}


def child_env(config: str) -> dict[str, str]:
    """The environment a configuration's process runs in. lorakit: what the `lorakit` command gives itself (tcmalloc
    preloaded where installed, lorakit.memory); TRL: the caller's, as a new user runs it, or with tcmalloc preloaded
    for the -tcmalloc configurations (what the same allocator does for the peer)."""
    from lorakit.memory import allocator_env, find_tcmalloc

    if config.startswith("lorakit") or config.endswith("-tcmalloc"):
        if config.endswith("-tcmalloc") and find_tcmalloc() is None:
            sys.exit(f"{config}: no tcmalloc installed (Debian/Ubuntu: apt-get install libtcmalloc-minimal4)")
        return allocator_env(os.environ) or dict(os.environ)
    return dict(os.environ)


def run_lorakit(args: argparse.Namespace) -> dict:
    from lorakit.config import load_config
    from lorakit.train.loop import train

    out = Path(tempfile.mkdtemp(prefix="lk-bench-"))
    overrides = [
        f"model.name={args.model_dir}", "model.dtype=fp32", f"data.train={args.data}", "data.format=prompt_completion",
        "data.eval_ratio=0", f"data.max_length={args.max_length}", "adapter.r=16", "adapter.alpha=32",
        "adapter.dropout=0", "adapter.target_modules=[all-linear]", "train.epochs=1",
        f"train.batch_size={args.batch_size}", "train.lr=2e-4", f"train.precision={args.precision}",
        "train.log_every=1", "train.save_every=0", f"output_dir={out}/run", *args.lorakit_set,
    ]
    if args.max_steps:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.child == "lorakit-budget":
        overrides.append(f"train.memory_budget_gb={args.budget_gb}")
    start = time.perf_counter()
    result = train(load_config(None, overrides), quiet=True)
    return {"steps": result.steps, "processed_tokens": result.tokens, "trained_tokens": result.trained_tokens,
            "loop_s": time.perf_counter() - start, "final_loss": result.losses[-1]}


def run_peft(args: argparse.Namespace, packing: bool) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    data = load_dataset("json", data_files=str(args.data), split="train")
    cfg = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="peft-bench-"), num_train_epochs=1, max_steps=args.max_steps or -1, per_device_train_batch_size=args.batch_size,
        learning_rate=2e-4, max_length=args.max_length, packing=packing, bf16=args.precision == "bf16",
        save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, peft_config=lora)
    counts = {"processed_tokens": 0, "trained_tokens": 0}
    original = trainer.compute_loss

    def compute_loss(model, inputs, *a, **k):  # count what each step runs and trains on
        labels, mask = inputs.get("labels"), inputs.get("attention_mask")
        counts["processed_tokens"] += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        if labels is not None:
            counts["trained_tokens"] += int((labels[:, 1:] != -100).sum())
        return original(model, inputs, *a, **k)

    trainer.compute_loss = compute_loss
    start = time.perf_counter()
    state = trainer.train()
    return {"steps": trainer.state.global_step, **counts, "loop_s": time.perf_counter() - start,
            "final_loss": float(state.training_loss)}


def child(args: argparse.Namespace) -> None:
    from lorakit.memory import allocator_in_use

    packing = args.child.startswith("trl-packing")
    result = run_lorakit(args) if args.child.startswith("lorakit") else run_peft(args, packing)
    print("RESULT " + json.dumps({**result, "allocator": allocator_in_use()}), flush=True)


def run_child(config: str, precision: str, args: argparse.Namespace, mdir: str, data: Path, work: Path) -> dict:
    """One whole process: its wall time (start to exit) and peak RSS (os.wait4's rusage) with its RESULT line."""
    cmd = [sys.executable, __file__, "--child", config, "--model-dir", mdir, "--data", str(data), "--batch-size",
           str(args.batch_size), "--max-length", str(args.max_length), "--precision", precision, "--budget-gb",
           str(args.budget_gb), "--max-steps", str(args.max_steps)]
    for s in args.lorakit_set:
        cmd += ["--lorakit-set", s]
    log = work / f"{config}-{precision}.log"
    with log.open("w") as fh:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env(config))
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    line = next((ln for ln in text.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"{config} {precision} failed:\n{text[-3000:]}")
    return {**json.loads(line[7:]), "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="builtin alias, model dir, or 'tiny'")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--examples", type=int, default=96)
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["lorakit", "trl-packing", "trl-no-packing"])
    p.add_argument("--budget-gb", type=float, default=2.0, help="train.memory_budget_gb of the lorakit-budget config")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=0,
                   help="stop each run after N steps (a quick peak-RSS probe, not the protocol); 0 = one epoch")
    p.add_argument("--lorakit-set", action="append", default=[], help="extra lorakit config override (key=value)")
    p.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--precision", choices=["fp32", "bf16"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    data = work / "data.jsonl"
    make_data(data, args.examples)
    mdir = model_dir(args.model, work)
    runs: dict[tuple[str, str], list[dict]] = {}
    warm = argparse.Namespace(**{**vars(args), "max_steps": 1})
    for config in dict.fromkeys(c.removesuffix("-tcmalloc") for c in args.configs if c.startswith("trl")):
        run_child(config, args.precisions[0], warm, mdir, data, work)  # untimed: datasets' cache of the prepared rows
    loads = [load_average()]
    for rep in range(args.repeats):
        for precision in args.precisions:
            for config in args.configs:
                r = run_child(config, precision, args, mdir, data, work)
                runs.setdefault((config, precision), []).append(r)
                loads.append(load_average())
                print(f"repeat {rep + 1} {precision} {config:15s} {r['steps']:3d} steps  {r['processed_tokens']:6d} "
                      f"processed  {r['trained_tokens']:6d} trained  wall {r['wall_s']:6.1f} s  peak RSS "
                      f"{r['peak_rss_mb']:6.0f} MB  loss {r['final_loss']:.3f}  {r['allocator']}  load {loads[-1]}",
                      flush=True)
                write_report(args, runs, loads, quiet=True)  # after every run: an interrupted benchmark keeps its rows
    write_report(args, runs, loads)


def write_report(args: argparse.Namespace, runs: dict, loads: list[str], quiet: bool = False) -> None:
    def med(key: tuple[str, str], field: str) -> float:
        return statistics.median(r[field] for r in runs[key])

    here = Path(__file__).resolve()
    rel = here.relative_to(Path.cwd()).as_posix() if here.is_relative_to(Path.cwd()) else str(here)
    lines = [
        f"# lorakit vs PEFT+TRL, one epoch: {args.model}", "",
        f"Command: `python {' '.join([rel] + sys.argv[1:])}`", "",
        f"CPU: {cpu_name()}, {os.cpu_count()} cores. Load average (1/5/15 min) before and after each run: "
        f"{'; '.join(loads)}.", "",
        f"{args.examples} prompt/completion rows, LoRA r=16 alpha=32 all-linear, dropout 0, batch {args.batch_size}, "
        f"max length {args.max_length}, {f'first {args.max_steps} steps only (a probe, not the protocol)' if args.max_steps else 'one epoch'}; lorakit overrides: {args.lorakit_set or 'none'}"
        f"{f', lorakit-budget: train.memory_budget_gb={args.budget_gb:g}' if 'lorakit-budget' in args.configs else ''}. "
        f"Median of {args.repeats} alternating run(s); wall time and peak RSS of the whole process. TRL's prepared "
        "rows are cached by `datasets` first in an untimed one-step run of each TRL configuration (the first run of "
        "a new file pays that preparation once).", "",
        "| precision | configuration | allocator | steps | processed tokens | trained tokens | wall (s) | peak RSS (MB) | final loss |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (config, precision) in runs:
        key = (config, precision)
        lines.append(f"| {precision} | {CONFIGS[config]} | {runs[key][0]['allocator']} | {med(key, 'steps'):.0f} | {med(key, 'processed_tokens'):.0f} | "
                     f"{med(key, 'trained_tokens'):.0f} | {med(key, 'wall_s'):.1f} | {med(key, 'peak_rss_mb'):.0f} | "
                     f"{med(key, 'final_loss'):.3f} |")
    lines.append("")
    for precision in args.precisions:
        for ours in ("lorakit", "lorakit-budget"):
            lk = (ours, precision)
            for peer in ("trl-packing", "trl-no-packing", "trl-packing-tcmalloc", "trl-no-packing-tcmalloc"):
                if lk in runs and (peer, precision) in runs:
                    lines.append(f"- {precision}, {CONFIGS[ours]} vs {CONFIGS[peer]}: "
                                 f"{med((peer, precision), 'wall_s') / med(lk, 'wall_s'):.2f}x faster, "
                                 f"{med(lk, 'peak_rss_mb') / med((peer, precision), 'peak_rss_mb'):.2f}x the peak RSS")
    lines.append("")
    probe = f"-steps{args.max_steps}" if args.max_steps else ""
    out = here.parent / "results" / f"train_vs_peft-{Path(args.model).name}{probe}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines))
    if not quiet:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
