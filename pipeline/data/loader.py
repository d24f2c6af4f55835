"""Loader factory: picks the WebDataset or FFCV back end from ``DataConfig.format``.

Typical training loop::

    train = build_train_loader(cfg.data, cfg.aug, num_classes=C, rank=r, world_size=w, seed=cfg.seed)
    val = build_eval_loader(cfg.data, resolution=224, rank=r, world_size=w, crop_pct=cfg.aug.crop_pct)
    for epoch in range(start_epoch, epochs):
        res, bs = res_schedule.at(epoch)
        train.set_epoch(epoch, res, batch_size=bs, skip_batches=resume_step if epoch == start_epoch else 0)
        for step, (x, y) in enumerate(train, start=train.skip_batches):
            lr = lr_sched.step(epoch, step, len(train), train.global_batch_size)
            ...
        for x, y in val:          # labels == -1 are padding: mask them out, then all-reduce the sums
            ...

See :mod:`pipeline.data.base` for the batch contract.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import AugConfig, ConfigError, DataConfig, check_choice, check_data_aug, validate
from pipeline.data.aspect_buckets import DEFAULT_MAX_ASPECT, check_native
from pipeline.data.base import PAD_LABEL, EvalLoader, TrainLoader
from pipeline.data.workers import fit_num_workers, task_cpus
from pipeline.data.shard_index import ffcv_path, load_split_index, read_classes
from pipeline.data.webdataset_loader import WdsEvalLoader, WdsNativeEvalLoader, WdsTrainLoader
from pipeline.storage import is_url


EVAL_MODES = ("center_crop", "native")


def _check_root(data: DataConfig) -> str:
    if not data.root:
        raise ConfigError("data.root: must point at a data_prep output directory (holding classes.json, wds/, ffcv/)")
    if not is_url(data.root) and not Path(data.root).is_dir():   # URLs: read_classes names what is missing
        raise ConfigError(f"data.root: {data.root!r} is not a directory")
    return data.root


def _fit_workers(data: DataConfig) -> DataConfig:
    """Worker counts that fit this rank's CPUs (pipeline/train.py fits and logs them before any of this runs;
    other callers get the same numbers silently)."""
    return fit_num_workers(data, task_cpus())[0]


def build_train_loader(data_cfg: DataConfig, aug_cfg: AugConfig, *, num_classes: int, rank: int, world_size: int,
                       seed: int, device: torch.device | str | None = None) -> TrainLoader:
    """Training loader for this rank; call ``set_epoch`` before each epoch. ``device``: where the batch ops
    (normalise, random erasing, Mixup) run and the batches end up (default CPU)."""
    validate(data_cfg, "data.")
    validate(aug_cfg, "aug.")
    check_data_aug(data_cfg, aug_cfg)
    data_cfg = _fit_workers(data_cfg)
    root = _check_root(data_cfg)
    classes = read_classes(root)
    if num_classes < len(classes):
        raise ConfigError(f"num_classes: {num_classes} is smaller than the {len(classes)} classes in "
                          f"{root}/classes.json")
    kw = dict(num_classes=num_classes, rank=rank, world_size=world_size, seed=seed, device=device)
    if data_cfg.format == "wds":
        index = load_split_index(root, data_cfg.train_split, field="data.train_split")
        return WdsTrainLoader(index, data_cfg, aug_cfg, **kw)
    from pipeline.data.ffcv_loader import FfcvTrainLoader  # local: ffcv sets torch's threads, loads numba (~3 s)

    return FfcvTrainLoader(ffcv_path(root, data_cfg.train_split), data_cfg, aug_cfg, **kw)


def build_eval_loader(data_cfg: DataConfig, *, resolution: int, rank: int, world_size: int,
                      crop_pct: float | None = None, aug_cfg: AugConfig | None = None,
                      device: torch.device | str | None = None, mode: str = "center_crop", patch_size: int = 16,
                      max_aspect: float = DEFAULT_MAX_ASPECT) -> EvalLoader:
    """Exact, rank-balanced validation loader. ``mode="center_crop"``: resize + center crop (``crop_pct``);
    ``mode="native"``: the whole image at its aspect bucket with short side ``resolution`` (a multiple of
    ``patch_size``; long side <= ``max_aspect`` x short, :mod:`pipeline.data.aspect_buckets`). ``aug_cfg``
    supplies mean/std, the interpolation and the default ``crop_pct``; build it once and iterate it every
    evaluation."""
    aug_cfg = aug_cfg or AugConfig()
    validate(data_cfg, "data.")
    validate(aug_cfg, "aug.")
    data_cfg = _fit_workers(data_cfg)
    check_choice("eval.mode", mode, EVAL_MODES)
    if mode == "native":
        check_native(resolution, patch_size, max_aspect)
    root = _check_root(data_cfg)
    if mode == "native" and is_url(root):   # the size pass seeks through local tar headers
        raise ConfigError(f"eval.mode: 'native' reads image sizes from local shards; data.root {root} is a URL "
                          f"(allowed with a URL: ['center_crop'], or copy the val split locally)")
    if mode == "native":
        kw = dict(resolution=resolution, rank=rank, world_size=world_size, patch_size=patch_size,
                  max_aspect=max_aspect, device=device)
        if data_cfg.format == "wds":
            index = load_split_index(root, data_cfg.val_split, field="data.val_split")
            return WdsNativeEvalLoader(index, data_cfg, aug_cfg, **kw)
        from pipeline.data.ffcv_loader import FfcvNativeEvalLoader  # local: as FfcvTrainLoader

        return FfcvNativeEvalLoader(ffcv_path(root, data_cfg.val_split), data_cfg, aug_cfg, **kw)
    crop_pct = aug_cfg.crop_pct if crop_pct is None else crop_pct
    kw = dict(resolution=resolution, crop_pct=crop_pct, rank=rank, world_size=world_size, device=device)
    if data_cfg.format == "wds":
        index = load_split_index(root, data_cfg.val_split, field="data.val_split")
        return WdsEvalLoader(index, data_cfg, aug_cfg, **kw)
    from pipeline.data.ffcv_loader import FfcvEvalLoader  # local: as FfcvTrainLoader

    return FfcvEvalLoader(ffcv_path(root, data_cfg.val_split), data_cfg, aug_cfg, **kw)


__all__ = ["EVAL_MODES", "EvalLoader", "PAD_LABEL", "TrainLoader", "build_eval_loader", "build_train_loader"]
