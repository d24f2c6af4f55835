"""data_prep's JSON records and checksums: written whole (local files through :mod:`pipeline.atomic`: temp name,
fsync, ``os.replace``), read back tolerantly.

:func:`write_json_atomic` and :func:`read_json` also take ``s3://`` URLs (:mod:`pipeline.storage`): an S3 PUT
is atomic by itself, so there is no temp object.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline import storage


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """``obj`` as indented JSON, written whole (:func:`pipeline.storage.write_bytes`: one S3 PUT, or a local
    :func:`pipeline.atomic.write_atomic`)."""
    storage.write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


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
