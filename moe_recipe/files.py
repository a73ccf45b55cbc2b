"""Durable writes: flush files and folders to disk, replace a file atomically. POSIX semantics; no project imports.

A rename or a new file is only durable once its folder is synced too, hence the folder syncs below.
"""

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (files created, renamed or removed in it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder`, then `folder` itself."""
    for path in folder.rglob("*"):
        fsync_path(path)
    fsync_path(folder)


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old content or the new one, never a partial file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


__all__ = ["fsync_path", "fsync_tree", "write_atomic"]
