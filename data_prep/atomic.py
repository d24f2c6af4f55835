"""Atomic file output: write to a temporary name in the same directory, fsync, then ``os.replace``.

A reader (or a rerun after a kill) therefore sees either the previous complete file or the new complete file,
never a partial one. Temporary names contain ``.tmp.`` so that stale ones are easy to recognise and remove.
:func:`write_json_atomic` and :func:`read_json` also take ``s3://`` URLs (:mod:`pipeline.storage`): an S3 PUT
is atomic by itself, so there is no temp object.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

from pipeline import storage

TMP_MARK = ".tmp."


def tmp_path(final: str | Path) -> Path:
    final = Path(final)
    return final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}.{uuid.uuid4().hex[:8]}")


def fsync_replace(tmp: str | Path, final: str | Path) -> None:
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


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        fsync_replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | Path, obj: Any) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
    if storage.is_url(path):
        storage.write_bytes(path, data)
    else:
        write_bytes_atomic(path, data)


def read_json(path: str | Path) -> Any | None:
    """The parsed JSON file, or None when it is missing or unreadable (e.g. from an older, killed run).
    A URL that cannot be reached raises :class:`pipeline.storage.StorageError` (it is not "missing")."""
    if storage.is_url(path):
        try:
            return json.loads(storage.read_bytes(path))
        except storage.NotFound:
            return None
        except ValueError:
            return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


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
