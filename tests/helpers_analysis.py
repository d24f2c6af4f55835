"""Helpers for the analysis/benchmark tests: a tiny real WebDataset and a tiny CPVT."""
from __future__ import annotations

from pathlib import Path

import timm
import torch

import pipeline.models  # noqa: F401 - registers cpvt_* in timm

# A CPVT-Ti-shaped model small enough to run many times on 2 CPU cores.
TINY = dict(embed_dim=48, depth=3, num_heads=2)


def tiny_cpvt(name: str = "cpvt_ti", num_classes: int = 3, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=num_classes, **dict(TINY, **kw)).eval()


def tiny_wds(root: Path) -> Path:
    """3 classes, 4 train / 3 val images per class, converted to WebDataset under ``root/out``."""
    from data_prep.demo_dataset import make_demo_dataset
    from data_prep.write_webdataset import write_webdataset

    src, out = root / "src", root / "out"
    make_demo_dataset(src, num_classes=3, train_per_class=4, val_per_class=3, min_side=40, max_side=64,
                      large_images=0, bad_files=False, val_layout="folders", seed=0)
    write_webdataset(src, out, workers=1, progress=False)
    return out
