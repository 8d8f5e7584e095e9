"""lorakit vs Hugging Face PEFT + TRL SFTTrainer: trained tokens/s and peak RSS, side by side.

Same model, same data (a seeded synthetic chat set: prompt/completion, loss on the answer
only), LoRA r=16 / alpha=32 on all linear layers, same max length, batch size, steps and
learning rate. Each configuration runs in its own subprocess (so peak RSS is its own),
alternating lorakit / PEFT+TRL, `--repeats` times. Throughput is the trained (answer)
tokens of the training loop divided by its wall time, excluding model loading.

    python bench/train_vs_peft.py --model smollm2-135m-instruct --steps 12 --repeats 2
    python bench/train_vs_peft.py --model tiny --steps 40

Writes a markdown table to bench/results/train_vs_peft-<model>.md with the command line.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the harbour council approved a new ferry timetable for the northern islands after a long debate "
    "about fuel costs winter storms and the needs of fishermen who leave before dawn each morning "
    "while teachers asked for later departures so that children could reach school safely"
).split()


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


def run_lorakit(args: argparse.Namespace) -> dict:
    from lorakit.config import load_config
    from lorakit.train.loop import train

    out = Path(tempfile.mkdtemp(prefix="lk-bench-"))
    overrides = [
        f"model.name={args.model_dir}", "model.dtype=fp32", f"data.train={args.data}", "data.format=prompt_completion",
        "data.eval_ratio=0", f"data.max_length={args.max_length}", f"data.packing={str(args.packing).lower()}",
        "adapter.r=16", "adapter.alpha=32", "adapter.dropout=0.05", "adapter.target_modules=[all-linear]",
        f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", "train.lr=2e-4",
        f"train.precision={args.precision}", "train.log_every=1", "train.warmup_ratio=0", f"output_dir={out}/run",
        f"train.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        f"data.share_prefix={str(args.share_prefix).lower()}", f"train.fused_mlp={str(args.fused_mlp).lower()}",
    ]
    result = train(load_config(None, overrides), quiet=True)
    events = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "train"]
    skip = min(args.skip, len(steps) - 1)  # first steps warm up allocators (and compile, if any)
    t0 = steps[skip - 1]["elapsed"] if skip else 0.0
    trained = steps[-1]["trained_tokens"] - (steps[skip - 1]["trained_tokens"] if skip else 0)
    return {"trained_tokens": trained, "seconds": steps[-1]["elapsed"] - t0, "final_loss": result.losses[-1]}


def run_peft(args: argparse.Namespace) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    data = load_dataset("json", data_files=str(args.data), split="train")
    out = tempfile.mkdtemp(prefix="peft-bench-")
    cfg = SFTConfig(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=2e-4,
        max_length=args.max_length, packing=args.packing, bf16=args.precision == "bf16", logging_steps=1,
        save_strategy="no", report_to=[], warmup_steps=0, use_cpu=True, dataloader_num_workers=0,
        completion_only_loss=True, seed=0, gradient_checkpointing=args.gradient_checkpointing,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")

    class Clock(TrainerCallback):
        """Wall time and trained tokens per step, measured around each step like lorakit's log."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.tokens: list[int] = []

        def on_step_end(self, *_a, **_k) -> None:
            self.times.append(time.perf_counter())

    clock = Clock()
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, peft_config=lora,
                         callbacks=[clock])
    counted: list[int] = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, *a, **k):  # count the answer tokens each step trains on
        labels = inputs.get("labels")
        if labels is not None:
            counted.append(int((labels[:, 1:] != -100).sum()))
        return original(model, inputs, *a, **k)

    trainer.compute_loss = compute_loss
    start = time.perf_counter()
    out_state = trainer.train()
    skip = min(args.skip, len(clock.times) - 1)
    t0 = clock.times[skip - 1] if skip else start
    return {"trained_tokens": sum(counted[skip:]), "seconds": clock.times[-1] - t0,
            "final_loss": float(out_state.training_loss)}


def child(args: argparse.Namespace) -> None:
    result = run_lorakit(args) if args.child == "lorakit" else run_peft(args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="builtin alias, model dir, or 'tiny'")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the timing")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                   help="packing for both tools (TRL: packing=True, its padding-free BFD packing)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="activation checkpointing for both tools (TRL's SFTConfig turns it on by default)")
    p.add_argument("--share-prefix", action=argparse.BooleanOptionalAction, default=True,
                   help="lorakit's shared-prefix packing (the chat template's system turn once per row); "
                        "TRL has no equivalent")
    p.add_argument("--fused-mlp", action=argparse.BooleanOptionalAction, default=True,
                   help="lorakit's fused LoRA SwiGLU MLP (train.fused_mlp)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", choices=["lorakit", "peft"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    data = work / "data.jsonl"
    make_data(data, args.examples)
    mdir = model_dir(args.model, work)
    runs: dict[str, list[dict]] = {"lorakit": [], "peft": []}
    for rep in range(args.repeats):
        for tool in ("lorakit", "peft"):
            cmd = [sys.executable, __file__, "--child", tool, "--model-dir", mdir, "--data", str(data),
                   "--steps", str(args.steps), "--skip", str(args.skip), "--batch-size", str(args.batch_size),
                   "--max-length", str(args.max_length), "--precision", args.precision,
                   "--packing" if args.packing else "--no-packing",
                   "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing",
                   "--share-prefix" if args.share_prefix else "--no-share-prefix",
                   "--fused-mlp" if args.fused_mlp else "--no-fused-mlp"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{tool} run failed:\n{proc.stderr[-3000:]}")
            r = json.loads(line[7:])
            r["tokens_per_s"] = r["trained_tokens"] / r["seconds"]
            runs[tool].append(r)
            print(f"repeat {rep + 1} {tool:8s} {r['tokens_per_s']:8.1f} trained tok/s  peak RSS {r['peak_rss_mb']:7.0f} MB"
                  f"  final loss {r['final_loss']:.3f}", flush=True)

    def med(tool: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[tool])

    tps = {t: med(t, "tokens_per_s") for t in runs}
    rss = {t: med(t, "peak_rss_mb") for t in runs}
    command = "python " + " ".join([Path(__file__).relative_to(Path.cwd()).as_posix() if Path(__file__).is_relative_to(Path.cwd()) else __file__] + sys.argv[1:])
    lines = [
        f"# lorakit vs PEFT+TRL: {args.model}",
        "",
        f"Command: `{command}`",
        "",
        f"LoRA r=16 alpha=32 all-linear, batch {args.batch_size} x max_length {args.max_length}, {args.steps} steps "
        f"(first {args.skip} untimed), {args.precision}, packing={args.packing}, "
        f"gradient checkpointing={args.gradient_checkpointing} (both tools), lorakit shared prefix={args.share_prefix}, fused MLP={args.fused_mlp}, "
        f"{args.examples} examples, "
        f"median of {args.repeats} alternating runs, CPU threads: {__import__('torch').get_num_threads()}.",
        "",
        "| tool | trained tokens/s | peak RSS (MB) | final loss |",
        "|---|---:|---:|---:|",
    ]
    for t in runs:
        lines.append(f"| {'lorakit' if t == 'lorakit' else 'PEFT + TRL SFTTrainer'} | {tps[t]:.1f} | {rss[t]:.0f} | "
                     f"{med(t, 'final_loss'):.3f} |")
    lines += ["", f"**Ratios (lorakit / PEFT+TRL):** tokens/s {tps['lorakit'] / tps['peft']:.2f}x, "
              f"peak RSS {rss['lorakit'] / rss['peft']:.2f}x", ""]
    gc = ("-gc" if args.gradient_checkpointing else "") + ("" if args.share_prefix else "-noshare") + \
        ("" if args.fused_mlp else "-nofused")
    out = Path(__file__).parent / "results" / f"train_vs_peft-{Path(args.model).name}-{args.precision}{gc}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
