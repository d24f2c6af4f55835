"""Discover the samples of an ILSVRC2012-style (or any ImageFolder-style) dataset on disk.

Supported layouts for a split directory ``ROOT/<split>``:

* ``folders``: ``<split>/<class>/<file>`` (ImageNet train, torchvision ImageFolder, sorted val);
* ``flat+loc_csv``: ``<split>/<file>`` plus Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``,
  the first token of the prediction string is the wnid);
* ``flat+devkit``: ``<split>/<file>`` plus the devkit's ``ILSVRC2012_validation_ground_truth.txt`` (one
  ILSVRC2012_ID per line, line ``i`` = ``ILSVRC2012_val_{i:08d}``) and ``meta.mat`` (ID -> wnid).

The class index is the position in the sorted list of class names (sorted wnids, as timm/torchvision do),
taken from ``ROOT/train`` folders when present, else from the split's own folders, else from the ground
truth (all 1000 leaf synsets of ``meta.mat``, or the wnids of the CSV).

Every regular, non-hidden file of a split is a *found* sample, so nothing can silently disappear: files the
writers cannot read are skipped with a reason, and a flat file without a ground-truth entry is returned with
``label=None`` and ``reason`` set.
"""
from __future__ import annotations

import csv
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import scipy.io

LOC_CSV = "LOC_val_solution.csv"
DEVKIT_GT = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
_GT_FILES = {LOC_CSV, DEVKIT_GT, DEVKIT_META, "LOC_synset_mapping.txt"}


class LayoutError(ValueError):
    """The source tree does not match any supported layout (one-line message)."""


@dataclass(frozen=True)
class Sample:
    key: str                 # unique within the split, no dots (WebDataset splits keys at the first dot)
    path: str                # absolute path of the source file
    label: int | None        # class index, None when the file has no usable label
    reason: str | None = None  # why label is None
    size: int = -1           # bytes, from the directory scan (saves a stat per file when planning shards)
    mtime_ns: int = -1


@dataclass
class SplitSource:
    split: str
    root: str
    layout: str                       # "folders" | "flat+loc_csv" | "flat+devkit"
    classes: list[str]
    samples: list[Sample]
    ground_truth: str | None = None   # path of the ground-truth file used for flat layouts
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- helpers
# One found file on its way to a Sample: ((path, (size, mtime_ns)), relpath-without-suffix, label, reason).
_Entry = tuple[tuple[Path, tuple[int, int]], str, int | None, str | None]


def _visible_files(d: Path) -> list[tuple[Path, tuple[int, int]]]:
    """Regular, non-hidden files of ``d`` with (size, mtime_ns), sorted by name (one scandir, one stat each)."""
    out = []
    with os.scandir(d) as it:
        for e in it:
            if e.name.startswith(".") or not e.is_file():
                continue
            st = e.stat()
            out.append((Path(e.path), (st.st_size, st.st_mtime_ns)))
    return sorted(out)


def _class_dirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _safe_key(text: str) -> str:
    """WebDataset keys end at the first '.', and '/' would create directories in the tar: replace both."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", text)


def _assign_keys(entries: list[_Entry]) -> list[Sample]:
    """entries: ((path, (size, mtime_ns)), relpath-without-suffix, label, reason).

    Keys are the file stems when those are unique within the split, else the relative paths."""
    stems = [_safe_key(f[0].stem) for f, _, _, _ in entries]
    unique = len(set(stems)) == len(stems)
    keys = stems if unique else [_safe_key(rel) for _, rel, _, _ in entries]
    if len(set(keys)) != len(keys):
        raise LayoutError("cannot derive unique sample keys: two files map to the same key after sanitising")
    return [Sample(k, str(f[0]), lab, why, *f[1]) for k, (f, _, lab, why) in zip(keys, entries)]


def _candidates(root: Path, split_dir: Path, name: str) -> list[Path]:
    """Where ground-truth files usually live: the split dir, the root, up to 3 parents, devkit data dirs."""
    out: list[Path] = []
    for b in (split_dir, root):
        out.append(b / name)
        out.extend(sorted(b.glob(f"*/data/{name}")))   # ILSVRC2012_devkit_t12/data/<name>
        out.extend(sorted(b.glob(f"*/{name}")))
    out.extend(p / name for p in list(root.parents)[:3])   # Kaggle: CSV 3 levels above ILSVRC/Data/CLS-LOC
    return out


def find_file(root: Path, split_dir: Path, name: str, explicit: str | Path | None = None) -> Path | None:
    if explicit is not None:
        p = Path(explicit)
        if not p.is_file():
            raise LayoutError(f"ground-truth file not found: {p}")
        return p
    for c in _candidates(root, split_dir, name):
        if c.is_file():
            return c
    return None


def read_loc_csv(path: Path) -> dict[str, str]:
    """Kaggle ``LOC_val_solution.csv`` -> {image_id: wnid}."""
    out: dict[str, str] = {}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or header[0].strip() != "ImageId":
            raise LayoutError(f"{path}: expected header 'ImageId,PredictionString', got {header}")
        for row in reader:
            if len(row) >= 2 and row[1].strip():
                out[row[0].strip()] = row[1].split()[0]
    return out


def read_devkit_meta(path: Path) -> dict[int, str]:
    """devkit ``meta.mat`` -> {ILSVRC2012_ID: wnid} for the leaf synsets (the 1000 classes)."""
    mat = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
    if "synsets" not in mat:
        raise LayoutError(f"{path}: no 'synsets' variable (not an ILSVRC2012 devkit meta.mat)")
    out: dict[int, str] = {}
    for s in mat["synsets"].ravel() if hasattr(mat["synsets"], "ravel") else [mat["synsets"]]:
        children = getattr(s, "num_children", 0)
        if int(children) == 0:
            out[int(s.ILSVRC2012_ID)] = str(s.WNID)
    return out


def read_devkit_ground_truth(gt: Path, meta: Path) -> tuple[dict[int, str], list[str]]:
    """-> ({image_number (1-based): wnid}, sorted leaf wnids)."""
    id_to_wnid = read_devkit_meta(meta)
    out: dict[int, str] = {}
    for i, line in enumerate(gt.read_text().split(), start=1):
        cid = int(line)
        if cid not in id_to_wnid:
            raise LayoutError(f"{gt}: line {i}: ILSVRC2012_ID {cid} not a leaf synset of {meta}")
        out[i] = id_to_wnid[cid]
    return out, sorted(set(id_to_wnid.values()))


_VAL_NUM = re.compile(r"(\d+)$")


# ----------------------------------------------------------------------------------------- discovery
def class_list(root: str | Path, split: str = "train", val_labels: str | Path | None = None,
               meta: str | Path | None = None) -> list[str]:
    """The dataset's sorted class names (see module docstring for the order of sources)."""
    root = Path(root)
    for d in (root / "train", root / split):
        if d.is_dir():
            dirs = [p.name for p in _class_dirs(d)]
            if dirs:
                return sorted(dirs)
    src = discover_split(root, split, val_labels=val_labels, meta=meta)
    return src.classes


@dataclass(frozen=True)
class _GroundTruth:
    """Where a flat split's labels come from: the file, its layout name, its classes, and file -> wnid."""

    layout: str                               # "flat+loc_csv" | "flat+devkit"
    path: Path
    classes: list[str]
    wnid_of: Callable[[Path], str | None]


def _folder_entries(root: Path, split: str, dirs: list[Path], files: list[tuple[Path, tuple[int, int]]],
                    classes: list[str] | None) -> tuple[list[str], list[_Entry]]:
    """``<split>/<class>/<file>``: (the class list, one entry per file; stray files beside the folders unlabeled)."""
    if classes is None:
        train = root / "train"
        classes = sorted(p.name for p in _class_dirs(train)) if train.is_dir() and split != "train" else None
        classes = classes or sorted(p.name for p in dirs)
    index = {c: i for i, c in enumerate(classes)}
    entries = []
    for d in dirs:
        lab = index.get(d.name)
        why = None if lab is not None else f"class folder {d.name!r} not in the class list"
        for f in _visible_files(d):
            entries.append((f, f"{d.name}/{f[0].stem}", lab, why))
    for f in files:   # stray files next to the class folders: found, but unlabeled
        entries.append((f, f[0].stem, None, "file outside any class folder"))
    return classes, entries


def _flat_ground_truth(root: Path, split_dir: Path, val_labels: str | Path | None,
                       meta: str | Path | None) -> _GroundTruth:
    """Find and read a flat split's ground truth: a LOC CSV, else the devkit's txt + meta.mat."""
    explicit_csv = val_labels is not None and str(val_labels).endswith(".csv")
    if val_labels is not None and not explicit_csv:
        loc = None   # an explicit devkit ground-truth file wins over any CSV lying around
    else:
        loc = find_file(root, split_dir, LOC_CSV, val_labels if explicit_csv else None)
    if loc is not None:
        gt = read_loc_csv(loc)
        return _GroundTruth("flat+loc_csv", loc, sorted(set(gt.values())), lambda p: gt.get(p.stem))
    txt = find_file(root, split_dir, DEVKIT_GT, val_labels)
    mat = find_file(root, split_dir, DEVKIT_META, meta) if txt is not None else None
    if txt is None or mat is None:
        raise LayoutError(
            f"{split_dir} holds files but no class folders, and no ground truth was found "
            f"({LOC_CSV}, or {DEVKIT_GT} + {DEVKIT_META}); pass --val-labels/--meta")
    by_num, gt_classes = read_devkit_ground_truth(txt, mat)

    def lookup(p: Path) -> str | None:
        m = _VAL_NUM.search(p.stem)
        return by_num.get(int(m.group(1))) if m else None

    return _GroundTruth("flat+devkit", txt, gt_classes, lookup)


def _flat_entries(files: list[tuple[Path, tuple[int, int]]], truth: _GroundTruth,
                  classes: list[str]) -> list[_Entry]:
    """``<split>/<file>``: one entry per file, labelled through the ground truth (unlabeled with a reason)."""
    index = {c: i for i, c in enumerate(classes)}
    entries = []
    for f in files:
        p = f[0]
        wnid = truth.wnid_of(p)
        if wnid is None:
            entries.append((f, p.stem, None, "no ground-truth label"))
        elif wnid not in index:
            entries.append((f, p.stem, None, f"label {wnid!r} not in the class list"))
        else:
            entries.append((f, p.stem, index[wnid], None))
    return entries


def discover_split(root: str | Path, split: str, *, classes: list[str] | None = None,
                   val_labels: str | Path | None = None, meta: str | Path | None = None,
                   shuffle_seed: int | None = None) -> SplitSource:
    """List every file of ``root/<split>`` with its label. ``shuffle_seed`` (train) fixes a reproducible order."""
    root = Path(root)
    split_dir = root / split
    if not split_dir.is_dir():
        raise LayoutError(f"split directory not found: {split_dir}")
    dirs = _class_dirs(split_dir)
    files = [f for f in _visible_files(split_dir) if f[0].name not in _GT_FILES]
    gt_path: Path | None = None
    if dirs:
        classes, entries = _folder_entries(root, split, dirs, files, classes)
        layout = "folders"
    elif files:
        truth = _flat_ground_truth(root, split_dir, val_labels, meta)
        if classes is None:
            train = root / "train"
            classes = sorted(p.name for p in _class_dirs(train)) if train.is_dir() else []
            classes = classes or truth.classes
        entries = _flat_entries(files, truth, classes)
        layout, gt_path = truth.layout, truth.path
    else:
        raise LayoutError(f"split directory is empty: {split_dir}")
    samples = _assign_keys(entries)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(samples)
    return SplitSource(split=split, root=str(split_dir), layout=layout, classes=list(classes), samples=samples,
                       ground_truth=str(gt_path) if gt_path else None)
