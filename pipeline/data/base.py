"""The loader contract shared by the WebDataset and FFCV back ends.

:class:`TrainLoader`
    ``set_epoch(epoch, resolution, batch_size=None, skip_batches=0)`` then iterate. ``len(loader)`` is the
    number of batches of the whole epoch on this rank, ``num_samples // (batch_size * world_size)``, identical
    on every rank; iteration yields the batches ``skip_batches .. len-1`` of the epoch as
    ``(images, targets)``: images normalised float32/bfloat16 ``(B, 3, res, res)`` (NCHW, or channels-last
    memory format), targets ``(B,)`` int64 or ``(B, num_classes)`` float soft targets when Mixup/CutMix is on.
    ``iter_with_keys()`` yields ``(images, targets, keys)``: each sample's key (host strings the back end has
    anyway; None from a back end that cannot name its samples). With ``aug.aspect_buckets`` (WebDataset) the
    images of each optimizer step (``accum`` micro-batches, ``set_epoch(..., accum=)``) are ``(B, 3, H, W)`` in
    that step's bucket (:mod:`pipeline.data.aspect_buckets`), the same on every rank.
    ``set_epoch(..., aug_strength=s)``: the epoch's fraction of the recipe's augmentation
    (:func:`pipeline.schedules.aug_strength`) sets its RandAugment magnitude (:attr:`TrainLoader.magnitude`, None: the
    recipe's spec unchanged) and, with ``aug.ramp_mixup``, scales the Mixup/CutMix probability.

    Global positions: the epoch is one global sequence of samples and rank ``r`` of ``R`` takes positions
    ``r, r + R, r + 2R, ...`` in batches of ``batch_size``, so ``k`` global steps of ``G = batch_size x
    accumulation x R`` samples consume exactly the positions ``[0, kG)``, and which sample sits at a position
    does not depend on ``R`` (WebDataset: canonical streams; FFCV: one permutation per epoch). A run can
    therefore continue at another world size with the same ``G`` from the global sample index ``kG``
    (``skip_batches = kG / (batch_size x R)``). The per-sample augmentation follows the position on WebDataset
    (FFCV's own per-sample draws are not reproducible); the batch-level augmentation (random erasing,
    Mixup/CutMix) is a function of (seed, epoch, rank, batch index) and so follows the layout.

:class:`EvalLoader`
    Every sample of the split exactly once across ranks, the same number of full-size batches on every rank
    (collectives inside a sharded forward must match); padding samples carry label ``-1``.

:class:`NativeEvalLoader`
    The same contract for native-aspect evaluation (``eval.mode: native``): whole images resized to their
    aspect bucket, one shape per batch, every rank the same (shape, batch size) sequence
    (:mod:`pipeline.data.aspect_buckets`); the format supplies a :class:`NativeSource`.

Back ends implement ``_configure()`` (apply the epoch's settings) and ``_iter_raw()`` (uint8 batches).
"""
from __future__ import annotations

import math
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.config import AugConfig, ConfigError, DataConfig, check_data_aug, check_positive, check_range
from pipeline.data.aspect_buckets import (DEFAULT_MAX_ASPECT, NativeBatch, check_native, native_shape,
                                         plan_native_batches)
from pipeline.data.mixup import BatchAugment
from pipeline.data.transforms import BatchNormalizer, native_eval_transform
from pipeline.rng import make_seed
from pipeline.schedules import ramped_magnitude

PAD_LABEL = -1


class TrainLoader:
    format: str = ""

    def __init__(self, data: DataConfig, aug: AugConfig, *, num_classes: int, rank: int, world_size: int,
                 seed: int, num_samples: int, device: torch.device | str | None = None):
        if not (0 <= rank < world_size):
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.data, self.aug = data, aug
        self.num_classes = num_classes
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_samples = num_samples
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.normalizer = BatchNormalizer(aug.mean, aug.std, data.dtype, data.channels_last, self.device)
        self.batch_augment = BatchAugment(aug, num_classes, self.device)
        self.epoch = 0
        self.resolution: int | None = None
        self.batch_size = data.batch_size
        self.skip_batches = 0
        self.accum = 1
        self.magnitude: int | None = None   # the epoch's RandAugment magnitude; None: aug.auto_augment as it is

    # ------------------------------------------------------------------ contract
    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def soft_targets(self) -> bool:
        return self.batch_augment.soft_targets

    def __len__(self) -> int:
        return self.num_samples // self.global_batch_size

    def set_epoch(self, epoch: int, resolution: int, batch_size: int | None = None, skip_batches: int = 0,
                  accum: int = 1, aug_strength: float = 1.0) -> None:
        """``accum``: micro-batches per optimizer step (aspect-bucketed training gives a whole step one shape);
        ``aug_strength``: the epoch's fraction in [0, 1] of the recipe's augmentation strength."""
        bs = self.data.batch_size if batch_size is None else int(batch_size)
        check_data_aug(self.data, self.aug, batch_size=bs)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if int(resolution) <= 0:
            raise ConfigError(f"resolution: {resolution!r} must be > 0")
        n = self.num_samples // (bs * self.world_size)
        if n == 0:
            raise ConfigError(f"data.batch_size: global batch {bs} x {self.world_size} ranks exceeds the "
                              f"{self.num_samples} training samples")
        if not (0 <= skip_batches <= n):
            raise ValueError(f"skip_batches must be in [0, {n}], got {skip_batches}")
        check_positive("accum", accum)
        check_range("aug_strength", aug_strength, 0.0, 1.0)
        self.epoch, self.resolution, self.batch_size, self.skip_batches = epoch, int(resolution), bs, skip_batches
        self.accum = int(accum)
        strength = float(aug_strength)
        self.magnitude = ramped_magnitude(self.aug.auto_augment, strength) if strength < 1.0 else None
        self.batch_augment.set_mixup_prob(self.aug.mixup_prob * (strength if self.aug.ramp_mixup else 1.0))
        self._configure()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, targets, _ in self.iter_with_keys():
            yield images, targets

    def iter_with_keys(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str] | None]]:
        """Like iteration, plus each batch's sample keys (None where the back end cannot name them)."""
        if self.resolution is None:
            raise RuntimeError("call set_epoch(epoch, resolution) before iterating a TrainLoader")
        for index, (images, labels, keys) in enumerate(self._iter_raw_keys(), start=self.skip_batches):
            x, y = self._finish(images, labels, index)
            yield x, y, keys

    # ------------------------------------------------------------------ helpers for back ends
    def _finish(self, images_u8: torch.Tensor, labels: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalizer(images_u8)
        y = labels.to(self.device, dtype=torch.int64, non_blocking=True)
        x, y = self.batch_augment(x, y, make_seed(self.seed, self.epoch, self.rank, index, 0xBA7C))
        return self.normalizer.finish(x), y

    def _configure(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _iter_raw(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _iter_raw_keys(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str] | None]]:
        """``_iter_raw`` plus keys; back ends that know their samples' keys override it."""
        for images, labels in self._iter_raw():
            yield images, labels, None


class EvalLoader:
    format: str = ""
    mode: str = "center_crop"

    def __init__(self, data: DataConfig, aug: AugConfig, *, resolution: int, crop_pct: float, rank: int,
                 world_size: int, num_samples: int, device: torch.device | str | None = None):
        if not (0 <= rank < world_size):
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        if int(resolution) <= 0:
            raise ConfigError(f"resolution: {resolution!r} must be > 0")
        if not (0 < crop_pct <= 1):
            raise ConfigError(f"crop_pct: {crop_pct!r} must be in (0, 1]")
        self.data, self.aug = data, aug
        self.resolution, self.crop_pct = int(resolution), float(crop_pct)
        self.rank, self.world_size = rank, world_size
        self.num_samples = num_samples
        self.batch_size = data.eval_batch_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.normalizer = BatchNormalizer(aug.mean, aug.std, data.dtype, data.channels_last, self.device)
        self.start, self.stop = self.rank_range(rank)

    def rank_range(self, rank: int) -> tuple[int, int]:
        """The contiguous global sample indices ``[start, stop)`` evaluated by ``rank`` (sizes differ by <= 1)."""
        n, w = self.num_samples, self.world_size
        return rank * n // w, (rank + 1) * n // w

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.num_samples / self.world_size) / self.batch_size)

    def num_tokens(self, patch_size: int = 16) -> int:
        """Patch tokens of all real samples of the split (all ranks), the work one evaluation pass does."""
        return self.num_samples * (self.resolution // patch_size) ** 2

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, _ in self.iter_with_keys():
            yield images, labels

    def iter_with_keys(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """Like iteration, plus each sample's key ("" for padding): WebDataset ``__key__``, FFCV index."""
        for images, labels, keys in self._iter_raw():
            x = self.normalizer.finish(self.normalizer(images))
            yield x, labels.to(self.device, dtype=torch.int64, non_blocking=True), list(keys)

    def _pad(self, images: torch.Tensor, labels: torch.Tensor, keys: Sequence[str]):
        """Pad a partial uint8 batch to ``batch_size`` with zero images, label -1 and key ""."""
        k = self.batch_size - images.shape[0]
        if k <= 0:
            return images, labels, list(keys)
        pad_img = torch.zeros((k, *images.shape[1:]), dtype=images.dtype)
        images = torch.cat([images, pad_img])
        labels = torch.cat([labels.to(torch.int64), torch.full((k,), PAD_LABEL, dtype=torch.int64)])
        return images, labels, list(keys) + [""] * k

    def _padding_batch(self):
        r = self.resolution
        return (torch.zeros((self.batch_size, 3, r, r), dtype=torch.uint8),
                torch.full((self.batch_size,), PAD_LABEL, dtype=torch.int64), [""] * self.batch_size)

    def _iter_raw(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:  # pragma: no cover
        raise NotImplementedError


class NativeSource(Protocol):
    """What a format provides for native evaluation: per-sample sizes, labels and keys known up front (every rank
    plans the same schedule from them) and random access to one decoded image. Must pickle (DataLoader workers)."""
    sizes: Sequence[tuple[int, int]]    # (width, height) of the stored image, per global sample index
    labels: Sequence[int]
    keys: Sequence[str]

    def image(self, index: int, draft_size: int | None) -> Image.Image: ...


class _NativeBatches(Dataset):
    """Map-style: item ``j`` is the ``j``-th planned batch of this rank, decoded, resized and padded (uint8)."""

    def __init__(self, source: NativeSource, plan: Sequence[NativeBatch], aug: AugConfig, draft: bool):
        self.source, self.plan, self.draft = source, list(plan), draft
        self.transform = native_eval_transform(aug)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, j: int):
        b = self.plan[j]
        h, w = b.shape
        pixels = np.zeros((b.size, h, w, 3), dtype=np.uint8)
        for k, i in enumerate(b.indices):
            pixels[k] = self.transform(self.source.image(i, min(h, w) if self.draft else None), b.shape)
        labels = torch.full((b.size,), PAD_LABEL, dtype=torch.int64)
        labels[:len(b.indices)] = torch.tensor([int(self.source.labels[i]) for i in b.indices], dtype=torch.int64)
        keys = [str(self.source.keys[i]) for i in b.indices] + [""] * (b.size - len(b.indices))
        return torch.from_numpy(pixels).permute(0, 3, 1, 2), labels, keys   # NCHW, channels-last memory


class NativeEvalLoader(EvalLoader):
    """Native-aspect evaluation at short side ``resolution`` over a format's :class:`NativeSource`.

    Batches are planned by :func:`pipeline.data.aspect_buckets.plan_native_batches` (every sample once across
    ranks, padding label -1, identical shape sequence on every rank) and decoded by DataLoader workers, each
    batch by one worker, in plan order."""
    mode = "native"

    def __init__(self, data: DataConfig, aug: AugConfig, source: NativeSource, *, resolution: int, rank: int,
                 world_size: int, patch_size: int = 16, max_aspect: float = DEFAULT_MAX_ASPECT,
                 device: torch.device | str | None = None):
        check_native(resolution, patch_size, max_aspect)
        super().__init__(data, aug, resolution=resolution, crop_pct=1.0, rank=rank, world_size=world_size,
                         num_samples=len(source.sizes), device=device)
        self.patch_size, self.max_aspect = patch_size, max_aspect
        self.shapes = [native_shape(w, h, self.resolution, patch_size, max_aspect) for w, h in source.sizes]
        self.plan = plan_native_batches(self.shapes, resolution=self.resolution, batch_size=self.batch_size,
                                        rank=rank, world_size=world_size, patch=patch_size, max_aspect=max_aspect)
        self.dataset = _NativeBatches(source, self.plan, aug, draft=data.jpeg_draft)
        nw = min(data.num_workers, len(self.plan))
        self.dataloader = DataLoader(self.dataset, batch_size=None, shuffle=False, num_workers=nw,
                                     prefetch_factor=data.prefetch_factor if nw > 0 else None,
                                     pin_memory=bool(data.pin_memory) and self.device.type == "cuda")

    def __len__(self) -> int:
        return len(self.plan)

    def num_tokens(self, patch_size: int | None = None) -> int:
        p = patch_size or self.patch_size
        return sum((h // p) * (w // p) for h, w in self.shapes)

    def _iter_raw(self):
        yield from self.dataloader


__all__ = ["EvalLoader", "NativeEvalLoader", "NativeSource", "PAD_LABEL", "TrainLoader"]
