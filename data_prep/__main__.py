"""``python -m data_prep <command>``: make_demo_dataset | wds | ffcv | verify.

Examples::

    python -m data_prep make_demo_dataset --out data/demo_src
    python -m data_prep wds  --src data/demo_src --out data/demo --max-side 512 --workers 2
    python -m data_prep wds  --src /datasets/imagenet --out /scratch/in1k --cluster slurm --array-size 64 \\
        --partition cpu --timeout-min 240
    python -m data_prep ffcv --src data/demo_src --out data/demo --max-resolution 256 --write-mode jpg
    python -m data_prep ffcv --src /datasets/imagenet --out /scratch/in1k --cluster slurm --partition cpu \\
        --cpus-per-task 32 --timeout-min 600      # one array job per split
    python -m data_prep verify data/demo --decode
    python -m data_prep wds  --src /datasets/imagenet --out /scratch/in1k --minival-fraction 0.02  # 2 % held out
    python -m data_prep wds  --src /datasets/imagenet --out s3://bucket/in1k --workers 16   # AWS_* variables/files
    python -m data_prep verify s3://bucket/in1k          # or https://host/in1k (read-only)

Writing train also writes ``minival``: ``--minival-fraction`` (default 1 %) of train held out, on which training
chooses the test resolution (:mod:`data_prep.minival`; 0: none).

Arguments are validated before any data is read; a bad one gives a one-line ``error: ...`` and exit code 2.
``verify`` exits 1 when it finds a problem. The writers print a JSON summary of their manifests. A storage
failure (unreachable endpoint, missing bucket, refused credentials) after the bounded retries is one
``error: ...`` line naming the object, exit code 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline import storage
from pipeline.config import FFCV_MISSING, ConfigError, check_choice, check_positive, check_range, ffcv_installed
from pipeline.redaction import redact

from .demo_dataset import make_demo_dataset
from .minival import DEFAULT_FRACTION, MAX_FRACTION, MINIVAL, SOURCE
from .tasks import CLUSTERS
from .verify import verify
from .write_ffcv import WRITE_MODES, write_ffcv


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise ConfigError(f"{self.prog}: {message}")


def _splits(text: str) -> tuple[str, ...]:
    parts = tuple(s.strip() for s in text.split(",") if s.strip())
    if not parts:
        raise argparse.ArgumentTypeError(f"--splits: {text!r} names no split")
    return parts


def _add_demo_parser(sub) -> None:
    d = sub.add_parser("make_demo_dataset", help="write a small synthetic ImageNet-layout dataset")
    d.add_argument("--out", required=True)
    d.add_argument("--classes", type=int, default=10)
    d.add_argument("--train-per-class", type=int, default=100)
    d.add_argument("--val-per-class", type=int, default=20)
    d.add_argument("--min-side", type=int, default=48)
    d.add_argument("--max-side", type=int, default=160)
    d.add_argument("--large-images", type=int, default=2)
    d.add_argument("--val-layout", default="loc_csv")
    d.add_argument("--no-bad-files", action="store_true")
    d.add_argument("--random-colours", action="store_true", help="classes differ by shape/texture only")
    d.add_argument("--seed", type=int, default=0)


def _add_source_args(q: argparse.ArgumentParser) -> None:
    """The arguments both writers share: what to read, where to write, how many processes."""
    q.add_argument("--src", required=True, help="dataset root holding train/ and/or val/")
    q.add_argument("--out", required=True, help="output root (OUT)")
    q.add_argument("--splits", type=_splits, default=("train", "val"), help="comma-separated, e.g. train,val")
    q.add_argument("--val-labels", default=None, help="LOC_val_solution.csv or devkit ground-truth txt")
    q.add_argument("--meta", default=None, help="devkit meta.mat (with a devkit --val-labels)")
    q.add_argument("--shuffle-seed", type=int, default=0, help="train sample order; -1 keeps sorted order")
    q.add_argument("--minival-fraction", type=float, default=DEFAULT_FRACTION,
                   help=f"carve this share of train (stratified by class, by a hash of each image's key) into the "
                        f"held-out split 'minival', on which training picks the test resolution; 0: none "
                        f"(default {DEFAULT_FRACTION}, as big_vision / DeiT III hold out 1-2 %% of ImageNet)")
    q.add_argument("--minival-seed", type=int, default=0, help="which images the carve takes")
    q.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    q.add_argument("--no-progress", action="store_true")


def _add_cluster_args(q: argparse.ArgumentParser, tasks: str, log_folder: str) -> None:
    g = q.add_argument_group("where the tasks run", tasks)
    g.add_argument("--cluster", default="pool",
                   help=f"one of {list(CLUSTERS)}: pool = processes on this machine (--workers); local = "
                        "submitit subprocesses; debug = submitit in this process; slurm = a SLURM job array")
    g.add_argument("--array-size", type=int, default=None, help="array jobs for --cluster local/debug/slurm")
    g.add_argument("--log-folder", default=None, help=f"submitit folder (default {log_folder})")
    g.add_argument("--partition", default=None)
    g.add_argument("--timeout-min", type=int, default=240)
    g.add_argument("--cpus-per-task", type=int, default=None)
    g.add_argument("--mem-gb", type=float, default=None)


def _add_wds_parser(sub) -> None:
    w = sub.add_parser("wds", help="write WebDataset shards (--out may be s3://bucket/prefix)")
    _add_source_args(w)
    w.add_argument("--max-side", type=int, default=512, help="re-encode only images with a longer side above this")
    w.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    w.add_argument("--shard-max-count", type=int, default=1000)
    w.add_argument("--shard-max-mb", type=float, default=256.0)
    _add_cluster_args(w, tasks="one task per shard: --array-size jobs each write a contiguous range of shards",
                      log_folder="OUT/logs/wds_<split>")


def _add_ffcv_parser(sub) -> None:
    f = sub.add_parser("ffcv", help="write FFCV .beton files")
    _add_source_args(f)
    f.add_argument("--max-resolution", type=int, default=512)
    f.add_argument("--write-mode", default="proportion")
    f.add_argument("--compress-probability", type=float, default=0.5)
    f.add_argument("--jpeg-quality", type=int, default=90)
    f.add_argument("--chunk-size", type=int, default=100)
    f.add_argument("--seed", type=int, default=0)
    _add_cluster_args(f, tasks="one task per split: FFCV's DatasetWriter writes a single .beton file, so a split "
                               "cannot be divided between jobs; each split's job uses --workers processes "
                               "(default: its cores); --array-size defaults to the number of splits",
                      log_folder="OUT/logs/ffcv")


def _add_verify_parser(sub) -> None:
    v = sub.add_parser("verify", help="re-read outputs, check counts and checksums")
    v.add_argument("out", help="a data_prep output folder, or its s3:// / http(s):// URL")
    v.add_argument("--formats", type=_splits, default=None, help="wds,ffcv (default: those present)")
    v.add_argument("--decode", action="store_true", help="also decode every WebDataset JPEG")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m data_prep", description="ImageNet-layout folders -> WebDataset / FFCV")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    _add_demo_parser(sub)
    _add_wds_parser(sub)
    _add_ffcv_parser(sub)
    _add_verify_parser(sub)
    return p


def _check_resources(a: argparse.Namespace) -> None:
    """The worker and SLURM resource flags of ``wds`` / ``ffcv``."""
    if a.workers is not None:
        check_positive("--workers", a.workers)
    check_choice("--cluster", a.cluster, CLUSTERS)
    if a.array_size is not None:
        check_positive("--array-size", a.array_size)
    check_positive("--timeout-min", a.timeout_min)
    if a.cpus_per_task is not None:
        check_positive("--cpus-per-task", a.cpus_per_task)
    if a.mem_gb is not None:
        check_positive("--mem-gb", a.mem_gb)


def validate(a: argparse.Namespace) -> None:
    """Every argument check that needs no data (raises ConfigError with a one-line message)."""
    if a.cmd == "make_demo_dataset":
        check_range("--classes", a.classes, 2, 10_000)
        check_positive("--train-per-class", a.train_per_class)
        check_positive("--val-per-class", a.val_per_class)
        check_range("--min-side", a.min_side, 8, 4096)
        check_range("--max-side", a.max_side, a.min_side, 4096)
        check_positive("--large-images", a.large_images, allow_zero=True)
        check_choice("--val-layout", a.val_layout, ["loc_csv", "devkit", "folders"])
        return
    if a.cmd == "verify":
        if not storage.is_url(a.out) and not Path(a.out).is_dir():
            raise ConfigError(f"out: {a.out!r} is not a directory")
        for fmt in a.formats or ():
            check_choice("--formats", fmt, ["wds", "ffcv"])
        return
    if a.cmd == "ffcv" and not ffcv_installed():
        raise ConfigError(f"ffcv: {FFCV_MISSING}; WebDataset shards: python -m data_prep wds")
    if not Path(a.src).is_dir():
        raise ConfigError(f"--src: {a.src!r} is not a directory")
    if MINIVAL in a.splits:
        raise ConfigError(f"--splits: {MINIVAL!r} is carved from {SOURCE!r}: list {SOURCE} and set "
                          f"--minival-fraction")
    check_range("--minival-fraction", a.minival_fraction, 0.0, MAX_FRACTION)
    for s in a.splits:
        if not (Path(a.src) / s).is_dir():
            raise ConfigError(f"--splits: {s!r} has no directory {Path(a.src) / s}")
    for name in ("val_labels", "meta"):
        val = getattr(a, name)
        if val is not None and not Path(val).is_file():
            raise ConfigError(f"--{name.replace('_', '-')}: {val!r} is not a file")
    if storage.is_url(a.out):
        if a.cmd != "wds":
            raise ConfigError(f"--out: {a.out!r} is a URL; FFCV writes one local .beton per split (copy it)")
        if not a.out.startswith("s3://"):
            raise ConfigError(f"--out: {a.out!r}: HTTP is read-only; write to s3://bucket/prefix or a folder")
        if a.cluster != "pool" and a.log_folder is None:
            raise ConfigError(f"--log-folder: required with --cluster {a.cluster} and a URL --out "
                              f"(submitit keeps its files in a shared local folder)")
    _check_resources(a)
    if a.cmd == "wds":
        check_positive("--max-side", a.max_side)
        check_range("--quality", a.quality, 1, 100)
        check_positive("--shard-max-count", a.shard_max_count)
        check_positive("--shard-max-mb", a.shard_max_mb)
    else:
        check_range("--max-resolution", a.max_resolution, 8, 65535)
        check_choice("--write-mode", a.write_mode, WRITE_MODES)
        check_range("--compress-probability", a.compress_probability, 0.0, 1.0)
        check_range("--jpeg-quality", a.jpeg_quality, 1, 100)
        check_positive("--chunk-size", a.chunk_size)


def _summary(manifests: dict) -> dict:
    out = {}
    for s, m in manifests.items():
        out[s] = {"counts": m["counts"], "skipped_by_reason": m["skipped_by_reason"],
                  "converted_by_reason": m["converted_by_reason"], "timings": m["timings"]}
        if "reused" in m:   # ffcv: the split's .beton was complete and left untouched
            out[s]["reused"] = m["reused"]
    return out


def run(a: argparse.Namespace) -> int:
    if a.cmd == "make_demo_dataset":
        desc = make_demo_dataset(a.out, num_classes=a.classes, train_per_class=a.train_per_class,
                                 val_per_class=a.val_per_class, min_side=a.min_side, max_side=a.max_side,
                                 large_images=a.large_images, bad_files=not a.no_bad_files,
                                 val_layout=a.val_layout, class_colours=not a.random_colours, seed=a.seed)
        print(json.dumps({s: {"found": v["found"], "expected_written": v["expected_written"]}
                          for s, v in desc["splits"].items()}))
        return 0
    if a.cmd == "verify":
        report = verify(a.out, formats=a.formats, decode=a.decode)
        print(redact(json.dumps(report, indent=2)))
        if not report["ok"]:
            print(redact(f"verify: {len(report['errors'])} problem(s); first: {report['errors'][0]}"), file=sys.stderr)
        return 0 if report["ok"] else 1
    shuffle_seed = None if a.shuffle_seed < 0 else a.shuffle_seed
    params = {"timeout_min": a.timeout_min}
    for k in ("partition", "cpus_per_task", "mem_gb"):
        if getattr(a, k) is not None:
            params[k] = getattr(a, k)
    if a.cmd == "wds":
        from .write_webdataset import write_webdataset  # local: webdataset imports torch (~1.5 s); --help stays fast

        manifests = write_webdataset(
            a.src, a.out, splits=a.splits, max_side=a.max_side, quality=a.quality,
            shard_max_count=a.shard_max_count, shard_max_bytes=int(a.shard_max_mb * (1 << 20)),
            shuffle_seed=shuffle_seed, val_labels=a.val_labels, meta=a.meta, cluster=a.cluster,
            workers=a.workers, folder=a.log_folder, array_size=a.array_size, progress=not a.no_progress,
            executor_params=params if a.cluster != "pool" else None, minival_fraction=a.minival_fraction,
            minival_seed=a.minival_seed)
    else:
        manifests = write_ffcv(
            a.src, a.out, splits=a.splits, max_resolution=a.max_resolution, write_mode=a.write_mode,
            compress_probability=a.compress_probability, jpeg_quality=a.jpeg_quality, shuffle_seed=shuffle_seed,
            seed=a.seed, val_labels=a.val_labels, meta=a.meta, workers=a.workers, chunk_size=a.chunk_size,
            progress=not a.no_progress, cluster=a.cluster, folder=a.log_folder, array_size=a.array_size,
            executor_params=params if a.cluster != "pool" else None, minival_fraction=a.minival_fraction,
            minival_seed=a.minival_seed)
    print(redact(json.dumps(_summary(manifests), indent=2)))
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        validate(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return run(args)
    except storage.StorageError as e:   # already one line naming the object (never a credential)
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
