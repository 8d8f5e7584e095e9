"""Where lorakit's training memory goes: the tensors autograd keeps for backward, by layer part.

Builds the run `bench/train_vs_peft.py` builds for lorakit (its data file, SmolLM2-135M-Instruct,
LoRA r=16 all-linear, packing with the shared prefix, batch 4 x 512), runs the forward of the
first batch under `torch.autograd.graph.saved_tensors_hooks` and sums the bytes saved for
backward per (module kind, dtype), each storage counted once (a tensor saved by several ops,
e.g. the norm's output that q, k and v all keep, is one copy). Then one whole training step's
peak RSS increase over the model's RSS.

    python bench/train_memory.py --precision fp32
    python bench/train_memory.py --precision bf16 --set train.fused_mlp=false
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import resource
import tempfile
from pathlib import Path

import torch
from lorakit.train import norm_recompute
from train_vs_peft import (  # bench/ is on sys.path when run as a script
    make_data,
    model_dir,
)


def _kind(path: str) -> str:
    """A module path's part: 'self_attn.q_proj' -> 'q_proj', the attention's own ops -> 'self_attn'."""
    leaf = path.rsplit(".", 1)[-1]
    if leaf in ("lora_A", "lora_B", "base_layer", "lora_dropout"):
        leaf = path.rsplit(".", 2)[-2]
    return leaf if not leaf.isdigit() else "decoder layer"


def account(model: torch.nn.Module, loss_fn, batch: dict) -> tuple[dict, int]:
    """Bytes saved for backward per (module kind, dtype, shape) in one forward, and the total (storages once)."""
    stack: list[str] = ["model"]
    hooks = []
    for name, module in model.named_modules():
        hooks.append(module.register_forward_pre_hook(lambda m, a, n=name: stack.append(n)))
        hooks.append(module.register_forward_hook(lambda m, a, o: (stack.pop(), None)[1]))
    seen: set[int] = {p.untyped_storage().data_ptr() for p in model.parameters()}  # weights: the model's, counted apart
    table: dict[tuple, int] = collections.Counter()

    def pack(t: torch.Tensor):
        t = norm_recompute.pack_active(t)  # train.recompute_norms: a norm output is kept as a recipe, not counted
        if not isinstance(t, torch.Tensor):
            return t
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and t.untyped_storage().nbytes() > 0:
            seen.add(ptr)
            table[(_kind(stack[-1]), str(t.dtype).replace("torch.", ""), tuple(t.shape))] += t.untyped_storage().nbytes()
        return t

    inner = getattr(loss_fn, "__wrapped__", None)  # the loss under norm_recompute.recomputing(): nest inside it
    try:
        with norm_recompute.recomputing() if inner else contextlib.nullcontext():
            with torch.autograd.graph.saved_tensors_hooks(pack, norm_recompute.unpack):
                loss, _ = (inner or loss_fn)(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return table, loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--set", action="append", default=[], help="extra config overrides (key=value)")
    args = p.parse_args()

    from lorakit.data.batching import to_device
    from lorakit.memory import low_fragmentation, peak_rss_mb, rss_mb

    run = build_run(args.precision, args.set)
    print(f"after setup: RSS {rss_mb():.0f} MB, peak so far {peak_rss_mb():.0f} MB")
    batch = to_device(run.stream.next(), run.device)
    print(f"batch {tuple(batch['input_ids'].shape)}, precision {args.precision}, overrides {args.set}")
    with low_fragmentation():  # as train() runs its steps
        with run.amp():
            table, loss = account(run.model, run.loss_fn, batch)
        loss.backward()
        run.model.zero_grad(set_to_none=True)
        run_steps(run, batch)
    by_kind: dict[tuple, int] = collections.Counter()
    for (kind, dtype, _), n in table.items():
        by_kind[(kind, dtype)] += n
    total = sum(by_kind.values())
    print(f"\nsaved for backward: {total / 2**20:.0f} MiB")
    print("| module part | dtype | MiB | share |\n|---|---|---:|---:|")
    for (kind, dtype), n in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        if n >= 2**20:
            print(f"| {kind} | {dtype} | {n / 2**20:.0f} | {100 * n / total:.0f}% |")
    print("\nlargest single shapes (per layer):")
    for (kind, dtype, shape), n in sorted(table.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {kind:14s} {dtype:9s} {shape!s:22s} {n / 2**20:7.0f} MiB total")


def build_run(precision: str, extra: list[str] = ()):
    """lorakit's run of bench/train_vs_peft.py's data (4 x 512, LoRA r=16 all-linear), set up in this process."""
    from rich.console import Console

    from lorakit.config import load_config
    from lorakit.train.loop import setup

    work = Path(tempfile.mkdtemp(prefix="bench-mem-"))
    make_data(work / "data.jsonl")
    overrides = [
        f"model.name={model_dir('smollm2-135m-instruct', work)}", "model.dtype=fp32", f"data.train={work / 'data.jsonl'}",
        "data.format=prompt_completion", "data.eval_ratio=0", "data.max_length=512", "adapter.r=16", "adapter.alpha=32",
        "adapter.dropout=0", "adapter.target_modules=[all-linear]", "train.batch_size=4", f"train.precision={precision}",
        f"output_dir={work}/run", *extra,
    ]
    return setup(load_config(None, overrides), False, Console(quiet=True))


def run_steps(run, batch: dict) -> None:
    """One more optimizer step on the batch; the process's peak RSS after it."""
    from lorakit.memory import peak_rss_mb, rss_mb

    base = rss_mb()
    with run.amp():
        loss, _ = run.loss_fn(run.model, batch)
    loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    print(f"\nRSS before the step {base:.0f} MB, peak after it {peak_rss_mb():.0f} MB "
          f"(ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
