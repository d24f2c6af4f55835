"""Read data_prep's indexes: ``OUT/classes.json`` and the timm-style ``OUT/wds/_info.json``.

Layout (see CONTRACTS.md): ``OUT/wds/{split}-NNNNNN.tar`` with ``__key__``, ``jpg`` and ``cls`` members,
``OUT/wds/_info.json`` = ``{"splits": {split: {"num_samples", "filenames", "shard_lengths", ...}},
"num_classes"}``, ``OUT/ffcv/{split}.beton``.

``root`` is a local folder or a URL (``s3://bucket/prefix``, ``http(s)://host/prefix``: read through
:mod:`pipeline.storage`); shard URLs in the index are then URLs too, streamed by
:func:`pipeline.data.tar_samples.tar_samples`. FFCV memory-maps its file, so it needs a local root.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline import storage
from pipeline.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class SplitIndex:
    name: str
    num_samples: int
    urls: tuple[str, ...]           # absolute shard paths or URLs, in index order
    shard_lengths: tuple[int, ...]
    shard_bytes: tuple[int, ...] | None = None   # each shard's size as written (None: an index without them)

    def shard_offsets(self) -> list[int]:
        """Global index of each shard's first sample (plus the total at the end)."""
        out = [0]
        for n in self.shard_lengths:
            out.append(out[-1] + n)
        return out


def _read_json(path: str, what: str) -> dict:
    try:
        text = storage.read_bytes(path)
    except storage.NotFound:
        raise ConfigError(f"data.root: {what} not found at {path} (write it with `python -m data_prep ...`)") from None
    except storage.StorageError as e:
        raise ConfigError(f"data.root: cannot read {what}: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"data.root: {path} is not valid JSON ({e})") from None


def check_root(root: str | Path) -> None:
    """A URL data root must name its bucket or host (one line, before anything is read)."""
    try:
        storage.check_location(root)
    except storage.StorageError as e:
        raise ConfigError(f"data.root: {e}") from None


def read_classes(root: str | Path) -> list[str]:
    check_root(root)
    path = storage.join(root, "classes.json")
    data = _read_json(path, "classes.json")
    classes = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(classes, list) or not classes:
        raise ConfigError(f"data.root: {path} has no non-empty 'classes' list")
    return [str(c) for c in classes]


def read_num_classes(cfg: TrainConfig) -> int:
    """``model.num_classes`` or len(classes.json) -- a tiny metadata file, not training data."""
    if cfg.model.num_classes is not None:
        return cfg.model.num_classes
    if not cfg.data.root:
        raise ConfigError("data.root: must be set (the data_prep output folder), e.g. --data runs/demo/data")
    return len(read_classes(cfg.data.root))


def read_wds_info(root: str | Path) -> dict:
    check_root(root)
    return _read_json(storage.join(root, "wds", "_info.json"), "WebDataset index _info.json")


def check_index(cfg: TrainConfig) -> None:
    """Read the index the loaders will read, now (before any process group or engine): for WebDataset,
    ``_info.json`` must parse and list the train and val splits, and every shard of both must exist with the
    size the index recorded."""
    if cfg.data.format != "wds":
        return
    info = read_wds_info(cfg.data.root)
    splits = info.get("splits") if isinstance(info, dict) else None
    index = storage.join(cfg.data.root, "wds", "_info.json")
    if not isinstance(splits, dict):
        raise ConfigError(f"data.root: {index} has no 'splits' mapping (rewrite it with `python -m data_prep wds`)")
    for field, split in (("data.train_split", cfg.data.train_split), ("data.val_split", cfg.data.val_split)):
        if split not in splits:
            raise ConfigError(f"{field}: {split!r} is not in {index} (available: {sorted(splits)})")
        load_split_index(cfg.data.root, split, field=field)


def has_split(root: str | Path, fmt: str, split: str) -> bool:
    """Whether data_prep wrote ``split`` for ``fmt``: listed in ``wds/_info.json``, or ``ffcv/{split}.beton`` exists
    (an optional split, e.g. minival: its absence is no error)."""
    if fmt == "ffcv":
        return not storage.is_url(root) and (Path(root) / "ffcv" / f"{split}.beton").is_file()
    info = read_wds_info(root)
    splits = info.get("splits") if isinstance(info, dict) else None
    return isinstance(splits, dict) and split in splits


def check_shards(root: str | Path, index: SplitIndex) -> None:
    """Every shard of ``index`` exists with the byte size ``_info.json`` recorded (one listing or a stat per
    shard, no data read): a truncated or missing shard is one line now, not a traceback mid-epoch."""
    wds_dir = storage.join(root, "wds")
    try:
        found = storage.sizes(wds_dir, list(index.urls))
    except storage.StorageError as e:
        raise ConfigError(f"data.root: cannot list the shards: {e}") from None
    expected = index.shard_bytes or (None,) * len(index.urls)
    bad = [f"{u} ({'missing' if found[u] is None else f'{found[u]} bytes, _info.json says {want}'})"
           for u, want in zip(index.urls, expected)
           if found[u] is None or (want is not None and found[u] >= 0 and found[u] != want)]   # -1: size unknown
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ConfigError(f"data.root: {len(bad)} of {len(index.urls)} {index.name} shards do not match "
                          f"_info.json: {shown}; check them with `python -m data_prep verify {root}` and rewrite "
                          f"them with `python -m data_prep wds`")


def load_split_index(root: str | Path, split: str, field: str = "data.train_split") -> SplitIndex:
    """The shard list of ``split`` (relative file names resolved against ``OUT/wds``), its shards checked
    against the index's sizes by :func:`check_shards`."""
    wds_dir = storage.join(root, "wds")
    index_path = storage.join(wds_dir, "_info.json")
    info = read_wds_info(root)
    splits = info.get("splits", {})
    if split not in splits:
        raise ConfigError(f"{field}: {split!r} is not in "
                          f"{index_path} (available: {sorted(splits)})")
    s = splits[split]
    names = list(s.get("filenames", []))
    lengths = [int(n) for n in s.get("shard_lengths", [])]
    sizes = s.get("shard_bytes")
    if not names or len(names) != len(lengths) or (sizes is not None and len(sizes) != len(names)):
        raise ConfigError(f"data.root: {index_path}: split {split!r} needs matching non-empty "
                          f"'filenames', 'shard_lengths' and 'shard_bytes'")
    urls = [n if storage.is_url(n) or Path(n).is_absolute() else storage.join(wds_dir, n) for n in names]
    num = int(s.get("num_samples", sum(lengths)))
    if num != sum(lengths):
        raise ConfigError(f"data.root: {index_path}: split {split!r} num_samples {num} != "
                          f"sum(shard_lengths) {sum(lengths)}")
    index = SplitIndex(name=split, num_samples=num, urls=tuple(urls), shard_lengths=tuple(lengths),
                       shard_bytes=tuple(int(b) for b in sizes) if sizes is not None else None)
    check_shards(root, index)
    return index


def ffcv_path(root: str | Path, split: str) -> str:
    if storage.is_url(root):
        raise ConfigError(f"data.root: {root!r} is a URL; FFCV memory-maps a local .beton (data.format 'wds' "
                          f"streams shards from s3:// and http(s)://)")
    p = Path(root) / "ffcv" / f"{split}.beton"
    if not p.is_file():
        raise ConfigError(f"data.root: FFCV file {p} not found (write it with `python -m data_prep ffcv ...`)")
    return str(p)


__all__ = ["SplitIndex", "check_index", "check_root", "check_shards", "ffcv_path", "has_split", "load_split_index",
           "read_classes", "read_num_classes", "read_wds_info"]
