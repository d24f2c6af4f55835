"""The demo dataset: ImageNet layout, varied sizes, every bad kind, separable classes."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from data_prep.demo_dataset import BAD_KINDS, make_demo_dataset


def test_layout_sizes_and_bad_files(tmp_path):
    desc = make_demo_dataset(tmp_path, num_classes=4, train_per_class=6, val_per_class=3, min_side=24,
                             max_side=80, large_images=2, large_side=300, seed=5)
    assert json.loads((tmp_path / "demo_dataset.json").read_text()) == desc
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == desc["classes"] == sorted(desc["classes"])
    assert len(list((tmp_path / "train").rglob("*.JPEG"))) == desc["splits"]["train"]["found"] == 4 * 6 + 6
    val = sorted((tmp_path / "val").iterdir())
    assert all(p.is_file() for p in val) and len(val) == 4 * 3 + 6
    with open(tmp_path / "LOC_val_solution.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["ImageId"] for r in rows] == [p.stem for p in val]
    assert {r["PredictionString"].split()[0] for r in rows} == set(desc["classes"])
    for split in ("train", "val"):
        assert set(desc["splits"][split]["bad"]) == set(BAD_KINDS)
    sizes = {Image.open(p).size for p in (tmp_path / "train" / desc["classes"][1]).glob("*_[0-9].JPEG")}
    ratios = {round(w / h, 1) for w, h in sizes}
    assert len(sizes) >= 4 and len(ratios) >= 3 and all(24 <= s <= 80 for wh in sizes for s in wh)
    assert Image.open(tmp_path / "train" / desc["classes"][0] / f"{desc['classes'][0]}_0.JPEG").size == (300, 225)
    bad = desc["splits"]["train"]["bad"]
    assert Image.open(bad["cmyk"][0]).mode == "CMYK" and Image.open(bad["png_named_jpeg"][0]).format == "PNG"
    assert Image.open(bad["grayscale"][0]).mode == "L" and (tmp_path / bad["zero_byte"][0]).stat().st_size == 0
    with pytest.raises(ValueError, match="val_layout"):
        make_demo_dataset(tmp_path / "x", val_layout="kaggle")


def _load(paths, res: int = 24):
    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((res, res)), np.float32) / 255 - 0.5
                     for p in paths]).transpose(0, 3, 1, 2)


@pytest.mark.slow
def test_classes_are_learnable(tmp_path):
    """A tiny conv net learns the 10 demo classes from 20 images each in a few seconds on CPU."""
    import torch
    from torch import nn

    desc = make_demo_dataset(tmp_path, num_classes=10, train_per_class=20, val_per_class=6, min_side=32,
                             max_side=64, large_images=0, bad_files=False, val_layout="folders", seed=2)
    xs, ys, vx, vy = [], [], [], []
    for c, w in enumerate(desc["classes"]):
        t = _load(sorted((tmp_path / "train" / w).glob("*.JPEG")))
        v = _load(sorted((tmp_path / "val" / w).glob("*.JPEG")))
        xs.append(t), vx.append(v)
        ys += [c] * len(t)
        vy += [c] * len(v)
    x, y = torch.from_numpy(np.concatenate(xs)), torch.tensor(ys)
    vx, vy = torch.from_numpy(np.concatenate(vx)), torch.tensor(vy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny ops: one thread is fastest, and the CI machine is shared
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(24, 48, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(48, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                        nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for epoch in range(15):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 25):
            idx = perm[i:i + 25]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (net(vx).argmax(1) == vy).float().mean().item()
    torch.set_num_threads(threads)
    assert acc > 0.6, acc   # chance is 0.1
