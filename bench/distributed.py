"""Scale-out harness: one process vs N ranks (DDP, FSDP2), LoRA / QLoRA / full, through the CLI.

Every run is `python -m lorakit train CONFIG [--nproc N]` in a subprocess, with the same
global batch (per-rank batch = global batch / N), so the losses of every layout must agree
step by step: that is the harness check. Time and memory come from the run's metrics.jsonl
(rank 0): seconds per optimizer step and trained tokens/s after `--skip` warm-up steps, peak
RSS, and on a GPU the peak CUDA memory allocated on rank 0.

On this 2-core CPU, 2 ranks share the 2 cores (1 thread each, against 2 threads for the
single process), so scaling figures are not meaningful; they are recorded to show the
harness works. On a GPU, `--layouts 1:ddp 1:fsdp` compares single-GPU FSDP and DDP memory:

    python bench/distributed.py --model tiny --steps 12 --layouts 1 2:ddp 2:fsdp --methods lora qlora
    python bench/distributed.py --model smollm2-135m-instruct --device cuda --layouts 1:ddp 1:fsdp 2:ddp 2:fsdp
    python bench/distributed.py --model llama-1b-random --device cuda --layouts 1:ddp 1:fsdp --methods lora qlora full

`llama-1b-random` is a randomly initialised Llama of 1.07B parameters (hidden 2048, 16
layers, MLP 8192, 32 heads / 8 KV heads, SmolLM2's tokenizer and vocabulary), saved once in
bf16 under the work directory. Writes bench/results/distributed-<model>-<device>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_vs_peft import make_data, model_dir  # noqa: E402  (same data and model resolution)

RESULTS = Path(__file__).resolve().parent / "results"


def random_llama_1b(work: Path) -> str:
    """A 1.07B-parameter Llama-shaped model with random weights and SmolLM2's tokenizer (built once)."""
    out = work / "llama-1b-random"
    if (out / "config.json").exists():
        return str(out)
    import torch
    import transformers as tf

    from lorakit.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    config = tf.LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                            tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = tf.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def write_config(args: argparse.Namespace, work: Path, model: str, data: Path, method: str, nproc: int,
                 strategy: str, name: str) -> Path:
    per_rank, rest = divmod(args.global_batch, nproc)
    if rest:
        sys.exit(f"--global-batch {args.global_batch} is not divisible by {nproc} processes")
    cfg = {
        "model": {"name": model, "dtype": "fp32" if args.device == "cpu" else "auto"},
        "adapter": {"method": method, "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["all-linear"]},
        "quantization": {"compute_dtype": "fp32" if args.device == "cpu" else "bf16"},
        "data": {"train": str(data), "format": "prompt_completion", "max_length": args.max_length, "eval_ratio": 0.0},
        "train": {"max_steps": args.steps, "batch_size": per_rank, "grad_accum": 1, "lr": 1e-4 if method == "full" else 2e-4,
                  "warmup_steps": 0, "log_every": 1, "precision": "fp32" if args.device == "cpu" else "auto",
                  "device": args.device, "gradient_checkpointing": args.gradient_checkpointing},
        "distributed": {"strategy": strategy},
        "output_dir": str(work / "runs" / name),
        "seed": 0,
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(args: argparse.Namespace, cfg: Path, nproc: int | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "lorakit", "train", str(cfg)] + (["--nproc", str(nproc)] if nproc else [])
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    run_dir = Path(yaml.safe_load(cfg.read_text())["output_dir"])
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    a, b = train[args.skip - 1] if args.skip else {"elapsed": 0.0, "trained_tokens": 0}, train[-1]
    seconds = b["elapsed"] - a["elapsed"]
    return {
        "losses": [e["loss"] for e in train],
        "s_per_step": seconds / (len(train) - args.skip),
        "tokens_per_s": (b["trained_tokens"] - a["trained_tokens"]) / max(seconds, 1e-9),
        "peak_rss_mb": max(e.get("peak_rss_mb") or 0 for e in train),
        "cuda_peak_mb": max((e.get("cuda_peak_mb") or 0 for e in train), default=0) or None,
        "wall_s": wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="builtin alias, model dir, 'tiny' or 'llama-1b-random'")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--layouts", nargs="+", default=["1", "2:ddp", "2:fsdp"],
                   help="'1' = one plain process; 'N:ddp' / 'N:fsdp' = N ranks under torchrun")
    p.add_argument("--methods", nargs="+", choices=["lora", "qlora", "full"], default=["lora", "qlora"])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the timing")
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one)")
    p.add_argument("--out", type=Path, default=None, help="results file (default: results/distributed-MODEL-DEVICE.md)")
    args = p.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="dist-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = random_llama_1b(work) if args.model == "llama-1b-random" else model_dir(args.model, work)
    data = work / "data.jsonl"
    make_data(data, args.examples)
    rows = []
    for method in args.methods:
        base_losses = None
        for layout in args.layouts:
            nproc, _, strategy = layout.partition(":")
            n = int(nproc)
            name = f"{method}-{n}-{strategy or 'single'}"
            cfg = write_config(args, work, model, data, method, n, strategy or "ddp", name)
            result = run(args, cfg, n if strategy else None)
            base_losses = base_losses or result["losses"]
            diff = max(abs(x - y) for x, y in zip(result["losses"], base_losses))
            rows.append((method, layout, result, diff))
            print(f"{name}: {result['s_per_step']:.3f} s/step, {result['tokens_per_s']:.0f} tok/s, "
                  f"peak RSS {result['peak_rss_mb']} MB, cuda {result['cuda_peak_mb']} MB, "
                  f"max |loss - first layout| {diff:.2e}", flush=True)

    import torch

    command = "python bench/distributed.py " + " ".join(sys.argv[1:])
    lines = [
        f"# Distributed harness: {args.model} on {args.device}",
        "",
        f"Command: `{command}`",
        "",
        f"torch {torch.__version__}, {os.cpu_count()} CPU cores"
        + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else "")
        + f", OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset (one process: all cores; N ranks: cores / N each)')}"
        + f". Global batch {args.global_batch} x {args.max_length} tokens (packed), {args.steps} steps, timing after "
        f"{args.skip} warm-up steps; LoRA r=16 on all linear layers. Memory is rank 0's. "
        "'1' is one plain process; 'N:ddp' / 'N:fsdp' are N ranks under torchrun (`--nproc N`).",
        "",
        "| method | layout | s/step | trained tok/s | peak RSS (rank 0) | peak CUDA (rank 0) | wall incl. start-up "
        "| max abs loss diff vs first layout |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, layout, r, diff in rows:
        cuda = f"{r['cuda_peak_mb']:,.0f} MB" if r["cuda_peak_mb"] else "-"
        lines.append(f"| {method} | {layout} | {r['s_per_step']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['peak_rss_mb']:,.0f} MB | {cuda} | {r['wall_s']:.1f} s | {diff:.1e} |")
    lines.append("")
    lines.append("Losses per step (first layout of each method): " + "; ".join(
        f"{m}: " + ", ".join(f"{x:.4f}" for x in r["losses"]) for m, lay, r, _ in rows if lay == args.layouts[0]))
    RESULTS.mkdir(exist_ok=True)
    out = args.out or RESULTS / f"distributed-{Path(args.model).name}-{args.device}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
