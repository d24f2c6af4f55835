"""Tiny real datasets for the loader tests, written by data_prep's own writers (WebDataset shards + .beton)."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import AugConfig, DataConfig

NUM_CLASSES = 4
TRAIN_PER_CLASS = 12          # 48 train samples -> 3 shards of <= 17 (an odd shard count)
VAL_PER_CLASS = 5             # 20 val samples -> 2 shards of <= 17
SHARD_MAX_COUNT = 17

_BUILT: dict[str, Path] = {}


def loader_dataset(base: Path) -> Path:
    """data_prep output root (classes.json, wds/, ffcv/) for a 4-class demo set; built once per session."""
    key = str(base)
    if key in _BUILT:
        return _BUILT[key]
    from data_prep.demo_dataset import make_demo_dataset
    from data_prep.write_ffcv import write_ffcv
    from data_prep.write_webdataset import write_webdataset

    src, out = base / "src", base / "out"
    make_demo_dataset(src, num_classes=NUM_CLASSES, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS,
                      min_side=40, max_side=96, large_images=1, large_side=200, bad_files=False,
                      val_layout="folders", seed=0)
    write_webdataset(src, out, shard_max_count=SHARD_MAX_COUNT, workers=1, progress=False)
    write_ffcv(src, out, workers=1, progress=False)
    _BUILT[key] = out
    return out


def split_info(root: Path, split: str) -> dict:
    return json.loads((Path(root) / "wds" / "_info.json").read_text())["splits"][split]


def data_cfg(root: Path, fmt: str = "wds", **kw) -> DataConfig:
    args = dict(format=fmt, root=str(root), batch_size=8, eval_batch_size=6, num_workers=0, shuffle_buffer=20,
                shuffle_initial=10, ffcv_batches_ahead=2)
    args.update(kw)
    return DataConfig(**args)


def aug_cfg(**kw) -> AugConfig:
    return AugConfig(**kw)


def distributed_worker(rank: int, world_size: int, port: int, root: str, out_dir: str, formats: tuple) -> None:
    """One rank of the 2-rank gloo test: train epochs with a collective per batch (a rank with fewer batches
    would hang the other, caught by the process-group timeout), then exact validation; results to JSON."""
    import datetime
    import os

    import torch
    import torch.distributed as dist

    from pipeline.data.loader import build_eval_loader, build_train_loader

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    result: dict = {}
    try:
        for fmt in formats:
            data = data_cfg(Path(root), fmt, num_workers=0 if fmt == "wds" else 1)
            train = build_train_loader(data, aug_cfg(), num_classes=NUM_CLASSES, rank=rank, world_size=world_size,
                                       seed=0)
            epochs = []
            for epoch, (res, bs) in enumerate([(32, 8), (48, 6)]):
                train.set_epoch(epoch, res, batch_size=bs)
                n = 0
                for x, y in train:
                    assert x.shape == (bs, 3, res, res) and y.shape == (bs, NUM_CLASSES)
                    t = torch.ones(1)
                    dist.all_reduce(t)           # the per-step collective of a real training loop
                    n += 1
                epochs.append({"len": len(train), "batches": n})
            ev = build_eval_loader(data, resolution=32, rank=rank, world_size=world_size, crop_pct=0.875)
            keys, labels, batches = [], [], 0
            for x, y, k in ev.iter_with_keys():
                t = torch.ones(1)
                dist.all_reduce(t)               # a ZeRO-3 forward has collectives: counts must match
                batches += 1
                keys += k
                labels += y.tolist()
            result[fmt] = {"epochs": epochs, "eval_len": len(ev), "eval_batches": batches, "keys": keys,
                           "labels": labels, "num_samples": ev.num_samples}
        dist.barrier()
    finally:
        dist.destroy_process_group()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
