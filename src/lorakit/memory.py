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
with a 1 MiB one, for the same 2052 MiB of saved activations; allocating, filling and freeing
such tensors took the same time either way (large ones are page-faulted in both cases).
Elsewhere than glibc these are no-ops.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import resource
from collections.abc import Iterator

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


def trim() -> None:
    """Give freed heap pages back to the OS (glibc malloc_trim)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


@contextlib.contextmanager
def low_fragmentation(mmap_threshold: int = 1 << 20) -> Iterator[None]:
    """Serve allocations above `mmap_threshold` from their own mappings for the duration."""
    if _LIBC is None:
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
