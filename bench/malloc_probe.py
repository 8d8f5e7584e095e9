"""How much of lorakit's training peak RSS is glibc keeping freed memory, and what it costs to stop it.

One process, SmolLM2-135M fp32, LoRA r=16 all-linear, a 4 x 256 batch (half the tokens trained),
four forward+backward steps through lorakit's loss; prints step time, RSS and peak RSS.
Run it under different glibc malloc settings (they must be set before Python starts):

    python bench/malloc_probe.py gc
    MALLOC_MMAP_THRESHOLD_=2097152 MALLOC_TRIM_THRESHOLD_=2097152 python bench/malloc_probe.py gc
    python bench/malloc_probe.py nogc

Results are recorded in bench/BENCHMARKS.md (section "Where the memory goes").
"""

from __future__ import annotations

import os
import sys
import time

import torch

from lorakit.adapters import inject_lora
from lorakit.memory import peak_rss_mb, rss_mb
from lorakit.models.load import load_model
from lorakit.train.loss import fast_loss_sum


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "gc"
    model = load_model("smollm2-135m-instruct", "fp32", with_tokenizer=False).model
    inject_lora(model, ["all-linear"], r=16, alpha=32, dropout=0.05)
    if mode == "gc":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49000, (4, 256), generator=g)
    labels = ids.clone()
    labels[:, :128] = -100
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(256).repeat(4, 1)}
    env = {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    print(f"mode={mode} env={env or 'glibc defaults'}")
    for step in range(4):
        t0 = time.perf_counter()
        loss, n = fast_loss_sum(model, batch)
        (loss / n).backward()
        model.zero_grad(set_to_none=True)
        print(f"step {step + 1}: {time.perf_counter() - t0:.2f} s, RSS {rss_mb():.0f} MB, peak {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
