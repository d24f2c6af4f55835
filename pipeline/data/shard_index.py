"""Read data_prep's indexes: ``OUT/classes.json`` and the timm-style ``OUT/wds/_info.json``.

Layout (see CONTRACTS.md): ``OUT/wds/{split}-NNNNNN.tar`` with ``__key__``, ``jpg`` and ``cls`` members,
``OUT/wds/_info.json`` = ``{"splits": {split: {"num_samples", "filenames", "shard_lengths", ...}},
"num_classes"}``, ``OUT/ffcv/{split}.beton``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError


@dataclass(frozen=True)
class SplitIndex:
    name: str
    num_samples: int
    urls: tuple[str, ...]           # absolute shard paths, in index order
    shard_lengths: tuple[int, ...]

    def shard_offsets(self) -> list[int]:
        """Global index of each shard's first sample (plus the total at the end)."""
        out = [0]
        for n in self.shard_lengths:
            out.append(out[-1] + n)
        return out


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"data.root: {what} not found at {path} (write it with `python -m data_prep ...`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"data.root: {path} is not valid JSON ({e})") from None


def read_classes(root: str | Path) -> list[str]:
    data = _read_json(Path(root) / "classes.json", "classes.json")
    classes = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(classes, list) or not classes:
        raise ConfigError(f"data.root: {Path(root) / 'classes.json'} has no non-empty 'classes' list")
    return [str(c) for c in classes]


def read_wds_info(root: str | Path) -> dict:
    return _read_json(Path(root) / "wds" / "_info.json", "WebDataset index _info.json")


def load_split_index(root: str | Path, split: str, field: str = "data.train_split") -> SplitIndex:
    """The shard list of ``split``; relative file names are resolved against ``OUT/wds``."""
    wds_dir = Path(root) / "wds"
    info = read_wds_info(root)
    splits = info.get("splits", {})
    if split not in splits:
        raise ConfigError(f"{field}: {split!r} is not in "
                          f"{wds_dir / '_info.json'} (available: {sorted(splits)})")
    s = splits[split]
    names = list(s.get("filenames", []))
    lengths = [int(n) for n in s.get("shard_lengths", [])]
    if not names or len(names) != len(lengths):
        raise ConfigError(f"data.root: {wds_dir / '_info.json'}: split {split!r} needs matching non-empty "
                          f"'filenames' and 'shard_lengths'")
    urls = []
    for n in names:
        p = Path(n)
        p = p if p.is_absolute() else wds_dir / p
        if not p.is_file():
            raise ConfigError(f"data.root: shard {p} listed in _info.json does not exist")
        urls.append(str(p))
    num = int(s.get("num_samples", sum(lengths)))
    if num != sum(lengths):
        raise ConfigError(f"data.root: {wds_dir / '_info.json'}: split {split!r} num_samples {num} != "
                          f"sum(shard_lengths) {sum(lengths)}")
    return SplitIndex(name=split, num_samples=num, urls=tuple(urls), shard_lengths=tuple(lengths))


def ffcv_path(root: str | Path, split: str) -> str:
    p = Path(root) / "ffcv" / f"{split}.beton"
    if not p.is_file():
        raise ConfigError(f"data.root: FFCV file {p} not found (write it with `python -m data_prep ffcv ...`)")
    return str(p)


__all__ = ["SplitIndex", "ffcv_path", "load_split_index", "read_classes", "read_wds_info"]
