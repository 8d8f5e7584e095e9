"""LoRA on a bf16 base vs QLoRA on an NF4 base: weight memory, load and training peak RSS, speed.

Same model, data and settings for both (a seeded synthetic chat set, LoRA r=16 on all
linear layers, bf16 autocast, packing); the only difference is `quantization.method`.
Each run is its own subprocess so its peak RSS is its own; runs alternate, `--repeats` times.

    python bench/qlora_memory.py --model smollm2-135m-instruct --steps 8 --repeats 2

Writes bench/results/qlora_memory-<model>.md with the command line.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_vs_peft import make_data, model_dir  # noqa: E402  (same data and model resolution)


def child(args: argparse.Namespace) -> None:
    import torch

    from lorakit.config import load_config
    from lorakit.models.load import load_model, quant_spec
    from lorakit.quant.linear import QuantizedLinear
    from lorakit.train.loop import train

    out = Path(tempfile.mkdtemp(prefix="qlora-bench-"))
    overrides = [
        f"model.name={args.model_dir}", "model.dtype=bf16", f"data.train={args.data}",
        "data.format=prompt_completion", "data.eval_ratio=0", f"data.max_length={args.max_length}",
        "adapter.r=16", "adapter.alpha=32", "adapter.dropout=0.05", "adapter.target_modules=[all-linear]",
        f"quantization.method={args.child}", "quantization.compute_dtype=bf16",
        f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", "train.lr=2e-4",
        "train.precision=bf16", "train.log_every=1", "train.warmup_ratio=0", f"output_dir={out}/run",
        f"train.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
    ]
    cfg = load_config(None, overrides)
    # 1) load alone: peak RSS of loading, and the bytes the linear weights take once loaded
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    import transformers  # noqa: F401  (count the library import outside the load)

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = load_model(cfg.model.name, "bf16", with_tokenizer=False, quantization=quant_spec(cfg.quantization)).model
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    linear_bytes = 0
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            linear_bytes += sum(b.numel() * b.element_size() for n, b in m.named_buffers(recurse=False)
                                if n.startswith("weight_"))
        elif isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings():
            linear_bytes += m.weight.numel() * m.weight.element_size()
    total_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in
                      list(model.parameters()) + list(model.buffers())}.values())
    del model
    result = {"load_peak_mb": (load_peak - base_rss) / 1024, "linear_mb": linear_bytes / 2**20,
              "model_mb": total_bytes / 2**20, "import_rss_mb": before / 1024}
    # 2) the training run (it loads the model again; ru_maxrss is the process's high-water mark)
    run = train(cfg, quiet=True)
    events = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "train"]
    skip = min(args.skip, len(steps) - 1)
    t0 = steps[skip - 1]["elapsed"] if skip else 0.0
    trained = steps[-1]["trained_tokens"] - (steps[skip - 1]["trained_tokens"] if skip else 0)
    result.update(train_peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  tokens_per_s=trained / (steps[-1]["elapsed"] - t0), final_loss=run.losses[-1])
    print("RESULT " + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="builtin alias, model dir, or 'tiny'")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--skip", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", choices=["none", "nf4", "int8"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    work = Path(tempfile.mkdtemp(prefix="bench-qlora-"))
    data = work / "data.jsonl"
    make_data(data, args.examples)
    mdir = model_dir(args.model, work)
    methods = ("none", "nf4")
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for rep in range(args.repeats):
        for method in methods:
            cmd = [sys.executable, __file__, "--child", method, "--model-dir", mdir, "--data", str(data),
                   "--steps", str(args.steps), "--skip", str(args.skip), "--batch-size", str(args.batch_size),
                   "--max-length", str(args.max_length),
                   "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{method} run failed:\n{proc.stderr[-3000:]}")
            r = json.loads(line[7:])
            runs[method].append(r)
            print(f"repeat {rep + 1} {method:5s} {json.dumps({k: round(v, 1) for k, v in r.items()})}", flush=True)

    def med(m: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[m])

    label = {"none": "LoRA, bf16 base", "nf4": "QLoRA, NF4 base (double quant)"}
    command = "python bench/qlora_memory.py " + " ".join(sys.argv[1:])
    lines = [
        f"# LoRA (bf16 base) vs QLoRA (NF4 base): {args.model}", "", f"Command: `{command}`", "",
        f"LoRA r=16 alpha=32 all-linear, batch {args.batch_size} x max_length {args.max_length}, packing, bf16 autocast, "
        f"{args.steps} steps (first {args.skip} untimed), gradient checkpointing={args.gradient_checkpointing}, "
        f"median of {args.repeats} alternating runs, CPU threads: {__import__('torch').get_num_threads()}. "
        "Load peak is the RSS the load adds over the imported libraries.", "",
        "| base | linear weights (MiB) | all weights (MiB) | load peak (MB) | training peak RSS (MB) | trained tokens/s | final loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in methods:
        lines.append(f"| {label[m]} | {med(m, 'linear_mb'):.1f} | {med(m, 'model_mb'):.1f} | {med(m, 'load_peak_mb'):.0f} | "
                     f"{med(m, 'train_peak_mb'):.0f} | {med(m, 'tokens_per_s'):.1f} | {med(m, 'final_loss'):.3f} |")
    lines += ["", f"**Ratios (QLoRA / LoRA):** linear weights {med('nf4', 'linear_mb') / med('none', 'linear_mb'):.3f}x, "
              f"load peak {med('nf4', 'load_peak_mb') / med('none', 'load_peak_mb'):.2f}x, "
              f"training peak RSS {med('nf4', 'train_peak_mb') / med('none', 'train_peak_mb'):.2f}x, "
              f"tokens/s {med('nf4', 'tokens_per_s') / med('none', 'tokens_per_s'):.2f}x", ""]
    gc = "-gc" if args.gradient_checkpointing else ""
    out = Path(__file__).parent / "results" / f"qlora_memory-{Path(args.model).name}{gc}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
