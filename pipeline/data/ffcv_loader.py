"""FFCV back end over data_prep's ``OUT/ffcv/{split}.beton`` (fields ``image``: RGBImageField, ``label``: IntField).

Training: ``RandomResizedCropRGBImageDecoder`` -> flip -> [timm RandAugment] -> uint8 NHWC tensor, then the
shared batch ops (normalise, random erasing, Mixup/CutMix). Order ``RANDOM``: the epoch's permutation of FFCV's
distributed order (``torch.utils.data.DistributedSampler``, seeded by seed + epoch), dealt ``[rank::world]``
-- at every world size, one rank included (FFCV's own single-process order is a NumPy permutation instead), so
global position ``p`` of the epoch holds the same sample at any world size and a run resumes on another one
from its global sample index (:mod:`pipeline.data.base`). ``QUASI_RANDOM`` (a single process with
``os_cache=False``) is FFCV's own order and resumes on one rank only. ``drop_last``. With ``aug.repeats > 1``
(DeiT's repeated augmentation) the order is DeiT's ``RASampler`` order instead (:func:`repeated_aug_order`,
also dealt ``[rank::world]``). The keys of a batch are its sample indices (``iter_with_keys``).

Changing resolution/batch size between epochs reuses the compiled pipeline: FFCV re-declares its buffers from
the operations' current state at the start of every epoch, and the numba-compiled decode writes into whatever
destination it gets, so the loader only sets ``decoder.output_size`` and ``loader.batch_size`` (what FFCV's
ImageNet example does with ``decoder.output_size`` per epoch). The epoch's sample order is FFCV's own for
``epoch`` (``loader.next_epoch``), truncated to ``len(loader)`` batches, with the first ``skip_batches``
batches cut out of the order before anything is read.

Determinism: the sample order and the batch-level augmentation are a function of (seed, epoch, rank); the
per-sample crop/flip draws come from numba's thread-local RNGs inside FFCV and are not reproducible.

Validation: rank ``r`` reads the contiguous range ``[r*N/R, (r+1)*N/R)`` in ``SEQUENTIAL`` order through
``indices=``; batches are padded to full size and to the same count on every rank (label -1).
Native-aspect validation (``eval.mode: native``) reads the stored image payloads itself
(:class:`FfcvNativeSource` says why) and shares the bucketed schedule of :class:`pipeline.data.base.NativeEvalLoader`.

Importing ffcv (and every Loader construction/iteration) calls ``torch.set_num_threads``; the loaders put the
caller's thread count back (:mod:`pipeline.ffcv_compat`).
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from pipeline.config import AugConfig, ConfigError, DataConfig
from pipeline.data.aspect_buckets import check_native
from pipeline.data.base import EvalLoader, NativeEvalLoader, TrainLoader
from pipeline.rng import make_seed
from pipeline.data.ffcv_pipelines import (TimmAugment, ffcv_eval_image_pipeline, ffcv_label_pipeline,
                                          ffcv_train_image_pipeline)
from pipeline.data.transforms import decode_image
from pipeline.ffcv_compat import keep_torch_threads

with keep_torch_threads():   # importing ffcv sets torch's intra-op thread count to 1: put it back
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader


def repeated_aug_order(num_samples: int, *, repeats: int, seed: int, epoch: int, rank: int,
                       world_size: int) -> np.ndarray:
    """DeiT's ``RASampler`` order for one rank: a permutation of the dataset seeded by (seed, epoch), the same
    on every rank, each index repeated ``repeats`` times in a row, dealt round-robin to the ranks (so the copies
    of an image land on different ranks in the same step), truncated to the rank's normal epoch length."""
    perm = np.random.default_rng(make_seed(seed, epoch, 0x5A)).permutation(num_samples)
    dealt = np.repeat(perm, repeats)[rank::world_size]
    return dealt[: num_samples // world_size]


class _EpochOrder:
    """Wraps FFCV's traversal order: keep the first ``take`` indices of the epoch, drop the first ``skip``.
    With ``repeats > 1`` the order is :func:`repeated_aug_order` instead of FFCV's own."""

    def __init__(self, base, *, num_samples: int, repeats: int, seed: int, rank: int, world_size: int):
        self.base = base
        self.take: int | None = None
        self.skip = 0
        self.num_samples, self.repeats, self.seed = num_samples, repeats, seed
        self.rank, self.world_size = rank, world_size
        self.quasi_random = False

    def sample_order(self, epoch: int):
        if self.repeats > 1:
            order = repeated_aug_order(self.num_samples, repeats=self.repeats, seed=self.seed, epoch=epoch,
                                       rank=self.rank, world_size=self.world_size)
        elif self.quasi_random:
            order = self.base.sample_order(epoch)
        else:
            order = distributed_order(self.num_samples, seed=self.seed, epoch=epoch, rank=self.rank,
                                      world_size=self.world_size)
        return order[: self.take][self.skip:]


def distributed_order(num_samples: int, *, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """FFCV's distributed ``RANDOM`` order for one rank (``DistributedSampler(shuffle=True, seed=seed)`` at
    ``epoch``: ``torch.randperm`` seeded by seed + epoch, padded, dealt ``[rank::world_size]``), computed the
    same way at any world size."""
    sampler = DistributedSampler(range(num_samples), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    return np.fromiter(iter(sampler), dtype=np.int64)


def _ffcv_threads(num_workers: int) -> int:
    return max(1, num_workers)


class FfcvTrainLoader(TrainLoader):
    format = "ffcv"

    def __init__(self, path: str, data: DataConfig, aug: AugConfig, *, num_classes: int, rank: int,
                 world_size: int, seed: int, device=None):
        if data.ffcv_order == "quasi_random" and world_size > 1:
            raise ConfigError("data.ffcv_order: 'quasi_random' is not supported by FFCV with world_size > 1; "
                              "allowed: ['random']")
        threads = keep_torch_threads()
        # on CPU, normalising inside FFCV's parallel pipeline is cheaper than a separate pass in this thread;
        # for an accelerator, uint8 batches travel and are normalised on the device
        # (not after the non-JIT RandAugment op: FFCV's stage grouping never terminates on jit->python->jit)
        in_pipeline = (device is None or torch.device(device).type == "cpu") and not aug.auto_augment
        self.decoder, image_ops = ffcv_train_image_pipeline(aug, 224, normalize=in_pipeline)
        self.augment = next((op for op in image_ops if isinstance(op, TimmAugment)), None)
        order = OrderOption.QUASI_RANDOM if data.ffcv_order == "quasi_random" else OrderOption.RANDOM
        self.loader = Loader(path, batch_size=data.batch_size, num_workers=_ffcv_threads(data.num_workers),
                             os_cache=data.os_cache, order=order, distributed=world_size > 1, seed=seed,
                             pipelines={"image": image_ops, "label": ffcv_label_pipeline()}, drop_last=True,
                             batches_ahead=data.ffcv_batches_ahead)
        threads.restore()
        self._threads = threads
        self.order = _EpochOrder(self.loader.traversal_order, num_samples=int(self.loader.reader.num_samples),
                                 repeats=aug.repeats, seed=seed, rank=rank, world_size=world_size)
        self.order.quasi_random = data.ffcv_order == "quasi_random"
        self.loader.traversal_order = self.order
        super().__init__(data, aug, num_classes=num_classes, rank=rank, world_size=world_size, seed=seed,
                         num_samples=int(self.loader.reader.num_samples), device=device)

    def _configure(self) -> None:
        res, bs = self.resolution, self.batch_size
        self.decoder.output_size = (res, res)
        self.loader.batch_size = bs
        if self.augment is not None:
            self.augment.magnitude = self.magnitude
        self.order.take = len(self) * bs
        self.order.skip = self.skip_batches * bs
        self.loader.next_epoch = self.epoch

    def _iter_raw(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, _ in self._iter_raw_keys():
            yield images, labels

    def _iter_raw_keys(self):
        self.loader.next_epoch = self.epoch   # iterating again replays the configured epoch
        if self.skip_batches >= len(self):
            return
        # RANDOM / RASampler orders: batch k holds order[k*B:(k+1)*B]; QUASI_RANDOM reorders within its pages
        order = None if self.order.quasi_random else self.order.sample_order(self.epoch)
        bs = self.batch_size
        it = iter(self.loader)
        try:
            for k, (images, labels) in enumerate(it):
                if k == 0:   # FFCV's worker thread has set its thread count by now: put ours back
                    self._threads.restore()
                keys = None if order is None else [str(i) for i in order[k * bs:(k + 1) * bs]]
                yield images, labels.reshape(-1).clone(), keys   # FFCV's Squeeze makes a 1-sample batch 0-d
        finally:
            it.close()
            self._threads.restore()


class FfcvEvalLoader(EvalLoader):
    format = "ffcv"

    def __init__(self, path: str, data: DataConfig, aug: AugConfig, *, resolution: int, crop_pct: float,
                 rank: int, world_size: int, device=None):
        num_samples = int(Reader(path).num_samples)
        super().__init__(data, aug, resolution=resolution, crop_pct=crop_pct, rank=rank, world_size=world_size,
                         num_samples=num_samples, device=device)
        threads = keep_torch_threads()
        self.loader = None
        if self.stop > self.start:
            _, image_ops = ffcv_eval_image_pipeline(self.resolution, self.crop_pct)
            self.loader = Loader(path, batch_size=self.batch_size, num_workers=_ffcv_threads(data.num_workers),
                                 os_cache=data.os_cache, order=OrderOption.SEQUENTIAL, distributed=False,
                                 indices=np.arange(self.start, self.stop), drop_last=False,
                                 pipelines={"image": image_ops, "label": ffcv_label_pipeline()},
                                 batches_ahead=data.ffcv_batches_ahead)
        threads.restore()
        self._threads = threads

    def _iter_raw(self):
        n = 0
        if self.loader is not None:
            it = iter(self.loader)
            pos = self.start
            try:
                for images, labels in it:
                    self._threads.restore()
                    b = images.shape[0]
                    keys = [str(i) for i in range(pos, pos + b)]
                    pos += b
                    n += 1
                    yield self._pad(images, labels.reshape(-1).clone(), keys)
            finally:
                it.close()
                self._threads.restore()
        for _ in range(n, len(self)):
            yield self._padding_batch()


class FfcvNativeSource:
    """Random access to the stored images of a .beton for native evaluation.

    FFCV's image decoders write into a fixed output size (``SimpleRGBImageDecoder`` needs every image the same
    size, the crop decoders crop), and one ``Loader`` per bucket shape would compile one pipeline per shape (29
    at 224 px). So this reads the ``image`` field as stored: its per-sample metadata (mode, width, height,
    data_ptr) gives every size without decoding, the allocation table gives each payload's length, and a
    JPEG payload is decoded by the same PIL path as WebDataset (a raw payload is the pixels). The stored
    image is what data_prep wrote (longer side capped at its ``max_resolution``)."""

    def __init__(self, path: str):
        reader = Reader(path)
        names = list(reader.field_names)
        if "image" not in names or "label" not in names:
            raise ConfigError(f"data.root: {path} has fields {names}; native evaluation reads 'image' "
                              f"(RGBImageField) and 'label'")
        meta = reader.metadata[f"f{names.index('image')}"]
        if not all(k in (meta.dtype.names or ()) for k in ("mode", "width", "height", "data_ptr")):
            raise ConfigError(f"data.root: {path}: field 'image' is not an RGBImageField (native evaluation "
                              f"needs its mode/width/height/data_ptr metadata)")
        self.path = path
        self.modes = np.asarray(meta["mode"]).copy()
        self.ptrs = np.asarray(meta["data_ptr"]).astype(np.int64)
        self.widths, self.heights = np.asarray(meta["width"]).copy(), np.asarray(meta["height"]).copy()
        table = reader.alloc_table
        order = np.argsort(table["ptr"])
        ptr_sorted, size_sorted = table["ptr"][order].astype(np.int64), table["size"][order].astype(np.int64)
        pos = np.searchsorted(ptr_sorted, self.ptrs)
        if np.any(pos >= len(ptr_sorted)) or np.any(ptr_sorted[np.minimum(pos, len(ptr_sorted) - 1)] != self.ptrs):
            raise ConfigError(f"data.root: {path}: image pointers missing from the allocation table (damaged file)")
        self.lengths = size_sorted[pos]
        self.jpg_mode = int(IMAGE_MODES["jpg"])
        self.sizes = list(zip(self.widths.tolist(), self.heights.tolist()))
        self.labels = np.asarray(reader.metadata[f"f{names.index('label')}"]).astype(np.int64).reshape(-1).tolist()
        self.keys = [str(i) for i in range(len(self.sizes))]   # the FFCV index, as the center-crop loader
        self._fd, self._pid = -1, -1

    def __getstate__(self):
        return dict(self.__dict__, _fd=-1, _pid=-1)   # descriptors are per process

    def image(self, index: int, draft_size: int | None):
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        data = os.pread(self._fd, int(self.lengths[index]), int(self.ptrs[index]))
        if int(self.modes[index]) == self.jpg_mode:
            return decode_image(data, draft_size)
        h, w = int(self.heights[index]), int(self.widths[index])
        return Image.fromarray(np.frombuffer(data, np.uint8)[: h * w * 3].reshape(h, w, 3))

    def __del__(self):
        if self._pid == os.getpid() and self._fd >= 0:
            os.close(self._fd)


class FfcvNativeEvalLoader(NativeEvalLoader):
    format = "ffcv"

    def __init__(self, path: str, data: DataConfig, aug: AugConfig, *, resolution: int, rank: int,
                 world_size: int, patch_size: int = 16, max_aspect: float = 2.0, device=None):
        check_native(resolution, patch_size, max_aspect)   # before the file is read
        super().__init__(data, aug, FfcvNativeSource(path), resolution=resolution, rank=rank,
                         world_size=world_size, patch_size=patch_size, max_aspect=max_aspect, device=device)


__all__ = ["FfcvEvalLoader", "FfcvNativeEvalLoader", "FfcvNativeSource", "FfcvTrainLoader", "distributed_order",
           "repeated_aug_order"]
