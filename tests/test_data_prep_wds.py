"""WebDataset writing on a tiny real dataset: manifest, read-back by tarfile and webdataset, resume, verify."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import webdataset
from PIL import Image

from data_prep.demo_dataset import BAD_KINDS, SKIPPED_KINDS
from data_prep.verify import verify
from data_prep.write_webdataset import write_webdataset
from helpers_data_prep import expected_labels, read_split_plain, read_tar, tiny_demo

MAX_SIDE = 64
KW = dict(max_side=MAX_SIDE, shard_max_count=5, progress=False)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("wds")
    src = base / "src"
    desc = tiny_demo(src)
    out = base / "out"
    manifests = write_webdataset(src, out, workers=2, **KW)
    return src, desc, out, manifests


def _info(out: Path) -> dict:
    return json.loads((out / "wds" / "_info.json").read_text())


@pytest.mark.parametrize("split", ["train", "val"])
def test_manifest_reports_every_bad_kind_and_counts_reconcile(prepared, split):
    src, desc, out, manifests = prepared
    m = json.loads((out / "wds" / f"{split}_manifest.json").read_text())
    assert m == manifests[split]
    c = m["counts"]
    assert c["found"] == desc["splits"][split]["found"]
    assert c["written"] + c["skipped"] == c["found"]
    assert c["written"] == desc["splits"][split]["expected_written"] == _info(out)["splits"][split]["num_samples"]
    skipped = {r["path"]: r["reason"] for r in m["skipped"]}
    converted = {r["path"]: r["reason"] for r in m["converted"]}
    for kind in BAD_KINDS:
        for path in desc["splits"][split]["bad"][kind]:
            assert path in (skipped if kind in SKIPPED_KINDS else converted), kind
    assert m["skipped_by_reason"] == {"not an image": 1, "truncated": 1, "zero-byte file": 1}
    assert {"CMYK->RGB", "PNG named .JPEG", "grayscale"} <= set(m["converted_by_reason"])
    assert c["resized"] >= 1 and m["classes"] == desc["classes"] and m["params"]["max_side"] == MAX_SIDE
    assert json.loads((out / "classes.json").read_text()) == {"classes": desc["classes"]}


@pytest.mark.parametrize("split", ["train", "val"])
def test_plain_tarfile_read_back(prepared, split):
    src, desc, out, _ = prepared
    keys, labels, shas = read_split_plain(out, split)
    assert len(keys) == len(set(keys))
    assert labels == expected_labels(src, desc, split)
    info = _info(out)["splits"][split]
    assert sum(info["shard_lengths"]) == info["num_samples"] == len(keys) and len(info["filenames"]) > 1
    for name, size, sha in zip(info["filenames"], info["shard_bytes"], info["shard_sha256"]):
        data = (out / "wds" / name).read_bytes()
        assert len(data) == size and hashlib.sha256(data).hexdigest() == sha
        for key, s in read_tar(out / "wds" / name).items():
            assert set(s) == {"jpg", "cls"}
            img = Image.open(io.BytesIO(s["jpg"]))
            assert img.format == "JPEG" and img.mode == "RGB" and max(img.size) <= MAX_SIDE
    # images within max_side that were fine RGB JPEGs are stored byte for byte
    originals = {p.stem: p.read_bytes() for p in (src / split).rglob("*.JPEG")}
    stored = {k: s["jpg"] for n in info["filenames"] for k, s in read_tar(out / "wds" / n).items()}
    changed = [k for k in stored if stored[k] != originals[k]]
    m = json.loads((out / "wds" / f"{split}_manifest.json").read_text())
    assert len(changed) == m["counts"]["converted"] + m["counts"]["resized"] - sum(
        "resized" in r["reason"] for r in m["converted"])


def test_webdataset_library_read_back(prepared):
    src, desc, out, _ = prepared
    info = _info(out)["splits"]["val"]
    urls = [str(out / "wds" / n) for n in info["filenames"]]
    ds = webdataset.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").to_tuple(
        "__key__", "jpg", "cls")
    got = {}
    for key, img, cls in ds:
        assert img.mode == "RGB"
        got[key] = cls
    assert got == expected_labels(src, desc, "val") and len(got) == info["num_samples"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_plain_tar_command_lists_and_extracts_the_shards(prepared, tmp_path, split):
    """GNU/BSD ``tar -tf`` / ``tar -xf`` (the real commands) read every shard; members are ``<key>.cls`` and
    ``<key>.jpg`` (train keys are ``<wnid>/<stem>``, so they extract into one folder per class) and the
    extracted bytes are exactly what ``webdataset.WebDataset`` returns."""
    _, _, out, _ = prepared
    info = _info(out)["splits"][split]
    for name, length in zip(info["filenames"], info["shard_lengths"]):
        shard = out / "wds" / name
        listing = subprocess.run(["tar", "-tf", str(shard)], check=True, capture_output=True,
                                 text=True).stdout.splitlines()
        samples = list(webdataset.WebDataset([str(shard)], shardshuffle=False, empty_check=False))
        keys = [x["__key__"] for x in samples]
        assert len(keys) == len(set(keys)) == length
        assert listing == [f"{k}.{ext}" for k in keys for ext in ("cls", "jpg")]
        dest = tmp_path / name
        dest.mkdir()
        subprocess.run(["tar", "-xf", str(shard), "-C", str(dest)], check=True, capture_output=True)
        assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == sorted(listing)
        for x in samples:
            assert set(x) >= {"jpg", "cls"}
            assert (dest / f"{x['__key__']}.jpg").read_bytes() == x["jpg"]
            assert (dest / f"{x['__key__']}.cls").read_bytes() == x["cls"]
            assert Image.open(dest / f"{x['__key__']}.jpg").format == "JPEG"
            assert 0 <= int((dest / f"{x['__key__']}.cls").read_text()) < _info(out)["num_classes"]


def test_leftover_index_temp_files_are_ignored_and_removed(prepared, tmp_path):
    """A kill while writing ``_info.json`` / a manifest / a shard record / ``classes.json`` leaves a temp file
    (written atomically: temp + fsync + rename). The rerun never reads one, deletes them all, reuses every shard
    and ends with the clean run's index."""
    src, _, out, _ = prepared
    o = tmp_path / "o"
    shutil.copytree(out, o)
    wd = o / "wds"
    clean_info, clean_classes = _info(o), (o / "classes.json").read_text()
    bogus = {**clean_info, "splits": {"val": {**clean_info["splits"]["val"], "num_samples": 1}}}
    planted = {
        wd / "_info.json.tmp.4242.dead": json.dumps(bogus),          # complete but wrong: must not be used
        wd / "_info.json.tmp.4243.dead": json.dumps(clean_info)[:50],  # cut short by the kill
        wd / "val_manifest.json.tmp.4242.dead": "{",
        wd / "_parts" / "val-000001.tar.json.tmp.4242.dead": "{",
        o / "classes.json.tmp.4242.dead": '{"classes": ["x"]}',
    }
    for path, text in planted.items():
        path.write_text(text)
    # the first run's index was never renamed into place (killed before), the split's manifest neither
    (wd / "_info.json").unlink()
    (wd / "val_manifest.json").unlink()
    m = write_webdataset(src, o, workers=1, **KW)
    assert _info(o) == clean_info and (o / "classes.json").read_text() == clean_classes
    assert not [p for p in o.rglob("*") if ".tmp." in p.name]
    removed = m["train"]["outputs"]["removed_stale"] + m["val"]["outputs"]["removed_stale"]
    assert sorted(removed) == sorted(["_info.json.tmp.4242.dead", "_info.json.tmp.4243.dead",
                                      "classes.json.tmp.4242.dead", "val_manifest.json.tmp.4242.dead",
                                      "_parts/val-000001.tar.json.tmp.4242.dead"])
    for split in ("train", "val"):
        assert m[split]["timings"]["shards_written"] == 0
        assert json.loads((wd / f"{split}_manifest.json").read_text())["counts"] == m[split]["counts"]
    assert verify(o, decode=True)["ok"]


def test_rerun_reuses_every_shard_and_verify_passes(prepared):
    src, desc, out, manifests = prepared
    before = _info(out)
    again = write_webdataset(src, out, workers=1, **KW)
    assert _info(out) == before
    for split in ("train", "val"):
        t = again[split]["timings"]
        assert t["shards_written"] == 0 and t["shards_reused"] == len(before["splits"][split]["filenames"])
        assert again[split]["counts"] == manifests[split]["counts"]
    report = verify(out, decode=True)
    assert report["ok"], report["errors"]
    assert report["formats"]["wds"]["train"]["samples_read"] == desc["splits"]["train"]["expected_written"]


def test_clean_runs_are_byte_identical(prepared, tmp_path):
    src, _, out, _ = prepared
    write_webdataset(src, tmp_path / "o2", workers=1, **KW)
    assert _info(tmp_path / "o2")["splits"] == _info(out)["splits"]


def test_partial_and_stale_shards_are_redone(prepared, tmp_path):
    src, _, out, _ = prepared
    o = tmp_path / "o"
    shutil.copytree(out, o)
    wd = o / "wds"
    clean = _info(o)
    (wd / "train-000001.tar").write_bytes((wd / "train-000001.tar").read_bytes()[:700])   # partial content
    (wd / "train-000002.tar").unlink()                                                     # never renamed
    (wd / "train-000002.tar.tmp.123.abcd").write_bytes(b"partial")
    (wd / "_parts" / "train-000003.tar.json").unlink()                                    # record lost
    m = write_webdataset(src, o, workers=1, **KW)
    assert m["train"]["timings"]["shards_written"] == 3
    assert _info(o) == clean
    assert not list(wd.glob("*.tmp.*")) and m["train"]["outputs"]["removed_stale"] == ["train-000002.tar.tmp.123.abcd"]
    # a new plan with fewer shards removes the old plan's extra shards; verify stays clean
    m = write_webdataset(src, o, workers=1, **{**KW, "shard_max_count": 50})
    assert len(_info(o)["splits"]["train"]["filenames"]) == 1
    assert "train-000001.tar" in m["train"]["outputs"]["removed_stale"]
    assert verify(o)["ok"]


def test_verify_detects_corrupted_and_missing_shards(prepared, tmp_path):
    _, _, out, _ = prepared
    o = tmp_path / "o"
    shutil.copytree(out, o)
    shard = o / "wds" / "val-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF   # inside the first member's payload: the tar still parses, the checksum does not match
    shard.write_bytes(bytes(data))
    r = verify(o)
    assert not r["ok"] and any("val-000001.tar sha256 mismatch" in e for e in r["errors"])
    (o / "wds" / "train-000000.tar").unlink()
    r = verify(o)
    assert any("train-000000.tar is missing" in e for e in r["errors"])
    (o / "wds" / "extra").mkdir()
    shutil.copy(o / "wds" / "val-000000.tar", o / "wds" / "val-000099.tar")
    assert any("unlisted shard val-000099.tar" in e for e in verify(o)["errors"])


@pytest.mark.slow
@pytest.mark.parametrize("cluster", ["local", "debug"])
def test_submitit_array_gives_the_same_shards(prepared, tmp_path, cluster):
    src, _, out, _ = prepared
    o = tmp_path / "o"
    m = write_webdataset(src, o, cluster=cluster, array_size=2, folder=tmp_path / "logs", splits=("train",),
                         executor_params={"timeout_min": 10}, **KW)
    assert _info(o)["splits"]["train"] == _info(out)["splits"]["train"]
    assert m["train"]["params"]["cluster"] == cluster
    if cluster == "local":
        assert len(list((tmp_path / "logs").glob("*_result.pkl"))) == 2   # two array jobs ran in subprocesses
