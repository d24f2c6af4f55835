"""ImageNet-layout folders -> FFCV ``{split}.beton`` (fields ``image``: RGBImageField, ``label``: IntField).

One task per split (:func:`write_split`). FFCV's ``DatasetWriter`` writes a single file, so a split cannot be
divided between jobs: with ``cluster="pool"`` the splits run one after the other in this process, each using
``workers`` processes; with ``cluster="local" | "debug" | "slurm"`` each split is one array job of the same
executor code the WebDataset shards use (:func:`data_prep.tasks.run_tasks`), and uses the job's cores.

A split task, in order:

0. *reuse*: if ``{split}_manifest.json`` exists, was written for the same plan (``outputs.plan_id``: a hash of
   the split's files -- keys, paths, labels, sizes, mtimes -- and of every parameter that changes the .beton's
   content) and the .beton under its final name has the manifest's size, sha256 and (FFCV header) sample count,
   the split is complete and is not touched (nor is its manifest); leftover temp files are removed. The check
   reads the whole file once (sha256) but needs no ffcv import, no probe and no decode;
1. *probe* (parallel, :mod:`data_prep.tasks` pool): every found file is opened and decoded in draft mode; bad
   files are skipped with a reason (FFCV's writer cannot skip a sample once it has counted it, and a worker
   exception would hang its progress loop), conversions are recorded;
2. *write*: ``ffcv.writer.DatasetWriter(tmp, fields, num_workers=workers).from_indexed_dataset(ds)`` where
   ``ds[i]`` decodes the i-th good file to an RGB array downscaled in draft mode to ``max_resolution`` (FFCV's
   own resizer then makes the longer side exactly ``max_resolution``). The file is written to
   ``{split}.beton.tmp.<pid>.<rand>``, fsynced and renamed when complete; only then is the manifest (with the
   file's size and sha256) written, atomically. A kill at any point leaves no final file, or a final file that
   does not match the manifest (redone), or a complete, matching pair (this run's, or an earlier run's, which
   is reused only for the same plan); a temp name is never taken for a complete file (the reuse check only looks
   at the final name) and is deleted by the next run.

``write_mode="proportion"`` JPEG-compresses a random ``compress_probability`` fraction of the images; the
choice is seeded per sample (``seed + index``), so the same images are compressed on every run. Sample order
is the plan's (train shuffled with ``shuffle_seed``, val sorted), i.e. index ``i`` of the .beton is the same
sample, with the same stored bytes, on every run (the file's byte layout may differ with ``workers > 1``: FFCV's
workers allocate pages as they finish).

With ``minival_fraction`` > 0 one more task writes ``minival.beton``, carved from train (:mod:`data_prep.minival`);
the train and minival tasks each discover train and carve it (the carve depends on the files alone), so they
can run as separate array jobs.

One writer per output directory: a run removes the ``*.tmp.*`` files of its splits, whoever left them.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.atomic import TMP_MARK, fsync_replace, remove_stale_tmp, tmp_path

from .atomic import read_json, sha256_file, write_json_atomic
from .images import load_rgb_array, probe_image
from .layout import Sample, SplitSource, class_list, discover_split
from .manifest import SampleOutcomes, build_manifest, write_classes
from .minival import MINIVAL, SOURCE, carve
from .sharding import plan_id
from .tasks import CLUSTERS, default_workers, run_tasks, split_groups

WRITE_MODES = ("raw", "jpg", "smart", "proportion")
FIELDS = ("image", "label")


def import_ffcv():
    """Import ffcv's writer without letting it pin torch to one thread (it calls torch.set_num_threads(1))."""
    # local: pipeline.ffcv_compat imports torch (~1 s); data_prep's --help and a WebDataset run need neither
    from pipeline.ffcv_compat import import_ffcv as import_keeping_threads

    return import_keeping_threads(("ffcv.fields", "ffcv.writer"))


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


@dataclass(frozen=True)
class FfcvSplitTask:
    """Everything one split's task needs (pickled into an array job for cluster != "pool")."""

    split: str
    src: str
    out: str
    classes: tuple[str, ...]
    val_labels: str | None
    meta: str | None
    shuffle_seed: int | None
    max_resolution: int
    write_mode: str
    compress_probability: float
    jpeg_quality: int
    seed: int
    workers: int | None          # None: every core this process may use (the job's, on a cluster)
    chunk_size: int
    page_size: int | None
    cluster: str
    progress: bool
    minival_fraction: float = 0.0   # > 0: train and minival are the two parts of the carve (data_prep.minival)
    minival_seed: int = 0

    @property
    def carved(self) -> bool:
        return self.minival_fraction > 0 and self.split in (SOURCE, MINIVAL)

    def content_params(self) -> dict[str, Any]:
        """The parameters that change what the .beton holds (part of the plan id)."""
        params = {"format": "ffcv-1", "max_resolution": self.max_resolution, "write_mode": self.write_mode,
                  "compress_probability": self.compress_probability, "jpeg_quality": self.jpeg_quality,
                  "seed": self.seed, "page_size": self.page_size, "shuffle_seed": self.shuffle_seed,
                  "classes": list(self.classes)}
        if self.carved:
            params |= {"minival_fraction": self.minival_fraction, "minival_seed": self.minival_seed}
        return params

    def manifest_params(self, workers: int) -> dict[str, Any]:
        """The manifest's ``params`` (``workers``: the process count the write used)."""
        return {"max_resolution": self.max_resolution, "write_mode": self.write_mode,
                "compress_probability": self.compress_probability, "jpeg_quality": self.jpeg_quality,
                "shuffle_seed": self.shuffle_seed, "seed": self.seed, "workers": workers,
                "chunk_size": self.chunk_size, "page_size": self.page_size, "fields": list(FIELDS),
                "cluster": self.cluster}

    def source(self) -> tuple[SplitSource | None, dict | None]:
        """(the split's samples, the minival carve's record or None). Train and minival discover train and carve
        it, each in its own task: the carve depends on the files alone, so both carve the same set. None: this
        is minival and the carve is empty."""
        found = discover_split(self.src, SOURCE if self.split == MINIVAL else self.split, classes=list(self.classes),
                               val_labels=self.val_labels, meta=self.meta, shuffle_seed=self.shuffle_seed)
        if not self.carved:
            return found, None
        parts = carve(found, self.minival_fraction, self.minival_seed)
        return (parts.minival if self.split == MINIVAL else parts.train), parts.record()


# The fixed header at the start of every .beton (ffcv.types.HeaderType, format version 2 of ffcv 1.0). Read
# here with numpy alone so that checking a complete split does not import ffcv (seconds of numba compiling).
BETON_HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                         ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)


def beton_num_samples(path: str | Path) -> int:
    """Sample count from the .beton's header; raises ValueError when the header is short or implausible."""
    size = os.path.getsize(path)
    h = np.fromfile(str(path), dtype=BETON_HEADER, count=1)
    if len(h) != 1 or not 0 < int(h[0]["alloc_table_ptr"]) <= size:
        raise ValueError(f"{path}: no valid .beton header")
    return int(h[0]["num_samples"])


def check_complete(final: Path, manifest: dict | None, plan: str) -> str | None:
    """None when ``final`` is the complete output of ``plan`` recorded by ``manifest``, else why it is not."""
    if manifest is None:
        return "no manifest"
    o = manifest.get("outputs", {})
    if o.get("plan_id") != plan:
        return "manifest is for another plan"
    if not final.is_file():
        return f"{final.name} missing"
    if final.stat().st_size != o.get("bytes"):
        return f"{final.name} size differs from the manifest"
    try:
        n = beton_num_samples(final)
    except Exception as e:  # noqa: BLE001 - any unreadable header means: redo
        return f"{final.name} unreadable ({type(e).__name__})"
    if n != o.get("num_samples") or n != manifest.get("counts", {}).get("written"):
        return f"{final.name} holds {n} samples, the manifest {o.get('num_samples')}"
    if sha256_file(final) != o.get("sha256"):
        return f"{final.name} sha256 differs from the manifest"
    return None


def _remove_stale(out_dir: Path, split: str) -> list[str]:
    """Temp files of killed runs: ``{split}.beton.tmp.*`` (+ ``.errors``) and ``{split}_manifest.json.tmp.*``."""
    return sorted(remove_stale_tmp(out_dir, f"{split}.beton{TMP_MARK}")
                  + remove_stale_tmp(out_dir, f"{split}_manifest.json{TMP_MARK}"))


def drop_split(out_dir: Path, split: str) -> list[str]:
    """Remove ``{split}.beton``, its manifest and their temp files; returns the names removed."""
    removed = _remove_stale(out_dir, split)
    for name in (f"{split}_manifest.json", f"{split}.beton"):   # the manifest first: it marks the file complete
        if (out_dir / name).is_file():
            (out_dir / name).unlink()
            removed.append(name)
    return removed


def _reused(stored: dict, removed: list[str], started: float) -> dict[str, Any]:
    """The stored manifest of a complete split, as returned for a run that left it untouched."""
    stored["reused"] = True
    stored["timings"] = {**stored["timings"], "reuse_check_s": round(time.perf_counter() - started, 3)}
    stored["outputs"] = {**stored["outputs"], "removed_stale": removed}
    return stored


def _probe_split(task: FfcvSplitTask, samples: list[Sample],
                 workers: int) -> tuple[SampleOutcomes, list[tuple[str, int]]]:
    """Probe every file in ``workers`` processes: (the outcomes, (path, label) of each file to write)."""
    groups = split_groups(samples, max(1, len(samples) // 256) if samples else 1)
    probes = [p for g in run_tasks(_probe_group, [(g, task.max_resolution) for g in groups], workers=workers,
                                   desc=f"ffcv {task.split} probe", progress=task.progress) for p in g]
    outcomes = SampleOutcomes()
    good = []
    for s, (status, reason) in zip(samples, probes):
        if outcomes.record(s.path, status, reason):
            good.append((s.path, s.label))
    return outcomes, good


def _write_beton(task: FfcvSplitTask, final: Path, good: list[tuple[str, int]], workers: int) -> tuple[int, str]:
    """Write ``good`` to a temp .beton, then rename it to ``final`` (fsynced); returns its (bytes, sha256)."""
    from ffcv.fields import IntField, RGBImageField  # local: ffcv (numba, ~3 s) only to write a split
    from ffcv.writer import DatasetWriter  # local: as ffcv.fields

    tmp = tmp_path(final)
    err = Path(f"{tmp}.errors")
    try:
        fields = {
            "image": RGBImageField(write_mode=task.write_mode, max_resolution=task.max_resolution,
                                   jpeg_quality=task.jpeg_quality, compress_probability=task.compress_probability),
            "label": IntField(),
        }
        kw = {"page_size": task.page_size} if task.page_size else {}
        writer = DatasetWriter(str(tmp), fields, num_workers=workers, **kw)
        writer.from_indexed_dataset(DecodedImages(good, task.max_resolution, task.seed, str(err)),
                                    chunksize=task.chunk_size)
        if err.exists() and err.read_text().strip():
            raise RuntimeError(f"ffcv/{task.split}: files changed while writing: {err.read_text().splitlines()[:3]}")
        nbytes, sha = tmp.stat().st_size, sha256_file(tmp)
        fsync_replace(tmp, final)
    finally:
        for p in (tmp, err):
            if p.exists():
                p.unlink()
    return nbytes, sha


def write_split(task: FfcvSplitTask) -> dict[str, Any]:
    """Write (or reuse) ``OUT/ffcv/{split}.beton`` and its manifest; returns the manifest.

    Idempotent: a rerun after a completed write does nothing but check the file (``manifest["reused"]`` is
    then True in the returned dict; the stored manifest is the one of the write that made the file).
    """
    split = task.split
    src, out_dir = Path(task.src), Path(task.out) / "ffcv"
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = task.workers or default_workers()
    t0 = time.perf_counter()
    source, record = task.source()
    final = out_dir / f"{split}.beton"
    manifest_path = out_dir / f"{split}_manifest.json"
    if source is None:   # an empty carve: no minival (an earlier one would hold images train now has)
        return {"split": split, "removed": drop_split(out_dir, split)}
    plan = plan_id(split, 0, source.samples, task.content_params())
    stored = read_json(manifest_path)
    why = check_complete(final, stored, plan)
    removed = _remove_stale(out_dir, split)
    if why is None:
        return _reused(stored, removed, t0)
    t_check = time.perf_counter()
    import_ffcv()   # only now: a reused split needs no ffcv
    t1 = time.perf_counter()
    outcomes, good = _probe_split(task, source.samples, workers)
    t2 = time.perf_counter()
    nbytes, sha = _write_beton(task, final, good, workers)
    t3 = time.perf_counter()
    manifest = build_manifest(
        fmt="ffcv", split=split, source=str(src), layout=source.layout, ground_truth=source.ground_truth,
        classes=list(task.classes), found=len(source.samples), written=len(good), skipped=outcomes.skipped,
        converted=outcomes.converted, resized=outcomes.resized,
        params=task.manifest_params(workers) | ({MINIVAL: record} if record else {}),
        timings={"discover_s": round(t_check - t0, 3), "import_ffcv_s": round(t1 - t_check, 3),
                 "probe_s": round(t2 - t1, 3), "write_s": round(t3 - t2, 3),
                 "total_s": round(time.perf_counter() - t0, 3)},
        outputs={"file": str(final), "num_samples": len(good), "bytes": nbytes, "sha256": sha,
                 "plan_id": plan, "redo_reason": why, "removed_stale": removed},
    )
    manifest["reused"] = False
    write_json_atomic(manifest_path, manifest)   # last: the .beton counts as complete only once this exists
    return manifest


def write_ffcv(src: str | Path, out: str | Path, *, splits: Sequence[str] = ("train", "val"),
               max_resolution: int = 512, write_mode: str = "proportion", compress_probability: float = 0.5,
               jpeg_quality: int = 90, shuffle_seed: int | None = 0, seed: int = 0,
               val_labels: str | Path | None = None, meta: str | Path | None = None, workers: int | None = None,
               chunk_size: int = 100, page_size: int | None = None, progress: bool = True,
               cluster: str = "pool", folder: str | Path | None = None, array_size: int | None = None,
               executor_params: dict | None = None, minival_fraction: float = 0.0,
               minival_seed: int = 0) -> dict[str, dict]:
    """Write (or reuse) ``out/ffcv/{split}.beton`` for each split of ``src``; returns {split: manifest}.

    ``cluster="pool"`` runs the splits here, one after the other; ``"local" | "debug" | "slurm"`` runs one array
    job per split (at most ``array_size`` jobs, default one per split) through :func:`data_prep.tasks.run_tasks`
    with submitit folder ``folder`` (default ``out/logs/ffcv``) and ``executor_params`` (make_executor's).
    ``workers`` is the process count inside each split's task (default: all cores the task may use).
    ``minival_fraction`` > 0 (with ``train`` in ``splits``): one more task writes ``minival.beton``, carved from
    train (:mod:`data_prep.minival`, ``minival_seed``), and train's holds the rest; both manifests record the
    carve. Otherwise (or when the carve is empty) writing train removes an earlier run's minival. (0 here keeps
    library callers' data as it was; the command line defaults to 1 %.)
    """
    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode: {write_mode!r} is not one of {list(WRITE_MODES)}")
    if cluster not in CLUSTERS:
        raise ValueError(f"cluster: {cluster!r} is not one of {list(CLUSTERS)}")
    if MINIVAL in splits:
        raise ValueError(f"splits: {MINIVAL!r} is carved from {SOURCE!r} (minival_fraction), not read from src")
    src, out = Path(src), Path(out)
    (out / "ffcv").mkdir(parents=True, exist_ok=True)
    classes = class_list(src, splits[0], val_labels=val_labels, meta=meta)
    remove_stale_tmp(out, f"classes.json{TMP_MARK}")
    write_classes(out, classes)
    carved = minival_fraction > 0 and SOURCE in splits
    if SOURCE in splits and not carved:
        drop_split(out / "ffcv", MINIVAL)
    tasks = [FfcvSplitTask(split=split, src=str(src), out=str(out), classes=tuple(classes),
                           val_labels=None if val_labels is None else str(val_labels),
                           meta=None if meta is None else str(meta),
                           shuffle_seed=shuffle_seed if split == "train" else None,
                           max_resolution=max_resolution, write_mode=write_mode,
                           compress_probability=compress_probability, jpeg_quality=jpeg_quality, seed=seed,
                           workers=workers, chunk_size=chunk_size, page_size=page_size, cluster=cluster,
                           progress=progress, minival_fraction=minival_fraction if carved else 0.0,
                           minival_seed=minival_seed)
             for split in (*splits, MINIVAL) if split != MINIVAL or carved]
    if cluster == "pool":
        results = [write_split(t) for t in tasks]
    else:
        results = run_tasks(write_split, tasks, cluster=cluster, workers=workers,
                            folder=folder or (out / "logs" / "ffcv"), array_size=array_size or len(tasks),
                            desc="ffcv", progress=progress, **(executor_params or {}))
    manifests = {}
    for t, m in zip(tasks, results):
        if t.split == MINIVAL and "removed" in m:   # the carve was empty: no minival
            continue
        if m.get("split") != t.split or not (out / "ffcv" / f"{t.split}.beton").is_file():
            raise RuntimeError(f"ffcv/{t.split}: output missing after its task finished")
        manifests[t.split] = m
    return manifests
