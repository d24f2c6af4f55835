"""Re-read prepared outputs and check them against their index and manifests.

WebDataset (``OUT/wds``), for every split of ``_info.json``: each listed shard exists, has the recorded size and
sha256, parses as a tar whose samples all have ``jpg`` + ``cls`` (an int in ``[0, num_classes)``), holds
``shard_lengths[i]`` samples, keys are unique across the split, ``num_samples`` adds up and matches the
manifest, whose counts reconcile (``written + skipped == found``); no unlisted ``{split}-*.tar`` lingers; no
key of ``minival`` is also in ``train``.
With ``decode=True`` every JPEG is also decoded (draft mode). ``out`` may be an ``s3://`` or ``http(s)://``
URL: every shard is then streamed once (sha256 and tar parsing from the same read); an HTTP server cannot be
listed, so there the unlisted-shard check is skipped (reported in ``notes``).

FFCV (``OUT/ffcv``), for every ``{split}_manifest.json``: the .beton exists with the recorded size and sha256,
its header holds the manifest's sample count and the fields ``image``, ``label``.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from pipeline import storage

from .atomic import read_json, sha256_file
from .minival import MINIVAL, SOURCE
from .write_ffcv import FIELDS, import_ffcv


class _Hashing(io.RawIOBase):
    """A read-only stream that hashes what passes through it (one read for the checksum and the tar parse)."""

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        b[:len(data)] = data
        self.h.update(data)
        return len(data)

    def drain(self) -> str:
        for data in iter(lambda: self.f.read(1 << 20), b""):
            self.h.update(data)
        return self.h.hexdigest()


def _check_counts(errors: list[str], where: str, manifest: dict | None, written: int) -> None:
    if manifest is None:
        errors.append(f"{where}: manifest missing or unreadable")
        return
    c = manifest.get("counts", {})
    if c.get("written", 0) + c.get("skipped", 0) != c.get("found"):
        errors.append(f"{where}: manifest counts do not reconcile: {c}")
    if c.get("written") != written:
        errors.append(f"{where}: manifest says {c.get('written')} written, output holds {written}")


def _read_shard(url: str) -> tuple[dict[str, dict[str, bytes]], str]:
    """({key: {ext: bytes}}, sha256) of a shard, from one sequential read (raises tarfile/OSError errors)."""
    samples: dict[str, dict[str, bytes]] = {}
    with storage.open_read(url) as f:
        hashing = _Hashing(f)
        with tarfile.open(fileobj=io.BufferedReader(hashing, 1 << 20), mode="r|") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
        return samples, hashing.drain()


@dataclass
class _WdsSplitCheck:
    """Checking one split of ``_info.json`` against its shards; problems go to ``errors``."""

    out_dir: str
    split: str
    entry: dict                      # the split's _info.json entry
    num_classes: int | None
    decode: bool
    errors: list[str]
    keys: set[str] = field(default_factory=set)

    @property
    def where(self) -> str:
        return f"wds/{self.split}"

    def shard(self, i: int, name: str) -> int:
        """Check shard ``i`` (size, sha256, sample count, every sample); returns the samples read."""
        where, entry = self.where, self.entry
        p = storage.join(self.out_dir, name)
        try:
            size = storage.stat(p)["size"]
        except storage.NotFound:
            self.errors.append(f"{where}: shard {name} is missing")
            return 0
        except storage.StorageError as e:
            self.errors.append(f"{where}: shard {name} cannot be read ({e})")
            return 0
        if size not in (-1, entry["shard_bytes"][i]):
            self.errors.append(f"{where}: shard {name} has {size} bytes, index says {entry['shard_bytes'][i]}")
        try:
            samples, digest = _read_shard(p)
        except (tarfile.TarError, OSError, EOFError) as e:
            self.errors.append(f"{where}: shard {name} is not a readable tar ({e})")
            return 0
        if digest != entry["shard_sha256"][i]:
            self.errors.append(f"{where}: shard {name} sha256 mismatch (corrupted or rewritten)")
        if len(samples) != entry["shard_lengths"][i]:
            self.errors.append(f"{where}: shard {name} holds {len(samples)} samples, index says "
                               f"{entry['shard_lengths'][i]}")
        for key, s in samples.items():
            self.sample(name, key, s)
        return len(samples)

    def sample(self, name: str, key: str, s: dict[str, bytes]) -> None:
        """A unique key, exactly ``jpg`` + ``cls``, a label in range, and (``decode``) a decodable RGB JPEG."""
        where = self.where
        if key in self.keys:
            self.errors.append(f"{where}: duplicate key {key!r} (shard {name})")
        self.keys.add(key)
        if set(s) != {"jpg", "cls"}:
            self.errors.append(f"{where}: sample {key!r} in {name} has members {sorted(s)}, expected cls+jpg")
            return
        try:
            label = int(s["cls"])
        except ValueError:
            self.errors.append(f"{where}: sample {key!r} has a non-integer cls {s['cls']!r}")
            return
        if self.num_classes is not None and not 0 <= label < self.num_classes:
            self.errors.append(f"{where}: sample {key!r} label {label} outside [0, {self.num_classes})")
        if self.decode:
            self.decoded(key, s["jpg"])

    def decoded(self, key: str, jpg: bytes) -> None:
        try:
            img = Image.open(io.BytesIO(jpg))
            if img.format != "JPEG" or img.mode != "RGB":
                self.errors.append(f"{self.where}: sample {key!r} is {img.format}/{img.mode}, expected JPEG/RGB")
            img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
            img.load()
        except Exception as e:
            self.errors.append(f"{self.where}: sample {key!r} does not decode ({e})")

    def run(self, present: set[str] | None) -> dict:
        """Every shard, the index's totals, no unlisted shard (when ``present`` is known), the manifest's counts."""
        where, entry = self.where, self.entry
        names = entry["filenames"]
        total = sum(self.shard(i, name) for i, name in enumerate(names))
        if sum(entry["shard_lengths"]) != entry["num_samples"]:
            self.errors.append(f"{where}: shard_lengths add up to {sum(entry['shard_lengths'])}, "
                               f"num_samples is {entry['num_samples']}")
        listed = set(names)
        for n in sorted(present or ()):
            if n.startswith(f"{self.split}-") and n.endswith(".tar") and n not in listed:
                self.errors.append(f"{where}: unlisted shard {n}")
        _check_counts(self.errors, where, read_json(storage.join(self.out_dir, f"{self.split}_manifest.json")),
                      entry["num_samples"])
        return {"shards": len(names), "samples_read": total, "num_samples": entry["num_samples"]}


def verify_wds(out: str | Path, decode: bool = False) -> dict:
    out_dir = storage.join(out, "wds")
    errors: list[str] = []
    notes: list[str] = []
    checked: dict[str, dict] = {}
    info_path = storage.join(out_dir, "_info.json")
    info = read_json(info_path)
    if info is None:
        return {"errors": [f"{info_path}: missing or unreadable"], "splits": {}, "notes": notes}
    try:
        present: set[str] | None = set(storage.listdir(out_dir))
    except storage.StorageError as e:
        present = None
        notes.append(f"unlisted-shard check skipped: {e}")
    keys: dict[str, set[str]] = {}
    for split, entry in info.get("splits", {}).items():
        check = _WdsSplitCheck(out_dir=out_dir, split=split, entry=entry, num_classes=info.get("num_classes"),
                               decode=decode, errors=errors)
        checked[split] = check.run(present)
        keys[split] = check.keys
    both = keys.get(SOURCE, set()) & keys.get(MINIVAL, set())
    if both:
        errors.append(f"wds/{MINIVAL}: {len(both)} sample(s) also in {SOURCE}, e.g. {min(both)!r}")
    return {"errors": errors, "splits": checked, "notes": notes}


def verify_ffcv(out: str | Path) -> dict:
    out_dir = Path(out) / "ffcv"
    errors: list[str] = []
    checked: dict[str, dict] = {}
    manifests = sorted(out_dir.glob("*_manifest.json"))
    if not manifests:
        return {"errors": [f"{out_dir}: no manifests"], "splits": {}}
    import_ffcv()
    from ffcv.reader import Reader  # local: ffcv (numba, ~3 s) only to verify FFCV output

    for mp in manifests:
        split = mp.name[: -len("_manifest.json")]
        where = f"ffcv/{split}"
        m = read_json(mp)
        beton = out_dir / f"{split}.beton"
        if m is None:
            errors.append(f"{where}: manifest unreadable")
            continue
        if not beton.is_file():
            errors.append(f"{where}: {beton.name} is missing")
            continue
        o = m.get("outputs", {})
        if beton.stat().st_size != o.get("bytes"):
            errors.append(f"{where}: {beton.name} has {beton.stat().st_size} bytes, manifest says {o.get('bytes')}")
        if sha256_file(beton) != o.get("sha256"):
            errors.append(f"{where}: {beton.name} sha256 mismatch (corrupted or rewritten)")
        try:
            r = Reader(str(beton))
            n, names = int(r.num_samples), list(r.field_names)
        except Exception as e:
            errors.append(f"{where}: {beton.name} is not a readable .beton ({type(e).__name__}: {e})")
            continue
        if names != list(FIELDS):
            errors.append(f"{where}: fields {names}, expected {list(FIELDS)}")
        _check_counts(errors, where, m, n)
        checked[split] = {"num_samples": n}
    return {"errors": errors, "splits": checked}


def verify(out: str | Path, formats: tuple[str, ...] | None = None, decode: bool = False) -> dict:
    """Check every output under ``out`` (formats default: those present). ``ok`` is False on any error.
    ``out`` may be an ``s3://`` / ``http(s)://`` URL (WebDataset only: FFCV files are local)."""
    remote = storage.is_url(out)
    out = str(out) if remote else Path(out)
    if formats is None:
        formats = ("wds",) if remote else tuple(f for f in ("wds", "ffcv") if (out / f).is_dir())
    report: dict = {"out": str(out), "formats": {}, "errors": [], "notes": []}
    classes_path = storage.join(out, "classes.json")
    try:
        classes = read_json(classes_path)
    except storage.StorageError as e:
        report["errors"].append(str(e))
        report["ok"] = False
        return report
    if classes is None or not isinstance(classes.get("classes"), list):
        report["errors"].append(f"{classes_path}: missing or unreadable")
    if not formats:
        report["errors"].append(f"{out}: no wds/ or ffcv/ output found")
    for fmt in formats:
        if fmt == "ffcv" and remote:
            report["errors"].append(f"ffcv: {out} is a URL; FFCV .beton files are verified in a local folder")
            continue
        r = verify_wds(out, decode=decode) if fmt == "wds" else verify_ffcv(out)
        report["formats"][fmt] = r["splits"]
        report["errors"].extend(r["errors"])
        report["notes"].extend(r.get("notes", []))
    if classes and "wds" in formats:
        info = read_json(storage.join(out, "wds", "_info.json")) or {}
        if info.get("num_classes") not in (None, len(classes.get("classes", []))):
            report["errors"].append("wds/_info.json num_classes differs from classes.json")
    report["ok"] = not report["errors"]
    return report
