"""Process memory: RSS readings, and keeping glibc's allocator from hoarding freed memory.

PyTorch's CPU tensors come from glibc malloc. glibc serves a request above its mmap
threshold with a fresh mapping that is returned on free, and smaller ones from its heap,
whose freed holes stay resident. The threshold starts at 128 KiB and rises (up to 32 MiB)
every time a mapped block is freed, so a loop that frees one large tensor per layer ends up
allocating every later one on the heap and leaves a hole per layer: quantizing SmolLM2
tensor by tensor peaked at 761 MB RSS for 107 MB of tensors. `low_fragmentation()` pins the
threshold low while loading (peak 490 MB) and puts a fixed 32 MiB threshold back afterwards,
the value the dynamic rule settles at. Measured in bench/results/qlora_memory-*.md.

Training holds it low too (train/loop.py): a step allocates and frees every layer's activations
(MBs each), and with the dynamic threshold they all land on the heap after the first free, which
then keeps the high-water mark of its holes. On SmolLM2-135M (fp32, 4 x 512 packed rows,
bench/train_memory.py) two steps peaked at 5976 MB RSS with the dynamic threshold and at 3548 MB
with a 1 MiB one, for the same 2052 MiB of saved activations. Elsewhere than glibc these are no-ops.

But a mapping per large tensor is paid in time: every one of a step's ~16 GB of large
allocations is fresh pages the kernel faults in and zeroes. Measured on that step (after issue
23's other changes, 1392 MiB kept; AMD EPYC, 2 cores, fp32): glibc with the 1 MiB threshold
13.0 s per step, 6.9 s of it in the kernel (4.2M page faults), peak 2515 MB; glibc's heap (no
mappings) 8.5 s but 4143 MB, its holes again; trimming the heap after every layer 11.3 s / 2848
MB; transparent huge pages for the mappings (GLIBC_TUNABLES=glibc.malloc.hugetlb=1) 13.3 s;
jemalloc 11.0 s / 2531 MB (it purges freed pages, which are faulted in again); **tcmalloc
(gperftools' tcmalloc_minimal) 8.7 s / 2522 MB**: it keeps freed spans for reuse by size class
without heap holes. So the `lorakit` command runs itself with tcmalloc preloaded where the
library is installed (Debian/Ubuntu: libtcmalloc-minimal4; `make test` and `make demo` install
it best effort), as PyTorch's own CPU launcher does with `--enable-tcmalloc`
(torch.backends.xeon.run_cpu); LORAKIT_ALLOCATOR=system turns that off. Under tcmalloc the glibc
settings above are skipped. Code that calls lorakit as a library keeps its process's allocator.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import resource
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
_STEADY_MMAP = 32 << 20


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        libc.mallopt, libc.malloc_trim  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()


TCMALLOC = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib",
             "/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu")


def allocator_in_use() -> str:
    """'tcmalloc' when this process runs with it, else 'glibc' (or 'other' off glibc)."""
    try:
        if "tcmalloc" in Path("/proc/self/maps").read_text():
            return "tcmalloc"
    except OSError:
        pass
    return "glibc" if _LIBC is not None else "other"


def find_tcmalloc(dirs: tuple[str, ...] = _LIB_DIRS) -> str | None:
    """The path of an installed tcmalloc shared library, or None."""
    for d in dirs:
        for name in TCMALLOC:
            if os.path.isfile(os.path.join(d, name)):
                return os.path.join(d, name)
    return None


def allocator_env(environ: Mapping[str, str], library: str | None = None) -> dict[str, str] | None:
    """The environment to run `lorakit` again with tcmalloc preloaded, or None when it should run as it is:
    LORAKIT_ALLOCATOR=system, tcmalloc already preloaded, not Linux, or no tcmalloc installed."""
    if environ.get("LORAKIT_ALLOCATOR", "auto") != "auto" or "tcmalloc" in environ.get("LD_PRELOAD", ""):
        return None
    if not sys.platform.startswith("linux"):
        return None
    library = library or find_tcmalloc()
    if library is None:
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = ":".join(p for p in (library, environ.get("LD_PRELOAD", "")) if p)
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))  # no stderr line per large tensor
    return env


@contextlib.contextmanager
def low_fragmentation(mmap_threshold: int = 1 << 20) -> Iterator[None]:
    """Serve allocations above `mmap_threshold` from their own mappings for the duration (glibc only: tcmalloc
    reuses freed memory without heap holes, and its mallopt is a stub)."""
    if _LIBC is None or allocator_in_use() == "tcmalloc":
        yield
        return
    _LIBC.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    try:
        yield
    finally:
        _LIBC.mallopt(M_MMAP_THRESHOLD, _STEADY_MMAP)
        _LIBC.mallopt(M_TRIM_THRESHOLD, 2 * _STEADY_MMAP)
        _LIBC.malloc_trim(0)


def rss_mb() -> float | None:
    """Resident memory now (Linux), in MiB."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize() / 2**20
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mb() -> float | None:
    """The process's resident-memory high-water mark, in MiB (since reset_peak, where that works)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    except (OSError, ValueError):
        return None


def reset_peak() -> bool:
    """Restart the high-water mark from the current RSS (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
