"""Step time, kernel time, page faults and peak RSS of one lorakit training step under each allocator setting.

Builds bench/train_memory.py's run (build_run: SmolLM2-135M-Instruct, LoRA r=16 all-linear, 4 x 512 packed rows)
in this process, takes one warm-up step, then times two (bench/BENCHMARKS.md, "Three more levers"):

    python bench/allocator_probe.py fp32 mmap1m      # glibc, 1 MiB mmap threshold (memory.low_fragmentation)
    python bench/allocator_probe.py fp32 heap        # glibc, everything on the heap
    python bench/allocator_probe.py fp32 layertrim   # glibc heap, malloc_trim after every decoder layer
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python bench/allocator_probe.py fp32 mmap1m   # THP for the mappings
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python bench/allocator_probe.py fp32 plain
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python bench/allocator_probe.py fp32 plain
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time

from train_memory import build_run  # bench/ is on sys.path when run as a script


def main() -> None:
    precision, mode = sys.argv[1], sys.argv[2]
    from lorakit import memory
    from lorakit.data.batching import to_device

    run = build_run(precision)
    batch = to_device(run.stream.next(), run.device)
    libc = memory._LIBC
    if mode in ("heap", "layertrim"):  # no mappings: every tensor from glibc's heap
        libc.mallopt(memory.M_MMAP_THRESHOLD, 512 << 20)
        libc.mallopt(memory.M_TRIM_THRESHOLD, 64 << 20)
    if mode == "layertrim":
        def trim_after(module, args, out):
            libc.malloc_trim(0)
            out = out[0] if isinstance(out, tuple) else out
            if out.requires_grad:
                out.register_hook(lambda grad: libc.malloc_trim(0))

        for module in run.model.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                module.register_forward_hook(trim_after)

    def step() -> None:
        with run.amp():
            loss, _ = run.loss_fn(run.model, batch)
        loss.backward()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)

    with memory.low_fragmentation() if mode == "mmap1m" else contextlib.nullcontext():
        step()
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(2):
            step()
        after, seconds = resource.getrusage(resource.RUSAGE_SELF), (time.perf_counter() - start) / 2
    print(f"{mode} {precision} allocator {memory.allocator_in_use()}: step {seconds:.2f} s, kernel "
          f"{(after.ru_stime - before.ru_stime) / 2:.2f} s, {(after.ru_minflt - before.ru_minflt) // 2} page faults "
          f"per step, peak RSS {memory.peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
