"""WebDataset back end: tar shards from data_prep (``OUT/wds``), read with webdataset's pipeline stages.

Training (resampled, every rank the same number of batches)
    The rank's epoch is ``len(loader)`` batches. With ``W`` DataLoader workers, batch ``i`` of the rank is made
    by *stream* ``(rank, i mod W)``; each stream is an independent, infinite, seeded sample source:

    * shards are split by node and worker: every epoch the shard list is shuffled with ``(seed, epoch)``
      (same permutation on all ranks) and dealt round-robin to the ``world_size * W`` streams; a stream reads
      its own shards first and then keeps *resampling* (with replacement, ``wds.ResampledShards``) from them,
      or from all shards when it was dealt none. Uneven shard counts therefore never starve a rank: every
      rank stops after exactly ``len(loader)`` batches (``islice``), with no collective needed;
    * tar members -> samples (:func:`pipeline.data.tar_samples.tar_samples`, webdataset's sample format from a
      leaner header reader) -> [``aug.repeats`` copies of each sample: DeiT's repeated augmentation]
      -> ``wds.shuffle`` (buffer seeded by the stream) -> skip -> decode/augment
      -> batch. Each batch's per-sample augmentation runs under a seed derived from the stream and the batch
      index, so the epoch is a pure function of (seed, epoch, rank, num_workers).

    ``skip_batches=k`` drops the first ``k`` batches of the epoch *before decoding*: each stream discards
    the raw (still-encoded) samples of its batches below ``k``, and physical worker ``p`` runs stream
    ``(p + k) mod W`` so that the DataLoader's round-robin resumes exactly at batch ``k``.

Validation (exact)
    Rank ``r`` evaluates the contiguous global sample range ``[r*N/R, (r+1)*N/R)`` (shard lengths from
    ``_info.json`` locate it, so a rank opens only the shards it needs), split into contiguous blocks of
    batches per worker, padded to full batches and to the same batch count on every rank (label -1).

Validation (native aspect, ``eval.mode: native``)
    data_prep records no pixel sizes, and the batch schedule needs every sample's size on every rank before the
    first batch (:mod:`pipeline.data.aspect_buckets`). :class:`WdsNativeSource` learns them with one pass over
    the split's tar *headers*: Python's ``tarfile`` seeks from header to header, and of each JPEG only the
    first 16 KiB (where its SOF marker is) are read and parsed by PIL -- no decoding, no collective, the same
    index on every rank (cached per process for the other resolutions). It also records each image's byte
    range, so a worker reads any planned batch's images by ``pread`` (the samples of one bucket are spread
    over all shards; tar order cannot be streamed bucket by bucket).

JPEGs are decoded at the smallest DCT scale that still covers the target size: for training, the size of the
sampled RandomResizedCrop box (:class:`pipeline.data.transforms.DraftRandomResizedCrop`, which decodes the
bytes with OpenCV and resizes the crop with torchvision's uint8 kernel), for validation the
resize-before-center-crop size (PIL draft mode).

With ``data.decode: device`` the training workers decode nothing (except PNG/CMYK/grayscale samples): they make
the same per-sample random draws from the JPEG header and ship the bytes, and the batch is decoded, cropped and
resized on the loader's device (:mod:`pipeline.data.device_decode`). Same order, boxes, flips and resume.
"""
from __future__ import annotations

import io
import itertools
import os
import random
import tarfile
from typing import Any, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.aspect_buckets import check_native
from pipeline.data.base import EvalLoader, NativeEvalLoader, TrainLoader
from pipeline.data.config import AugConfig, DataConfig
from pipeline.data.device_decode import CropDrawer, decode_resized_crops
from pipeline.rng import make_seed, seeded
from pipeline.data.shard_index import SplitIndex
from pipeline.data.tar_samples import _KEY_EXT, _META, TarFormatError, tar_samples
from pipeline.data.transforms import decode_image, eval_scale_size, eval_transform, train_transform_from_bytes


def pin_batches(data: DataConfig, device: torch.device, encoded: bool = False) -> bool:
    """Whether the DataLoader pins its batches: ``data.pin_memory`` with a CUDA device (uint8 batches then cross
    with ``non_blocking=True`` copies). ``encoded`` batches (device decoding) keep the JPEG bytes on the host
    (nvJPEG reads host memory) and are not pinned."""
    return bool(data.pin_memory) and device.type == "cuda" and not encoded


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _collate(images: list[torch.Tensor], labels: list[int], keys: list[str]):
    """uint8 CHW images (views of HWC pixels, as timm's MaybePILToTensor returns them) -> (B, 3, H, W) batch.

    Stacked as HWC, so each image is one contiguous copy (``torch.stack`` of the permuted views is a strided
    gather, ~5x slower); the batch is NCHW with channels-last memory, which the batch normaliser turns into
    the requested layout in the pass it makes anyway."""
    batch = torch.stack([im.permute(1, 2, 0) for im in images]).permute(0, 3, 1, 2)
    return batch, torch.tensor(labels, dtype=torch.int64), keys


def _decode_batch(samples: Iterator[dict[str, Any]], n: int, load) -> tuple[list, list[int], list[str]]:
    """The next (up to) ``n`` raw samples -> (images ``load(jpeg bytes)``, labels, keys)."""
    images, labels, keys = [], [], []
    for sample in itertools.islice(samples, n):
        images.append(load(sample["jpg"]))
        labels.append(int(sample["cls"]))
        keys.append(sample["__key__"])
    return images, labels, keys


# ----------------------------------------------------------------------------------------- training
def stream_shards(urls: list[str], *, seed: int, epoch: int, stream: int, num_streams: int) -> Iterator[dict]:
    """Shard URLs for one (rank, worker) stream: its dealt shards once, then resampled forever."""
    order = list(range(len(urls)))
    random.Random(make_seed(seed, epoch, 0x5A4D)).shuffle(order)
    mine = [urls[i] for i in order[stream::num_streams]]
    for url in mine:
        yield {"url": url}
    resampled = wds.ResampledShards(mine or list(urls), seed=make_seed(seed, epoch, stream, num_streams),
                                    worker_seed=lambda: 0, deterministic=True, empty_check=False)
    yield from resampled


def repeat_each(k: int):
    """Pipeline stage for DeiT's repeated augmentation on a stream: every (still-encoded) sample ``k`` times in
    a row, before the shuffle buffer spreads the copies; each copy is augmented independently."""
    def stage(samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            for _ in range(k):
                yield sample
    return stage


class _TrainStream(IterableDataset):
    """Yields this rank's uint8 batches for the configured epoch (see module docstring).

    The epoch's settings live in a shared-memory tensor, so the DataLoader's persistent workers (forked once,
    at the first epoch) see each :meth:`configure` made in the trainer's process before the next iteration."""

    def __init__(self, index: SplitIndex, data: DataConfig, aug: AugConfig, *, rank: int, world_size: int,
                 seed: int):
        super().__init__()
        self.index, self.data, self.aug = index, data, aug
        self.rank, self.world_size, self.seed = rank, world_size, seed
        # epoch, resolution, batch size, batches in the epoch, batches to skip
        self.settings = torch.tensor([0, 224, 1, 0, 0], dtype=torch.int64).share_memory_()

    def configure(self, *, epoch: int, resolution: int, batch_size: int, num_batches: int, skip: int) -> None:
        self.settings.copy_(torch.tensor([epoch, resolution, batch_size, num_batches, skip], dtype=torch.int64))

    def raw_samples(self, epoch: int, logical: int, num_workers: int) -> Iterator[dict[str, Any]]:
        """The still-encoded sample stream of one logical worker (shuffled, before skipping)."""
        stream = self.rank * num_workers + logical
        stream_seed = make_seed(self.seed, epoch, self.rank, logical, num_workers)
        pipeline = wds.DataPipeline(
            lambda: stream_shards(list(self.index.urls), seed=self.seed, epoch=epoch, stream=stream,
                                  num_streams=self.world_size * num_workers),
            tar_samples,
            *([repeat_each(self.aug.repeats)] if self.aug.repeats > 1 else []),
            wds.shuffle(self.data.shuffle_buffer, initial=self.data.shuffle_initial,
                        rng=random.Random(stream_seed)),
        )
        return iter(pipeline)

    def __iter__(self):
        worker, num_workers = _worker()
        epoch, res, bs, num_batches, skip = self.settings.tolist()
        logical = (worker + skip) % num_workers
        mine = range(logical, num_batches, num_workers)               # batch indices of the rank's epoch
        skipped = len(range(logical, skip, num_workers))
        stream_seed = make_seed(self.seed, epoch, self.rank, logical, num_workers)
        raw = self.raw_samples(epoch, logical, num_workers)
        samples = itertools.islice(raw, skipped * bs, None)          # skipped batches: never decoded
        if self.data.decode == "device":   # same draws, bytes shipped: decoded on the trainer's device
            drawer = CropDrawer(self.aug, res, draft=self.data.jpeg_draft)
            transform, collate = drawer, lambda drawn, labels, keys: (
                drawer.pack(drawn), torch.tensor(labels, dtype=torch.int64), keys)
        else:
            transform = train_transform_from_bytes(self.aug, res, draft=self.data.jpeg_draft)
            collate = _collate
        for b in range(skipped, len(mine)):
            with seeded(make_seed(stream_seed, b)):   # per batch: skipping is whole batches, so this is exact
                images, labels, keys = _decode_batch(samples, bs, transform)
            if len(images) < bs:
                raise RuntimeError(f"WebDataset stream ran dry after {b} batches (empty shards?)")
            yield collate(images, labels, keys)


class WdsTrainLoader(TrainLoader):
    format = "wds"

    def __init__(self, index: SplitIndex, data: DataConfig, aug: AugConfig, *, num_classes: int, rank: int,
                 world_size: int, seed: int, device=None):
        super().__init__(data, aug, num_classes=num_classes, rank=rank, world_size=world_size, seed=seed,
                         num_samples=index.num_samples, device=device)
        self.index = index
        self.dataset = _TrainStream(index, data, aug, rank=rank, world_size=world_size, seed=seed)
        nw = data.num_workers
        # workers are forked once and kept across epochs (the epoch's settings reach them through shared
        # memory); their base seed comes from this generator, not from the trainer's global RNG (augmentation
        # is seeded per batch from (seed, epoch, rank, batch) anyway)
        self.generator = torch.Generator().manual_seed(make_seed(seed, rank, 0xD1))
        self.dataloader = DataLoader(self.dataset, batch_size=None, num_workers=nw,
                                     prefetch_factor=data.prefetch_factor if nw > 0 else None,
                                     pin_memory=pin_batches(data, self.device, data.decode == "device"),
                                     persistent_workers=nw > 0, generator=self.generator)

    def _configure(self) -> None:
        self.dataset.configure(epoch=self.epoch, resolution=self.resolution, batch_size=self.batch_size,
                               num_batches=len(self), skip=self.skip_batches)

    def _batches(self):
        """(uint8 images, labels, keys, the device path's EncodedBatch or None) for the configured epoch."""
        for images, labels, keys in self.dataloader:
            if self.data.decode == "device":
                encoded = images
                images = decode_resized_crops(encoded, (self.resolution, self.resolution), self.device)
                yield images, labels, keys, encoded
            else:
                yield images, labels, keys, None

    def _iter_raw(self):
        for images, labels, _keys, _ in self._batches():
            yield images, labels

    def iter_with_keys(self):
        """Iterate the configured epoch, also yielding each batch's sample keys (for checks and analysis)."""
        for index, (images, labels, keys, _) in enumerate(self._batches(), start=self.skip_batches):
            x, y = self._finish(images, labels, index)
            yield x, y, keys

    def iter_with_boxes(self):
        """``data.decode: device`` only: like :meth:`iter_with_keys`, plus each sample's RandomResizedCrop box
        ``(B, 4)`` int64 (top, left, height, width in full-size pixels) and flip ``(B,)`` bool (checks, tests)."""
        if self.data.decode != "device":
            raise RuntimeError("iter_with_boxes needs data.decode: device (the CPU path ships pixels only)")
        for index, (images, labels, keys, enc) in enumerate(self._batches(), start=self.skip_batches):
            x, y = self._finish(images, labels, index)
            yield x, y, keys, enc.boxes, enc.flips


# ----------------------------------------------------------------------------------------- validation
class _EvalStream(IterableDataset):
    def __init__(self, index: SplitIndex, data: DataConfig, aug: AugConfig, *, resolution: int, crop_pct: float,
                 start: int, stop: int, num_batches: int, batch_size: int):
        super().__init__()
        self.index, self.data, self.aug = index, data, aug
        self.resolution, self.crop_pct = resolution, crop_pct
        self.start, self.stop, self.num_batches, self.batch_size = start, stop, num_batches, batch_size

    def _samples(self, lo: int, hi: int) -> Iterator[dict[str, Any]]:
        """Raw samples with global indices ``[lo, hi)``, opening only the shards that hold them."""
        if hi <= lo:
            return
        offsets = self.index.shard_offsets()
        first = max(i for i in range(len(self.index.urls)) if offsets[i] <= lo)
        last = min(i for i in range(len(self.index.urls)) if offsets[i + 1] >= hi)
        urls = list(self.index.urls[first:last + 1])
        pipeline = wds.DataPipeline(wds.SimpleShardList(urls), tar_samples)
        n = 0
        for sample in itertools.islice(iter(pipeline), lo - offsets[first], hi - offsets[first]):
            n += 1
            yield sample
        if n != hi - lo:
            raise RuntimeError(f"shards {urls} hold fewer samples than _info.json's shard_lengths claim")

    def __iter__(self):
        worker, num_workers = _worker()
        b0 = worker * self.num_batches // num_workers
        b1 = (worker + 1) * self.num_batches // num_workers
        bs = self.batch_size
        lo, hi = min(self.start + b0 * bs, self.stop), min(self.start + b1 * bs, self.stop)
        transform = eval_transform(self.aug, self.resolution, self.crop_pct)
        draft = eval_scale_size(self.resolution, self.crop_pct) if self.data.jpeg_draft else None
        samples = self._samples(lo, hi)
        for _ in range(b0, b1):
            images, labels, keys = _decode_batch(samples, bs, lambda jpg: transform(decode_image(jpg, draft)))
            if not images:
                images = [torch.zeros((3, self.resolution, self.resolution), dtype=torch.uint8)]
                labels, keys = [-1], [""]
            yield _collate(images, labels, keys)


class WdsEvalLoader(EvalLoader):
    format = "wds"

    def __init__(self, index: SplitIndex, data: DataConfig, aug: AugConfig, *, resolution: int, crop_pct: float,
                 rank: int, world_size: int, device=None):
        super().__init__(data, aug, resolution=resolution, crop_pct=crop_pct, rank=rank, world_size=world_size,
                         num_samples=index.num_samples, device=device)
        self.index = index
        self.dataset = _EvalStream(index, data, aug, resolution=self.resolution, crop_pct=self.crop_pct,
                                   start=self.start, stop=self.stop, num_batches=len(self),
                                   batch_size=self.batch_size)
        nw = min(data.num_workers, len(self))
        self.dataloader = DataLoader(self.dataset, batch_size=None, num_workers=nw,
                                     prefetch_factor=data.prefetch_factor if nw > 0 else None,
                                     pin_memory=pin_batches(data, self.device),
                                     generator=torch.Generator().manual_seed(0))

    def _iter_raw(self):
        for images, labels, keys in self.dataloader:
            yield self._pad(images, labels, keys)


_HEADER_BYTES = 16 << 10
_SCANNED: dict[tuple, tuple] = {}


def _image_size(f, offset: int, size: int, url: str, name: str) -> tuple[int, int]:
    """(width, height) from the start of an image member; the whole member only if its header is longer."""
    from PIL import Image

    for n in (min(size, _HEADER_BYTES), size):
        f.seek(offset)
        try:
            return Image.open(io.BytesIO(f.read(n))).size
        except Exception:   # noqa: BLE001 - header cut off: retry with the whole member; a bad image fails below
            if n == size:
                raise TarFormatError(f"{url}: {name} is not a readable image") from None
    raise AssertionError("unreachable")


def scan_split(index: SplitIndex) -> tuple:
    """(keys, labels, sizes (w, h), shard ids, byte offsets, byte lengths) of every sample of the split, in
    global index order, from the tar headers and image headers only (see the module docstring)."""
    cache_key = tuple((u, os.stat(u).st_mtime_ns, os.stat(u).st_size) for u in index.urls)
    if cache_key in _SCANNED:
        return _SCANNED[cache_key]
    keys, labels, sizes, shard, offset, length = [], [], [], [], [], []
    for s_id, (url, expected) in enumerate(zip(index.urls, index.shard_lengths)):
        samples: dict[str, dict] = {}
        with open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                if not m.isfile() or _META.match(m.name) or not (match := _KEY_EXT.match(m.name)):
                    continue
                samples.setdefault(match.group(1), {})[match.group(2).lower()] = (m.offset_data, m.size, m.name)
            if len(samples) != expected:
                raise RuntimeError(f"{url} holds {len(samples)} samples, _info.json's shard_lengths claim {expected}")
            for key, members in samples.items():   # insertion order = tar order = global index order
                if "jpg" not in members or "cls" not in members:
                    raise TarFormatError(f"{url}: sample {key!r} lacks a jpg or cls member")
                off, n, name = members["jpg"]
                c_off, c_n, _ = members["cls"]
                f.seek(c_off)
                keys.append(key)
                labels.append(int(f.read(c_n)))
                sizes.append(_image_size(f, off, n, url, name))
                shard.append(s_id)
                offset.append(off)
                length.append(n)
    out = (keys, labels, sizes, shard, offset, length)
    _SCANNED[cache_key] = out
    return out


class WdsNativeSource:
    """Random access to the images of a WebDataset split for native evaluation (see the module docstring)."""

    def __init__(self, index: SplitIndex):
        self.urls = list(index.urls)
        self.keys, self.labels, self.sizes, self.shard, self.offset, self.length = scan_split(index)
        self._fds: dict[int, int] = {}
        self._pid = -1

    def __getstate__(self):
        return dict(self.__dict__, _fds={}, _pid=-1)   # descriptors are per process

    def image(self, index: int, draft_size: int | None):
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        s = self.shard[index]
        if s not in self._fds:
            self._fds[s] = os.open(self.urls[s], os.O_RDONLY)
        data = os.pread(self._fds[s], self.length[index], self.offset[index])
        return decode_image(data, draft_size)

    def __del__(self):
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)


class WdsNativeEvalLoader(NativeEvalLoader):
    format = "wds"

    def __init__(self, index: SplitIndex, data: DataConfig, aug: AugConfig, *, resolution: int, rank: int,
                 world_size: int, patch_size: int = 16, max_aspect: float = 2.0, device=None):
        check_native(resolution, patch_size, max_aspect)   # before any shard is read
        self.index = index
        super().__init__(data, aug, WdsNativeSource(index), resolution=resolution, rank=rank,
                         world_size=world_size, patch_size=patch_size, max_aspect=max_aspect, device=device)


__all__ = ["WdsEvalLoader", "WdsNativeEvalLoader", "WdsNativeSource", "WdsTrainLoader", "pin_batches",
           "repeat_each", "stream_shards"]
