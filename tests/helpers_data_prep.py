"""Helpers for the data_prep tests: tiny real datasets and library-only readers of the outputs."""
from __future__ import annotations

import csv
import json
import os
import tarfile
from pathlib import Path

from data_prep.demo_dataset import SKIPPED_KINDS, make_demo_dataset

ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else "python"


def tiny_demo(path: Path, **kw) -> dict:
    """3 classes, a handful of small images per split plus every bad kind (fast to write)."""
    args = dict(num_classes=3, train_per_class=4, val_per_class=2, min_side=20, max_side=40, large_images=2,
                large_side=96, seed=1)
    args.update(kw)
    return make_demo_dataset(path, **args)


def expected_labels(src: Path, desc: dict, split: str) -> dict[str, int]:
    """{key (file stem): label} of every file that must be written (all found files but the skipped kinds)."""
    classes = desc["classes"]
    skipped = {p for kind in SKIPPED_KINDS for p in desc["splits"][split]["bad"].get(kind, [])}
    out: dict[str, int] = {}
    split_dir = src / split
    csv_path = src / "LOC_val_solution.csv"
    gt = {}
    if csv_path.exists():
        with open(csv_path) as f:
            gt = {r["ImageId"]: r["PredictionString"].split()[0] for r in csv.DictReader(f)}
    for dirpath, _, files in os.walk(split_dir):
        for name in files:
            p = os.path.join(dirpath, name)
            if p in skipped:
                continue
            parent = Path(dirpath).name
            stem = Path(name).stem
            wnid = parent if parent in classes else gt[stem]
            out[stem] = classes.index(wnid)
    return out


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """Plain ``tarfile`` read: {key: {ext: bytes}}."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            key, _, ext = m.name.partition(".")
            samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def read_split_plain(out: Path, split: str) -> tuple[list[str], dict[str, int], list[str]]:
    """(ordered keys, {key: label}, shard sha list) of a WebDataset split, via _info.json + tarfile."""
    info = json.loads((out / "wds" / "_info.json").read_text())
    entry = info["splits"][split]
    keys: list[str] = []
    labels: dict[str, int] = {}
    for name in entry["filenames"]:
        for key, s in read_tar(out / "wds" / name).items():
            keys.append(key)
            labels[key] = int(s["cls"])
    return keys, labels, entry["shard_sha256"]


def read_beton(path: Path) -> list[tuple[int, int, int, int, bytes]]:
    """Every sample of a .beton as (label, image mode (0 raw, 1 jpg), width, height, stored image bytes), in
    file order, through ffcv's own ``Reader`` (header, metadata, allocation table) and nothing else: the image
    bytes are the allocation at the sample's ``data_ptr`` (raw pixels or the JPEG, exactly as stored)."""
    import numpy as np

    from pipeline.ffcv_compat import import_ffcv

    import_ffcv(("ffcv.reader",))   # importing ffcv pins torch to one thread
    from ffcv.reader import Reader

    r = Reader(str(path))
    size_of = {(int(a["sample_id"]), int(a["ptr"])): int(a["size"]) for a in r.alloc_table}
    raw = np.memmap(str(path), dtype=np.uint8, mode="r")
    meta = {name: r.metadata[f"f{j}"] for j, name in enumerate(r.field_names)}   # columns are f0, f1, ...
    out = []
    for i in range(int(r.num_samples)):
        img = meta["image"][i]
        ptr = int(img["data_ptr"])
        n = size_of[(i, ptr)]
        out.append((int(meta["label"][i]), int(img["mode"]), int(img["width"]), int(img["height"]),
                    bytes(raw[ptr:ptr + n])))
    del raw
    return out
