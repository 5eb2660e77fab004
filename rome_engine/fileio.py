"""Atomic file writes: a reader (or a start after a crash) sees the old file or
the whole new one, never a part.

The order: a temp file ``.<name>.<random>.tmp`` next to the target, written and
fsynced, renamed over the target, then the folder fsynced so the rename is
durable. A write that fails removes its temp file and re-raises; a temp file a
crash leaves behind is never read (its name is not the target's).

    atomic_write(path, data)                                          # bytes
    atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp))) # a writer that wants a path
    write_json(path, {"layer": 6})
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_with(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temp file next to ``path``, fsync it, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: Path, data: object, *, indent: int = 1) -> None:
    atomic_write(path, json.dumps(data, indent=indent).encode("utf-8"))
