"""FFCV writing on a tiny real dataset, read back with ffcv.loader.Loader and ffcv.reader.Reader only (no project
code); reuse of complete splits, redo of incomplete ones, the submitit array path."""
from __future__ import annotations

import gc
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from data_prep.demo_dataset import BAD_KINDS, SKIPPED_KINDS
from data_prep.verify import verify
from data_prep.write_ffcv import write_ffcv
from helpers_data_prep import expected_labels, read_beton, tiny_demo
from pipeline.ffcv_compat import import_ffcv

RES = 48
KW = dict(max_resolution=RES, write_mode="proportion", compress_probability=0.5, progress=False)
# numba's dispatcher finaliser inside ffcv's Loader raises a harmless KeyError at garbage collection
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("ffcv")
    src = base / "src"
    desc = tiny_demo(src)
    out = base / "out"
    threads = torch.get_num_threads()
    manifests = write_ffcv(src, out, workers=2, **KW)
    assert torch.get_num_threads() == threads   # importing ffcv must not pin torch to one thread
    return src, desc, out, manifests


def _load_all(path, res=32):
    import_ffcv()
    from ffcv.fields.decoders import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(str(path), batch_size=8, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [CenterCropRGBImageDecoder((res, res), 1.0)], "label": [IntDecoder()]})
    images, labels = [], []
    for x, y in loader:
        images.append(np.asarray(x))
        labels.extend(int(v) for v in np.asarray(y).ravel())
    del loader, x, y
    gc.collect()   # let numba's finalisers run inside this (warning-filtered) module
    return np.concatenate(images), labels


@pytest.mark.parametrize("split", ["train", "val"])
def test_loader_reads_every_written_sample(prepared, split):
    src, desc, out, manifests = prepared
    m = manifests[split]
    images, labels = _load_all(out / "ffcv" / f"{split}.beton")
    expected = expected_labels(src, desc, split)
    assert len(labels) == m["counts"]["written"] == len(expected) == desc["splits"][split]["expected_written"]
    assert Counter(labels) == Counter(expected.values())
    assert images.shape == (len(labels), 32, 32, 3) and images.dtype == np.uint8
    assert images.std() > 10   # real pictures, not placeholders
    c = m["counts"]
    assert c["written"] + c["skipped"] == c["found"] == desc["splits"][split]["found"]
    skipped = {r["path"] for r in m["skipped"]}
    converted = {r["path"] for r in m["converted"]}
    for kind in BAD_KINDS:
        for p in desc["splits"][split]["bad"][kind]:
            assert p in (skipped if kind in SKIPPED_KINDS else converted), kind
    assert m["params"]["fields"] == ["image", "label"] and m["params"]["write_mode"] == "proportion"


def test_sample_order_matches_the_plan_and_is_stable(prepared, tmp_path):
    src, desc, out, _ = prepared
    from data_prep.layout import discover_split

    good = {k for k in expected_labels(src, desc, "val")}
    plan = [s.label for s in discover_split(src, "val").samples if s.key in good]
    _, labels = _load_all(out / "ffcv" / "val.beton")
    assert labels == plan


def test_verify_and_corruption(prepared, tmp_path):
    _, _, out, _ = prepared
    r = verify(out, formats=("ffcv",))
    assert r["ok"], r["errors"]
    assert r["formats"]["ffcv"]["val"]["num_samples"] == json.loads(
        (out / "ffcv" / "val_manifest.json").read_text())["counts"]["written"]
    o = tmp_path / "o"
    shutil.copytree(out, o)
    beton = o / "ffcv" / "train.beton"
    data = bytearray(beton.read_bytes())
    data[len(data) // 2] ^= 0xFF
    beton.write_bytes(bytes(data))
    (o / "ffcv" / "val.beton").unlink()
    errors = verify(o, formats=("ffcv",))["errors"]
    assert any("train.beton sha256 mismatch" in e for e in errors)
    assert any("val.beton is missing" in e for e in errors)


def test_rerun_replaces_stale_temp_files(prepared, tmp_path):
    src, _, _, _ = prepared
    o = tmp_path / "o"
    (o / "ffcv").mkdir(parents=True)
    (o / "ffcv" / "val.beton.tmp.1.dead").write_bytes(b"partial")
    (o / "ffcv" / "val_manifest.json.tmp.2.dead").write_text('{"outputs": {')   # killed writing the manifest
    (o / "classes.json.tmp.3.dead").write_text("{")
    m = write_ffcv(src, o, splits=("val",), max_resolution=RES, write_mode="jpg", workers=1, progress=False)
    assert m["val"]["outputs"]["removed_stale"] == ["val.beton.tmp.1.dead", "val_manifest.json.tmp.2.dead"]
    assert m["val"]["reused"] is False and m["val"]["outputs"]["redo_reason"] == "no manifest"
    assert sorted(p.name for p in (o / "ffcv").iterdir()) == ["val.beton", "val_manifest.json"]
    assert sorted(p.name for p in o.iterdir()) == ["classes.json", "ffcv"]
    assert verify(o)["ok"]


def _stamp(d):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(d.iterdir())}


def test_rerun_after_a_complete_write_reuses_it_untouched(prepared, tmp_path):
    src, _, out, manifests = prepared
    o = tmp_path / "o"
    shutil.copytree(out, o)
    fd = o / "ffcv"
    before = _stamp(fd)
    # a complete .beton under a temp name (a run killed between its last write and the rename) is never taken
    # for the output: it is only deleted
    shutil.copy(fd / "val.beton", fd / "val.beton.tmp.7.dead")
    again = write_ffcv(src, o, workers=2, **KW)
    assert _stamp(fd) == before   # same inodes and mtimes: neither .beton nor manifest was rewritten
    for split in ("train", "val"):
        assert again[split]["reused"] is True
        assert again[split]["counts"] == manifests[split]["counts"]
        assert again[split]["outputs"]["sha256"] == manifests[split]["outputs"]["sha256"]
    assert again["val"]["outputs"]["removed_stale"] == ["val.beton.tmp.7.dead"]
    for split in ("train", "val"):   # the write's timings, unchanged, plus the reuse check's: no probe or write pass
        timings = again[split]["timings"]
        assert timings == {**manifests[split]["timings"], "reuse_check_s": timings["reuse_check_s"]}
    assert verify(o)["ok"]


@pytest.mark.parametrize("damage", ["manifest_lost", "beton_corrupted", "beton_lost", "other_params"])
def test_incomplete_or_inconsistent_split_is_redone(prepared, tmp_path, damage):
    src, _, out, manifests = prepared
    o = tmp_path / "o"
    shutil.copytree(out, o)
    fd = o / "ffcv"
    kw = dict(KW)
    if damage == "manifest_lost":      # killed after the .beton's rename, before its manifest was written
        (fd / "val_manifest.json").unlink()
    elif damage == "beton_corrupted":  # same size, one flipped byte: only the sha256 tells
        data = bytearray((fd / "val.beton").read_bytes())
        data[-100] ^= 0xFF
        (fd / "val.beton").write_bytes(bytes(data))
    elif damage == "beton_lost":       # ... and a complete copy under a temp name is not renamed into place
        (fd / "val.beton").rename(fd / "val.beton.tmp.99.dead")
    else:                              # another plan: the old file is no output of this one
        kw["jpeg_quality"] = 80
    train_before = _stamp(fd)["train.beton"]
    m = write_ffcv(src, o, workers=1, **kw)
    assert m["train"]["reused"] is (damage != "other_params")
    assert (_stamp(fd)["train.beton"] == train_before) is (damage != "other_params")
    reason = {"manifest_lost": "no manifest", "beton_corrupted": "val.beton sha256 differs from the manifest",
              "beton_lost": "val.beton missing", "other_params": "manifest is for another plan"}[damage]
    assert m["val"]["reused"] is False and m["val"]["outputs"]["redo_reason"] == reason
    assert json.loads((fd / "val_manifest.json").read_text())["outputs"]["sha256"] == m["val"]["outputs"]["sha256"]
    assert m["val"]["outputs"]["removed_stale"] == (["val.beton.tmp.99.dead"] if damage == "beton_lost" else [])
    assert not list(fd.glob("*.tmp.*"))
    if damage != "other_params":       # the redone split holds exactly the clean run's samples
        assert read_beton(fd / "val.beton") == read_beton(out / "ffcv" / "val.beton")
    assert verify(o)["ok"]


@pytest.mark.slow
@pytest.mark.parametrize("cluster", ["local", "debug"])
def test_submitit_array_one_job_per_split(prepared, tmp_path, cluster):
    """The same executor code as the WebDataset array (data_prep.tasks.run_tasks); local: a real subprocess job
    (val only: each job pays ffcv's numba import, ~10 s), debug: both splits in this process."""
    src, _, out, _ = prepared
    o = tmp_path / "o"
    splits = ("val",) if cluster == "local" else ("train", "val")
    run = dict(cluster=cluster, folder=tmp_path / "logs", executor_params={"timeout_min": 10}, workers=1,
               splits=splits, **KW)
    m = write_ffcv(src, o, **run)
    for split in splits:
        assert m[split]["params"]["cluster"] == cluster and m[split]["reused"] is False
        assert read_beton(o / "ffcv" / f"{split}.beton") == read_beton(out / "ffcv" / f"{split}.beton")
    if cluster == "local":   # the split really was written by a job in its own subprocess
        assert len(list((tmp_path / "logs").glob("*_result.pkl"))) == 1
        # ... in a fresh interpreter: its log is the job's own (submitit's), not this process's output
        assert len(list((tmp_path / "logs").glob("*_log.out"))) == 1
    assert verify(o)["ok"]
    before = _stamp(o / "ffcv")
    again = write_ffcv(src, o, **run)   # the rerun's array tasks find their splits complete
    assert all(again[s]["reused"] for s in splits) and _stamp(o / "ffcv") == before
