"""Deterministic split of a split's samples into shard tasks.

A new shard starts when the current one holds ``max_count`` samples or when adding the next file would take it
over ``max_bytes`` (measured on source file sizes, so the plan is known before any image is decoded and every
shard can be written by an independent task). Stored images are the source bytes or smaller re-encodes, so
source sizes are a tight upper estimate for the bulk of ImageNet. The same inputs always give the same plan,
which is what makes reruns and job arrays reproducible.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from .layout import Sample


@dataclass(frozen=True)
class ShardTask:
    split: str
    index: int                       # shard number: file {split}-{index:06d}.tar
    samples: tuple[Sample, ...]
    out_dir: str                     # OUT/wds
    max_side: int
    quality: int
    plan_id: str                     # hash of everything that determines this shard's bytes

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return 0, -1


def plan_shards(samples: list[Sample], max_count: int, max_bytes: int | None = None) -> list[list[Sample]]:
    """Group ``samples`` (in order) into shards by count and by summed source bytes."""
    if max_count < 1:
        raise ValueError(f"max_count: {max_count} must be >= 1")
    shards: list[list[Sample]] = []
    cur: list[Sample] = []
    cur_bytes = 0
    for s in samples:
        size = s.size if s.size >= 0 else _stat(s.path)[0]
        if cur and (len(cur) >= max_count or (max_bytes and cur_bytes + size > max_bytes)):
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(s)
        cur_bytes += size
    if cur:
        shards.append(cur)
    return shards


def plan_id(split: str, index: int, samples: list[Sample], params: dict) -> str:
    """Fingerprint of a shard's inputs (keys, paths, labels, sizes + mtimes, writer params)."""
    h = hashlib.sha256()
    h.update(json.dumps({"split": split, "index": index, "params": params}, sort_keys=True).encode())
    for s in samples:
        stamp = (s.size, s.mtime_ns) if s.size >= 0 else _stat(s.path)
        h.update(json.dumps([s.key, s.path, s.label, s.reason, *stamp]).encode())
    return h.hexdigest()[:16]


def make_tasks(split: str, samples: list[Sample], out_dir: str, *, max_count: int, max_bytes: int | None,
               max_side: int, quality: int) -> list[ShardTask]:
    params = {"max_side": max_side, "quality": quality, "max_count": max_count, "max_bytes": max_bytes}
    tasks = []
    for i, group in enumerate(plan_shards(samples, max_count, max_bytes)):
        tasks.append(ShardTask(split, i, tuple(group), str(out_dir), max_side, quality,
                               plan_id(split, i, group, params)))
    return tasks
