"""ImageNet-layout folders -> FFCV ``{split}.beton`` (fields ``image``: RGBImageField, ``label``: IntField).

Two passes per split:

1. *probe* (parallel, :mod:`data_prep.tasks` pool): every found file is opened and decoded in draft mode; bad
   files are skipped with a reason (FFCV's writer cannot skip a sample once it has counted it, and a worker
   exception would hang its progress loop), conversions are recorded;
2. *write*: ``ffcv.writer.DatasetWriter(tmp, fields, num_workers=workers).from_indexed_dataset(ds)`` where
   ``ds[i]`` decodes the i-th good file to an RGB array downscaled in draft mode to ``max_resolution`` (FFCV's
   own resizer then makes the longer side exactly ``max_resolution``). The file is written to a temporary name
   and renamed when complete, so a rerun after a kill at any point simply redoes the split.

``write_mode="proportion"`` JPEG-compresses a random ``compress_probability`` fraction of the images; the
choice is seeded per sample (``seed + index``), so the same images are compressed on every run. Sample order
is the plan's (train shuffled with ``shuffle_seed``, val sorted), i.e. index ``i`` of the .beton is the same
sample on every run.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .atomic import remove_stale_tmp, sha256_file, tmp_path, fsync_replace
from .images import load_rgb_array, probe_image
from .layout import Sample, class_list, discover_split
from .manifest import build_manifest, is_resize_only, write_classes, write_manifest
from .tasks import default_workers, run_tasks, split_groups

WRITE_MODES = ("raw", "jpg", "smart", "proportion")
FIELDS = ("image", "label")


def import_ffcv():
    """Import ffcv without letting it pin torch to one thread (it calls torch.set_num_threads(1))."""
    import torch

    n = torch.get_num_threads()
    import ffcv  # noqa: F401
    import ffcv.fields  # noqa: F401
    import ffcv.writer  # noqa: F401

    torch.set_num_threads(n)
    return ffcv


def _probe_group(args: tuple[list[Sample], int]) -> list[tuple[str, str | None]]:
    samples, max_side = args
    out = []
    for s in samples:
        if s.label is None:
            out.append(("skipped", s.reason or "no label"))
            continue
        p = probe_image(s.path, max_side)
        out.append((p.status, p.reason))
    return out


class DecodedImages:
    """Indexable dataset for ``DatasetWriter.from_indexed_dataset``: (HxWx3 uint8 RGB, label).

    It never raises (an exception in an FFCV worker would hang the writer): a file that fails now although it
    passed the probe (changed on disk meanwhile) is logged to ``error_file`` and replaced by a 1x1 placeholder;
    :func:`write_ffcv` then discards the whole output and raises.
    """

    def __init__(self, items: list[tuple[str, int]], max_side: int, seed: int, error_file: str):
        self.items = items
        self.max_side = max_side
        self.seed = seed
        self.error_file = error_file

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        np.random.seed((self.seed + i) % (2**32))   # FFCV's 'proportion' mode draws from np.random
        try:
            return load_rgb_array(path, self.max_side), int(label)
        except Exception as e:  # pragma: no cover - only when a file changes between probe and write
            with open(self.error_file, "a") as f:
                f.write(f"{path}\t{type(e).__name__}: {e}\n")
            return np.zeros((1, 1, 3), np.uint8), int(label)


def write_ffcv(src: str | Path, out: str | Path, *, splits: Sequence[str] = ("train", "val"),
               max_resolution: int = 512, write_mode: str = "proportion", compress_probability: float = 0.5,
               jpeg_quality: int = 90, shuffle_seed: int | None = 0, seed: int = 0,
               val_labels: str | Path | None = None, meta: str | Path | None = None, workers: int | None = None,
               chunk_size: int = 100, page_size: int | None = None, progress: bool = True) -> dict[str, dict]:
    """Write ``out/ffcv/{split}.beton`` for each split of ``src``; returns {split: manifest}."""
    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode: {write_mode!r} is not one of {list(WRITE_MODES)}")
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    src, out = Path(src), Path(out)
    out_dir = out / "ffcv"
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = class_list(src, splits[0], val_labels=val_labels, meta=meta)
    write_classes(out, classes)
    workers = workers or default_workers()
    manifests = {}
    for split in splits:
        t0 = time.perf_counter()
        source = discover_split(src, split, classes=classes, val_labels=val_labels, meta=meta,
                                shuffle_seed=shuffle_seed if split == "train" else None)
        samples = source.samples
        removed = remove_stale_tmp(out_dir, f"{split}.beton")
        t1 = time.perf_counter()
        groups = split_groups(samples, max(1, len(samples) // 256) if samples else 1)
        probes = [p for g in run_tasks(_probe_group, [(g, max_resolution) for g in groups], workers=workers,
                                       desc=f"ffcv {split} probe", progress=progress) for p in g]
        skipped, converted, good = [], [], []
        resized = 0
        for s, (status, reason) in zip(samples, probes):
            if status == "skipped":
                skipped.append({"path": s.path, "reason": reason})
                continue
            if status == "converted":
                if is_resize_only(reason):
                    resized += 1
                else:
                    converted.append({"path": s.path, "reason": reason})
                    resized += "resized " in reason
            good.append((s.path, s.label))
        t2 = time.perf_counter()
        final = out_dir / f"{split}.beton"
        tmp = tmp_path(final)
        err = Path(f"{tmp}.errors")
        try:
            fields = {
                "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                       jpeg_quality=jpeg_quality, compress_probability=compress_probability),
                "label": IntField(),
            }
            kw = {"page_size": page_size} if page_size else {}
            writer = DatasetWriter(str(tmp), fields, num_workers=workers, **kw)
            writer.from_indexed_dataset(DecodedImages(good, max_resolution, seed, str(err)), chunksize=chunk_size)
            if err.exists() and err.read_text().strip():
                raise RuntimeError(f"ffcv/{split}: files changed while writing: {err.read_text().splitlines()[:3]}")
            fsync_replace(tmp, final)
        finally:
            for p in (tmp, err):
                if p.exists():
                    p.unlink()
        t3 = time.perf_counter()
        manifest = build_manifest(
            fmt="ffcv", split=split, source=str(src), layout=source.layout, ground_truth=source.ground_truth,
            classes=classes, found=len(samples), written=len(good), skipped=skipped, converted=converted,
            resized=resized,
            params={"max_resolution": max_resolution, "write_mode": write_mode,
                    "compress_probability": compress_probability, "jpeg_quality": jpeg_quality,
                    "shuffle_seed": shuffle_seed if split == "train" else None, "seed": seed, "workers": workers,
                    "chunk_size": chunk_size, "page_size": page_size, "fields": list(FIELDS)},
            timings={"discover_s": round(t1 - t0, 3), "probe_s": round(t2 - t1, 3), "write_s": round(t3 - t2, 3),
                     "total_s": round(time.perf_counter() - t0, 3)},
            outputs={"file": str(final), "num_samples": len(good), "bytes": final.stat().st_size,
                     "sha256": sha256_file(final), "removed_stale": removed},
        )
        write_manifest(out_dir / f"{split}_manifest.json", manifest)
        manifests[split] = manifest
    return manifests
