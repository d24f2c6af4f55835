"""Atomic local file output: write to a temporary name in the same directory, fsync, then ``os.replace``.

A reader (or a rerun after a kill) therefore sees either the previous complete file or the new complete file,
never a partial one. Temporary names contain ``.tmp.`` (:data:`TMP_MARK`) so that stale ones are easy to
recognise and remove (:func:`remove_stale_tmp`). The one atomic write of the project: checkpoint markers,
DeepSpeed's ``latest`` pointer, the launcher's state file, :func:`pipeline.storage.write_bytes` on a local path
and data_prep's shards, records and manifests all go through it.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

TMP_MARK = ".tmp."


def tmp_path(final: str | Path) -> Path:
    """A fresh temporary name next to ``final`` (same directory, so the rename stays on one file system)."""
    final = Path(final)
    return final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}.{uuid.uuid4().hex[:8]}")


def fsync_replace(tmp: str | Path, final: str | Path) -> None:
    """Flush ``tmp`` to disk, rename it to ``final`` and flush the directory entry (where the file system can)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    try:
        dfd = os.open(os.path.dirname(os.path.abspath(final)), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically, creating its parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        fsync_replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_tmp(directory: str | Path, prefix: str = "") -> list[str]:
    """Delete ``{prefix}*.tmp.*`` leftovers of killed runs in ``directory``; returns the removed names."""
    removed = []
    d = Path(directory)
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith(prefix) and TMP_MARK in p.name and p.is_file():
                p.unlink()
                removed.append(p.name)
    return sorted(removed)
