"""Re-read prepared outputs and check them against their index and manifests.

WebDataset (``OUT/wds``), for every split of ``_info.json``: each listed shard exists, has the recorded size and
sha256, parses as a tar whose samples all have ``jpg`` + ``cls`` (an int in ``[0, num_classes)``), holds
``shard_lengths[i]`` samples, keys are unique across the split, ``num_samples`` adds up and matches the
manifest, whose counts reconcile (``written + skipped == found``); no unlisted ``{split}-*.tar`` lingers.
With ``decode=True`` every JPEG is also decoded (draft mode).

FFCV (``OUT/ffcv``), for every ``{split}_manifest.json``: the .beton exists with the recorded size and sha256,
its header holds the manifest's sample count and the fields ``image``, ``label``.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

from .atomic import read_json, sha256_file


def _check_counts(errors: list[str], where: str, manifest: dict | None, written: int) -> None:
    if manifest is None:
        errors.append(f"{where}: manifest missing or unreadable")
        return
    c = manifest.get("counts", {})
    if c.get("written", 0) + c.get("skipped", 0) != c.get("found"):
        errors.append(f"{where}: manifest counts do not reconcile: {c}")
    if c.get("written") != written:
        errors.append(f"{where}: manifest says {c.get('written')} written, output holds {written}")


def verify_wds(out: str | Path, decode: bool = False) -> dict:
    out_dir = Path(out) / "wds"
    errors: list[str] = []
    checked: dict[str, dict] = {}
    info = read_json(out_dir / "_info.json")
    if info is None:
        return {"errors": [f"{out_dir / '_info.json'}: missing or unreadable"], "splits": {}}
    num_classes = info.get("num_classes")
    for split, entry in info.get("splits", {}).items():
        where = f"wds/{split}"
        keys: set[str] = set()
        total = 0
        names = entry["filenames"]
        for i, name in enumerate(names):
            p = out_dir / name
            if not p.is_file():
                errors.append(f"{where}: shard {name} is missing")
                continue
            if p.stat().st_size != entry["shard_bytes"][i]:
                errors.append(f"{where}: shard {name} has {p.stat().st_size} bytes, "
                              f"index says {entry['shard_bytes'][i]}")
            if sha256_file(p) != entry["shard_sha256"][i]:
                errors.append(f"{where}: shard {name} sha256 mismatch (corrupted or rewritten)")
            samples: dict[str, dict[str, bytes]] = {}
            try:
                with tarfile.open(p) as tf:
                    for m in tf:
                        if not m.isfile():
                            continue
                        key, _, ext = m.name.partition(".")
                        samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
            except (tarfile.TarError, OSError, EOFError) as e:
                errors.append(f"{where}: shard {name} is not a readable tar ({e})")
                continue
            if len(samples) != entry["shard_lengths"][i]:
                errors.append(f"{where}: shard {name} holds {len(samples)} samples, index says "
                              f"{entry['shard_lengths'][i]}")
            for key, s in samples.items():
                if key in keys:
                    errors.append(f"{where}: duplicate key {key!r} (shard {name})")
                keys.add(key)
                if set(s) != {"jpg", "cls"}:
                    errors.append(f"{where}: sample {key!r} in {name} has members {sorted(s)}, expected cls+jpg")
                    continue
                try:
                    label = int(s["cls"])
                except ValueError:
                    errors.append(f"{where}: sample {key!r} has a non-integer cls {s['cls']!r}")
                    continue
                if num_classes is not None and not 0 <= label < num_classes:
                    errors.append(f"{where}: sample {key!r} label {label} outside [0, {num_classes})")
                if decode:
                    try:
                        from PIL import Image

                        img = Image.open(io.BytesIO(s["jpg"]))
                        if img.format != "JPEG" or img.mode != "RGB":
                            errors.append(f"{where}: sample {key!r} is {img.format}/{img.mode}, expected JPEG/RGB")
                        img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
                        img.load()
                    except Exception as e:
                        errors.append(f"{where}: sample {key!r} does not decode ({e})")
            total += len(samples)
        if sum(entry["shard_lengths"]) != entry["num_samples"]:
            errors.append(f"{where}: shard_lengths add up to {sum(entry['shard_lengths'])}, "
                          f"num_samples is {entry['num_samples']}")
        listed = set(names)
        for p in sorted(out_dir.glob(f"{split}-*.tar")):
            if p.name not in listed:
                errors.append(f"{where}: unlisted shard {p.name}")
        _check_counts(errors, where, read_json(out_dir / f"{split}_manifest.json"), entry["num_samples"])
        checked[split] = {"shards": len(names), "samples_read": total, "num_samples": entry["num_samples"]}
    return {"errors": errors, "splits": checked}


def verify_ffcv(out: str | Path) -> dict:
    out_dir = Path(out) / "ffcv"
    errors: list[str] = []
    checked: dict[str, dict] = {}
    manifests = sorted(out_dir.glob("*_manifest.json"))
    if not manifests:
        return {"errors": [f"{out_dir}: no manifests"], "splits": {}}
    from .write_ffcv import FIELDS, import_ffcv

    import_ffcv()
    from ffcv.reader import Reader

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
    """Check every output under ``out`` (formats default: those present). ``ok`` is False on any error."""
    out = Path(out)
    if formats is None:
        formats = tuple(f for f in ("wds", "ffcv") if (out / f).is_dir())
    report: dict = {"out": str(out), "formats": {}, "errors": []}
    classes = read_json(out / "classes.json")
    if classes is None or not isinstance(classes.get("classes"), list):
        report["errors"].append(f"{out / 'classes.json'}: missing or unreadable")
    if not formats:
        report["errors"].append(f"{out}: no wds/ or ffcv/ output found")
    for fmt in formats:
        r = verify_wds(out, decode=decode) if fmt == "wds" else verify_ffcv(out)
        report["formats"][fmt] = r["splits"]
        report["errors"].extend(r["errors"])
    if classes and "wds" in formats:
        info = read_json(out / "wds" / "_info.json") or {}
        if info.get("num_classes") not in (None, len(classes.get("classes", []))):
            report["errors"].append("wds/_info.json num_classes differs from classes.json")
    report["ok"] = not report["errors"]
    return report
