"""Per-output manifests: what was found, written, converted and skipped (with reasons), params and timings.

The counts always reconcile: ``written + skipped == found`` (a converted file is written, so it is counted in
``written``; ``converted`` lists it with its reason). Plain downscales of large images are frequent on real data,
so they are only counted (``counts.resized``); a file with any other conversion is listed in ``converted``.
"""
from __future__ import annotations

import datetime as _dt
import platform
import socket
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pipeline import storage

from .atomic import write_json_atomic


def reason_kind(reason: str) -> str:
    """Group free-text reasons: 'truncated (OSError: ...)' -> 'truncated', 'resized 800x600->...' -> 'resized'."""
    if reason.startswith("resized "):
        return "resized"
    return reason.split(" (")[0]


def is_resize_only(reason: str | None) -> bool:
    """True when the only conversion was a downscale (those are counted, not listed, in manifests)."""
    return bool(reason) and all(r.startswith("resized ") for r in reason.split(", "))


@dataclass
class SampleOutcomes:
    """What became of a split's (or a shard's) files: the skipped and converted ones with their reasons, and how
    many were downscaled (a file converted only by a downscale is counted, not listed)."""

    skipped: list[dict] = field(default_factory=list)
    converted: list[dict] = field(default_factory=list)
    resized: int = 0

    def record(self, path: str, status: str, reason: str | None) -> bool:
        """Count one file's outcome (``status`` as images.prepare_image/probe_image give it); False: skipped."""
        if status == "skipped":
            self.skipped.append({"path": path, "reason": reason})
            return False
        if status == "converted":
            if is_resize_only(reason):
                self.resized += 1
            else:
                self.converted.append({"path": path, "reason": reason})
                self.resized += "resized " in reason
        return True


def build_manifest(*, fmt: str, split: str, source: str, layout: str, ground_truth: str | None,
                   classes: list[str], found: int, written: int, skipped: Iterable[dict],
                   converted: Iterable[dict], resized: int, params: dict, timings: dict,
                   outputs: dict) -> dict[str, Any]:
    skipped = sorted(skipped, key=lambda r: r["path"])
    converted = sorted(converted, key=lambda r: r["path"])
    if written + len(skipped) != found:
        raise RuntimeError(f"{fmt}/{split}: counts do not reconcile: written {written} + skipped "
                           f"{len(skipped)} != found {found}")
    return {
        "format": fmt,
        "split": split,
        "source": source,
        "layout": layout,
        "ground_truth": ground_truth,
        "counts": {"found": found, "written": written, "skipped": len(skipped), "converted": len(converted),
                   "resized": resized},
        "skipped_by_reason": dict(sorted(Counter(reason_kind(r["reason"]) for r in skipped).items())),
        "converted_by_reason": dict(sorted(Counter(reason_kind(c) for r in converted
                                                   for c in r["reason"].split(", ")).items())),
        "skipped": skipped,
        "converted": converted,
        "num_classes": len(classes),
        "classes": classes,
        "params": params,
        "timings": timings,
        "outputs": outputs,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
    }


def write_classes(out: str | Path, classes: list[str]) -> str:
    """``OUT/classes.json`` = {"classes": [...]} (index = position); ``out`` may be an ``s3://`` URL."""
    p = storage.join(out, "classes.json")
    if not storage.is_url(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    write_json_atomic(p, {"classes": list(classes)})
    return p
