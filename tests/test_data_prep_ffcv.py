"""FFCV writing on a tiny real dataset, read back with ffcv.loader.Loader only (no project code)."""
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
from helpers_data_prep import expected_labels, tiny_demo

RES = 48
# numba's dispatcher finaliser inside ffcv's Loader raises a harmless KeyError at garbage collection
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("ffcv")
    src = base / "src"
    desc = tiny_demo(src)
    out = base / "out"
    threads = torch.get_num_threads()
    manifests = write_ffcv(src, out, max_resolution=RES, write_mode="proportion", compress_probability=0.5,
                           workers=2, progress=False)
    assert torch.get_num_threads() == threads   # importing ffcv must not pin torch to one thread
    return src, desc, out, manifests


def _load_all(path, res=32):
    n = torch.get_num_threads()
    from ffcv.fields.decoders import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    torch.set_num_threads(n)
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
    m = write_ffcv(src, o, splits=("val",), max_resolution=RES, write_mode="jpg", workers=1, progress=False)
    assert m["val"]["outputs"]["removed_stale"] == ["val.beton.tmp.1.dead"]
    assert sorted(p.name for p in (o / "ffcv").iterdir()) == ["val.beton", "val_manifest.json"]
    assert verify(o)["ok"]
