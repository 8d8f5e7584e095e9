"""The `lorakit` command runs itself with tcmalloc preloaded where it is installed (lorakit.memory)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.memory import allocator_env, allocator_in_use, find_tcmalloc, low_fragmentation


def test_allocator_env(tmp_path: Path) -> None:
    lib = str(tmp_path / "libtcmalloc_minimal.so.4")
    env = allocator_env({"PATH": "/bin"}, library=lib)
    assert env is not None and env["LD_PRELOAD"] == lib and env["PATH"] == "/bin"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
    kept = allocator_env({"LD_PRELOAD": "/opt/other.so"}, library=lib)
    assert kept is not None and kept["LD_PRELOAD"] == f"{lib}:/opt/other.so"  # the user's preload stays
    assert allocator_env({"LORAKIT_ALLOCATOR": "system"}, library=lib) is None
    assert allocator_env({"LD_PRELOAD": lib}, library=lib) is None  # already running with it: no loop


def test_find_tcmalloc(tmp_path: Path) -> None:
    assert find_tcmalloc((str(tmp_path),)) is None
    (tmp_path / "libtcmalloc.so.4").write_bytes(b"")
    assert find_tcmalloc((str(tmp_path),)) == str(tmp_path / "libtcmalloc.so.4")
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert find_tcmalloc((str(tmp_path),)) == str(tmp_path / "libtcmalloc_minimal.so.4")  # the minimal one first


def test_low_fragmentation_is_a_no_op_for_this_process_allocator() -> None:
    with low_fragmentation():
        pass  # glibc: thresholds set and restored; tcmalloc (a preloaded pytest): skipped
    assert allocator_in_use() in ("glibc", "tcmalloc", "other")
