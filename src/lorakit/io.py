"""Atomic file and directory writes.

A checkpoint, adapter or merged model is either completely there or not there at all:
we write into a temporary sibling, fsync its files and directories, `os.replace` it into place
and fsync the parent, so a crash, SIGKILL or power loss mid-write never leaves a half-written
(or empty) file where a good one was. Temporary siblings are named `.<name>.<random>.tmp`
(`.old` for a directory being swapped out); `remove_stale_temps` clears what a killed run left.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lorakit.errors import LorakitError


_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{6,}\.(tmp|old)$")  # what mkstemp/mkdtemp below create


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory, deepest first."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def umask_mode(directory: bool = False) -> int:
    """The mode a plain open()/mkdir() would give under the user's umask (mkstemp/mkdtemp use 0600/0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def temp_file(path: Path, suffix: str = ".tmp") -> Path:
    """A new, unique, empty sibling of `path` (closed), with the umask's mode; the caller renames or removes it."""
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.", suffix=suffix)
    os.close(fd)
    os.chmod(tmp, umask_mode())
    return Path(tmp)


def publish_file(tmp: Path, path: Path) -> None:
    """fsync `tmp`, rename it over `path`, fsync the directory: `path` is the old file or the whole new one."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def apply_umask(root: Path) -> None:
    """Give `root` and everything under it the modes the umask implies (some writers, like
    safetensors' save_file and mkdtemp, use 0600/0700 whatever the umask says)."""
    file_mode, dir_mode = umask_mode(), umask_mode(directory=True)
    for dirpath, _, files in os.walk(root):
        os.chmod(dirpath, dir_mode)
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & 0o111
                os.chmod(path, dir_mode if executable else file_mode)


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete the temporary siblings an interrupted atomic write left in `directory`; returns them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if _TEMP_NAME.match(p.name)]
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return stale


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, umask_mode())  # mkstemp's 0600 would make results private whatever the umask says
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` when the block succeeds.

    With `overwrite=False` an existing non-empty `path` is an error (nothing the user had is
    touched); with `overwrite=True` the old directory is swapped out only after the new one
    is complete.
    """
    path = Path(path)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise LorakitError(f"{path} already exists; choose another path or pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        apply_umask(tmp)  # mkdtemp's 0700, save_file's 0600: results are as shared as the user's umask says
        fsync_tree(tmp)  # the contents are on disk before the name that publishes them
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            fsync_dir(path.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
            fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
