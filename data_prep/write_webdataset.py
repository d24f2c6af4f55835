"""ImageNet-layout folders -> WebDataset tar shards + timm-style ``_info.json`` + manifest.

Output (``OUT/wds``): ``{split}-{i:06d}.tar`` with samples ``__key__`` / ``jpg`` / ``cls``; ``_info.json``;
``{split}_manifest.json``; ``_parts/{split}-{i:06d}.tar.json`` (one record per finished shard, used to resume).

Each shard is one independent, idempotent task (:func:`write_shard`):

1. if the shard and its record exist, the record's ``plan_id`` matches the task and the file's sha256 matches
   the record, the shard is reused;
2. otherwise it is written to ``{name}.tmp.<pid>.<rand>`` and fsynced, its record is written (atomically), and
   then it is renamed, so a shard under its final name always has a record (a kill between the two leaves a
   record whose shard is missing: redone). Tar headers are fixed (mtime 0, fixed owner/mode) and the sample
   order is the plan's, so a rewritten shard is byte-identical to a clean run's.

With ``minival_fraction`` > 0 the split ``minival`` is carved from train (:mod:`data_prep.minival`) and written
like the others (``minival-{i:06d}.tar``, its ``_info.json`` entry and manifest); train then holds the rest.

The split's ``_info.json`` entry and manifest are written last, after every task has finished, so a reader
never sees an index that points to missing or partial shards.
Both (and ``classes.json``) are written atomically (temp name + fsync + rename, :mod:`data_prep.atomic`): a kill
while writing them leaves the previous complete version (or none) plus a ``*.tmp.*`` file, which the next run
deletes (reported in the manifest's ``outputs.removed_stale``) before rewriting the index from the shard records.
One writer per output directory: a run removes the ``*.tmp.*`` files of its splits, whoever left them.

``out`` may be an ``s3://bucket/prefix`` URL (:mod:`pipeline.storage`; credentials and endpoint from the standard
AWS variables and files). Each task then writes its shard to a local temp file and uploads it after its record:
a shard object is visible only once complete (a single PUT, or a multipart upload completed or aborted); the
object carries its sha256 as metadata, and a rerun reuses a shard whose recorded size and sha256 match the
object's. ``_info.json`` and the manifests are still written last. Multipart uploads that a killed task left
incomplete are aborted by the next run (listed in ``outputs.removed_stale``).
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from webdataset import TarWriter

from pipeline import storage
from pipeline.atomic import TMP_MARK, remove_stale_tmp, tmp_path

from .atomic import read_json, sha256_file, write_json_atomic
from .images import prepare_image
from .layout import SplitSource, class_list, discover_split
from .manifest import SampleOutcomes, build_manifest, write_classes
from .minival import MINIVAL, SOURCE, carve
from .sharding import ShardTask, make_tasks, shard_name
from .tasks import run_tasks

TAR_MTIME = 0          # fixed header fields -> byte-identical shards across runs and machines
TAR_USER = TAR_GROUP = "bigdata"
TAR_MODE = 0o444
PARTS = "_parts"


def record_path(out_dir: str | Path, name: str) -> str:
    return storage.join(out_dir, PARTS, f"{name}.json")


def _reusable(task: ShardTask, final: str, rec: dict | None) -> bool:
    if not rec or rec.get("plan_id") != task.plan_id:
        return False
    if storage.is_url(final):   # the sha256 the uploader computed from the bytes it sent, stored on the object
        try:
            st = storage.stat(final)
        except storage.NotFound:
            return False
        return st["size"] == rec.get("bytes") and st["metadata"].get("sha256") == rec.get("sha256")
    p = Path(final)
    if not p.is_file() or p.stat().st_size != rec.get("bytes"):
        return False
    return sha256_file(p) == rec.get("sha256")


@dataclass
class _ShardContent:
    """What one shard holds once written: its sample keys, the source files' outcomes and source bytes."""

    keys: list[str] = field(default_factory=list)
    outcomes: SampleOutcomes = field(default_factory=SampleOutcomes)
    source_bytes: int = 0


def _write_tar(task: ShardTask, path: Path) -> _ShardContent:
    """Write the task's samples, in plan order, as a tar with fixed headers to ``path`` (fsynced)."""
    content = _ShardContent()
    with open(path, "wb") as f:
        with TarWriter(f, user=TAR_USER, group=TAR_GROUP, mode=TAR_MODE, encoder=False, mtime=TAR_MTIME) as tw:
            for s in task.samples:
                if s.label is None:
                    content.outcomes.record(s.path, "skipped", s.reason or "no label")
                    continue
                p = prepare_image(s.path, task.max_side, task.quality)
                if not content.outcomes.record(s.path, p.status, p.reason):
                    continue
                content.source_bytes += p.source_bytes
                tw.write({"__key__": s.key, "jpg": p.data, "cls": str(s.label).encode("ascii")})
                content.keys.append(s.key)
        f.flush()
        os.fsync(f.fileno())
    return content


def _shard_record(task: ShardTask, tmp: Path, content: _ShardContent, started: float) -> dict[str, Any]:
    """The shard's record (``_parts/{name}.json``): counts, bytes and sha256 of the written file, outcomes."""
    return {
        "name": task.name,
        "split": task.split,
        "index": task.index,
        "plan_id": task.plan_id,
        "num_samples": len(content.keys),
        "found": len(task.samples),
        "bytes": tmp.stat().st_size,
        "sha256": sha256_file(tmp),
        "source_bytes": content.source_bytes,
        "keys": content.keys,
        "skipped": content.outcomes.skipped,
        "converted": content.outcomes.converted,
        "resized": content.outcomes.resized,
        "seconds": round(time.perf_counter() - started, 4),
        "reused": False,
    }


def write_shard(task: ShardTask) -> dict[str, Any]:
    """Write (or reuse) one shard; returns its record (counts, bytes, sha256, skipped/converted lists)."""
    remote = storage.is_url(task.out_dir)
    final = storage.join(task.out_dir, task.name)
    rec_file = record_path(task.out_dir, task.name)
    rec = read_json(rec_file)
    if _reusable(task, final, rec):
        rec["reused"] = True
        return rec
    t0 = time.perf_counter()
    tmp = tmp_path(Path(tempfile.gettempdir()) / task.name if remote else final)
    try:
        rec = _shard_record(task, tmp, _write_tar(task, tmp), t0)
        # Record first, then the shard: once the shard exists under its final name its record does too.
        if not remote:
            Path(rec_file).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(rec_file, rec)
        if remote:
            storage.upload_file(tmp, final, metadata={"sha256": rec["sha256"]})
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    return rec


def _remove_stale_shards(out_dir: str, split: str, n_shards: int) -> list[str]:
    """Temp files of killed runs (shards, their records, the split's manifest; on S3: incomplete multipart
    uploads) and shards of an earlier plan with more shards than this one (and their records) must not linger."""
    def stale(name: str) -> bool:
        stem = name[len(split) + 1:-len(".tar")]
        return name.startswith(f"{split}-") and name.endswith(".tar") and stem.isdigit() and int(stem) >= n_shards

    if storage.is_url(out_dir):
        removed = [k.rpartition("/")[2] for k in storage.abort_uploads(storage.join(out_dir, f"{split}-"))]
        for name in storage.listdir(out_dir):
            if stale(name):
                storage.delete(storage.join(out_dir, name))
                storage.delete(record_path(out_dir, name))
                removed.append(name)
        return removed
    d = Path(out_dir)
    removed = remove_stale_tmp(d, f"{split}-")
    removed += [f"{PARTS}/{n}" for n in remove_stale_tmp(d / PARTS, f"{split}-")]
    removed += remove_stale_tmp(d, f"{split}_manifest.json{TMP_MARK}")
    for p in sorted(d.glob(f"{split}-*.tar")):
        if stale(p.name):
            p.unlink()
            Path(record_path(d, p.name)).unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def update_info(out_dir: str | Path, name: str, num_classes: int, split: str, recs: list[dict],
                extra: dict | None = None) -> dict:
    """Merge this split's entry into ``_info.json`` (timm conventions + per-shard bytes and sha256; ``extra``:
    more fields of the entry, e.g. the minival carve)."""
    info_path = storage.join(out_dir, "_info.json")
    info = read_json(info_path) or {}
    info.setdefault("name", name)
    info["num_classes"] = num_classes
    splits = info.setdefault("splits", {})
    splits[split] = {
        "name": split,
        "num_samples": sum(r["num_samples"] for r in recs),
        "filenames": [r["name"] for r in recs],
        "shard_lengths": [r["num_samples"] for r in recs],
        "shard_bytes": [r["bytes"] for r in recs],
        "shard_sha256": [r["sha256"] for r in recs],
        **(extra or {}),
    }
    info["splits"] = dict(sorted(splits.items()))
    write_json_atomic(info_path, info)
    return info


@dataclass(frozen=True)
class _WdsRun:
    """One write_webdataset call: where it reads and writes, and the settings every split shares."""

    src: Path
    out: str | Path
    out_dir: str
    classes: list[str]
    name: str
    max_side: int
    quality: int
    shard_max_count: int
    shard_max_bytes: int | None
    shuffle_seed: int | None
    val_labels: str | Path | None
    meta: str | Path | None
    cluster: str
    workers: int | None
    folder: str | Path | None
    array_size: int | None
    progress: bool
    executor_params: dict | None

    def split_seed(self, split: str) -> int | None:
        return self.shuffle_seed if split == "train" else None

    def log_folder(self, split: str) -> str | Path | None:
        return self.folder or (None if storage.is_url(self.out) else Path(self.out, "logs", f"wds_{split}"))

    def params(self, split: str) -> dict[str, Any]:
        """The manifest's ``params``."""
        return {"max_side": self.max_side, "quality": self.quality, "shard_max_count": self.shard_max_count,
                "shard_max_bytes": self.shard_max_bytes, "shuffle_seed": self.split_seed(split),
                "cluster": self.cluster, "workers": self.workers, "array_size": self.array_size}


def _open_output(out: str | Path, cluster: str, folder: str | Path | None) -> tuple[str | Path, str, list[str]]:
    """Check ``out`` and make ``out/wds``: (out, out/wds, the index temp files a killed run left, now removed)."""
    remote = storage.is_url(out)
    if remote and not str(out).startswith("s3://"):
        raise ValueError(f"out: {out!r}: only local folders and s3:// URLs can be written")
    if remote and cluster != "pool" and folder is None:
        raise ValueError(f"folder: a local log folder is needed for cluster={cluster!r} with out={out!r}")
    out = str(out) if remote else Path(out)
    out_dir = storage.join(out, "wds")
    if remote:
        storage.listdir(out_dir)   # the bucket is reachable and readable: fail now, before any image is read
        return out, out_dir, []
    Path(out_dir, PARTS).mkdir(parents=True, exist_ok=True)
    # temp files of a run killed while writing the index or the class list (the finals are written
    # atomically, so what is there under the final name is a complete earlier version, or nothing)
    removed_index = remove_stale_tmp(out, f"classes.json{TMP_MARK}") + remove_stale_tmp(
        out_dir, f"_info.json{TMP_MARK}")
    return out, out_dir, removed_index


def _check_shards(out_dir: str, split: str, tasks: list[ShardTask], recs: list[dict]) -> None:
    """Every planned shard came back from its task, for this plan, and is there under its final name."""
    if [r["name"] for r in recs] != [t.name for t in tasks]:
        raise RuntimeError(f"wds/{split}: task results do not match the shard plan")
    present = set(storage.listdir(out_dir))
    for t, r in zip(tasks, recs):
        if r["plan_id"] != t.plan_id or t.name not in present:
            raise RuntimeError(f"wds/{split}: shard {t.name} missing after its task finished")


def _discover(run: _WdsRun, split: str) -> SplitSource:
    return discover_split(run.src, split, classes=run.classes, val_labels=run.val_labels, meta=run.meta,
                          shuffle_seed=run.split_seed(split))


def _write_split(run: _WdsRun, source: SplitSource, removed_index: list[str], carve_record: dict | None = None,
                 t0: float | None = None) -> dict:
    """Plan, write (or reuse) and check one split's shards, then its ``_info.json`` entry and manifest
    (``carve_record``: the minival carve, recorded in both when ``source`` is one of its parts)."""
    t0 = time.perf_counter() if t0 is None else t0
    split = source.split
    extra = {MINIVAL: carve_record} if carve_record else None
    tasks = make_tasks(split, source.samples, run.out_dir, max_count=run.shard_max_count,
                       max_bytes=run.shard_max_bytes, max_side=run.max_side, quality=run.quality)
    removed = _remove_stale_shards(run.out_dir, split, len(tasks)) + removed_index
    t1 = time.perf_counter()
    recs = run_tasks(write_shard, tasks, cluster=run.cluster, workers=run.workers, folder=run.log_folder(split),
                     array_size=run.array_size,
                     desc=f"wds {split}", progress=run.progress, **(run.executor_params or {}))
    t2 = time.perf_counter()
    _check_shards(run.out_dir, split, tasks, recs)
    info = update_info(run.out_dir, run.name, len(run.classes), split, recs, extra)
    fresh = [r for r in recs if not r["reused"]]
    manifest = build_manifest(
        fmt="wds", split=split, source=str(run.src), layout=source.layout, ground_truth=source.ground_truth,
        classes=run.classes, found=len(source.samples), written=info["splits"][split]["num_samples"],
        skipped=[s for r in recs for s in r["skipped"]], converted=[c for r in recs for c in r["converted"]],
        resized=sum(r["resized"] for r in recs),
        params=run.params(split) | (extra or {}),
        timings={"discover_s": round(t1 - t0, 3), "write_s": round(t2 - t1, 3),
                 "total_s": round(time.perf_counter() - t0, 3),
                 "shards_written": len(fresh), "shards_reused": len(recs) - len(fresh),
                 "shard_task_s_sum": round(sum(r["seconds"] for r in fresh), 3)},
        outputs={"dir": str(run.out_dir), "shards": [t.name for t in tasks], "num_shards": len(tasks),
                 "bytes": sum(r["bytes"] for r in recs), "source_bytes": sum(r["source_bytes"] for r in recs),
                 "removed_stale": removed},
    )
    write_json_atomic(storage.join(run.out_dir, f"{split}_manifest.json"), manifest)
    return manifest


def write_webdataset(src: str | Path, out: str | Path, *, splits: Sequence[str] = ("train", "val"),
                     max_side: int = 512, quality: int = 90, shard_max_count: int = 1000,
                     shard_max_bytes: int | None = 256 << 20, shuffle_seed: int | None = 0,
                     val_labels: str | Path | None = None, meta: str | Path | None = None,
                     cluster: str = "pool", workers: int | None = None, folder: str | Path | None = None,
                     array_size: int | None = None, progress: bool = True, name: str | None = None,
                     executor_params: dict | None = None, minival_fraction: float = 0.0,
                     minival_seed: int = 0) -> dict[str, dict]:
    """Write WebDataset shards for ``splits`` of ``src`` under ``out/wds``; returns {split: manifest}.

    ``shuffle_seed`` fixes a reproducible shuffled sample order for the train split (None keeps sorted order,
    val is always sorted). ``cluster``/``workers``/``folder``/``array_size`` select where shard tasks run (see
    :mod:`data_prep.tasks`). ``out`` may be an ``s3://`` URL (then ``folder`` is needed for array jobs).
    ``minival_fraction`` > 0 (with ``train`` in ``splits``): the split ``minival`` is carved from train
    (:mod:`data_prep.minival`, ``minival_seed``) and written after it, train without those images; the carve is
    recorded in both splits' ``_info.json`` entries and manifests. Otherwise writing train removes an earlier
    run's minival. (0 here keeps library callers' data as it was; the command line defaults to 1 %.)
    """
    if MINIVAL in splits:
        raise ValueError(f"splits: {MINIVAL!r} is carved from {SOURCE!r} (minival_fraction), not read from src")
    src = Path(src)
    out, out_dir, removed_index = _open_output(out, cluster, folder)
    classes = class_list(src, splits[0], val_labels=val_labels, meta=meta)
    write_classes(out, classes)
    run = _WdsRun(src=src, out=out, out_dir=out_dir, classes=classes, name=name or src.name, max_side=max_side,
                  quality=quality, shard_max_count=shard_max_count, shard_max_bytes=shard_max_bytes,
                  shuffle_seed=shuffle_seed, val_labels=val_labels, meta=meta, cluster=cluster, workers=workers,
                  folder=folder, array_size=array_size, progress=progress, executor_params=executor_params)
    manifests = {}
    for split in splits:
        t0 = time.perf_counter()
        source = _discover(run, split)
        if split != SOURCE:
            manifests[split] = _write_split(run, source, removed_index, t0=t0)
            removed_index = []   # reported once, in the first split's manifest
            continue
        parts = carve(source, minival_fraction, minival_seed) if minival_fraction > 0 else None
        record = parts.record() if parts else None
        # an earlier minival may hold images this train takes: out of the index until it is rewritten (its
        # shards stay, and are reused when their plan is the same)
        forget_split(out_dir, MINIVAL)
        manifests[split] = _write_split(run, parts.train if parts else source, removed_index, record, t0)
        removed_index = []
        if parts and parts.minival:
            manifests[MINIVAL] = _write_split(run, parts.minival, [], record)
        else:
            drop_split(out_dir, MINIVAL)
    return manifests


def forget_split(out_dir: str, split: str) -> bool:
    """Remove ``split``'s entry from ``_info.json`` (False: there was none)."""
    info_path = storage.join(out_dir, "_info.json")
    info = read_json(info_path)
    if not info or split not in info.get("splits", {}):
        return False
    del info["splits"][split]
    write_json_atomic(info_path, info)
    return True


def drop_split(out_dir: str, split: str) -> list[str]:
    """Remove ``split``'s ``_info.json`` entry, shards, shard records and manifest; returns the names removed."""
    removed = [f"_info.json[{split}]"] if forget_split(out_dir, split) else []
    removed += _remove_stale_shards(out_dir, split, 0)
    manifest = storage.join(out_dir, f"{split}_manifest.json")
    if storage.exists(manifest):
        storage.delete(manifest)
        removed.append(f"{split}_manifest.json")
    return removed


__all__ = ["drop_split", "forget_split", "write_webdataset", "write_shard", "update_info", "record_path", "shard_name"]
