"""WebDataset back end: tar shards from data_prep (``OUT/wds``), read with webdataset's pipeline stages.

Training (canonical streams: the epoch does not depend on the world size or the worker count)
    The epoch is one global sample sequence, positions ``p = 0, 1, ...``, made of ``V = data.canonical_streams``
    *streams*; position ``p`` is sample ``p // V`` of stream ``p % V``. Each stream is a pure function of
    (seed, epoch, stream, V, the shards):

    * every epoch the shard list is shuffled with ``(seed, epoch)`` and the shuffled shards, concatenated,
      are cut into ``V`` contiguous segments, stream ``v`` getting the ``ceil((N - v) / V)`` samples that its
      positions need (``/ aug.repeats`` with repeated augmentation) -- so a ``drop_last`` epoch reads every
      sample at most once, and exactly once when the global batch divides ``N``; a stream skips into its first
      shard (read, not decoded: about one shard per stream per epoch);
    * tar members -> samples (:func:`pipeline.data.tar_samples.tar_samples`, webdataset's sample format from a
      leaner header reader) -> [``aug.repeats`` copies of each sample: DeiT's repeated augmentation]
      -> ``wds.shuffle`` (a ``data.shuffle_buffer`` buffer per stream, seeded by the stream) -> decode/augment,
      each sample under a seed derived from its global position ``p`` alone.

    Rank ``r`` of ``R`` takes positions ``r, r + R, r + 2R, ...`` (so ``R`` must divide ``V``: a one-line
    ConfigError otherwise) and cuts them into batches of ``batch_size``: its streams are ``v = r + R*j``,
    ``j < S = V/R``, and its ``q``-th sample is sample ``q // S`` of stream ``j = q % S``. A global step of
    ``G = batch x accumulation x R`` samples therefore consumes positions ``[kG, (k+1)G)``: the same samples, with
    the same per-sample augmentation, at any world size and micro-batch/accumulation split of the same ``G``;
    the data position is the global sample index ``kG`` (:mod:`pipeline.resume`).

    DataLoader workers split a rank's streams into ``min(num_workers, S)`` contiguous blocks; for every batch
    each worker ships the samples of its block (ordered by stream, then position) and the trainer's process
    concatenates the blocks in worker order, which is that same order: the batch does not depend on the
    worker count either. Memory: ``V x data.shuffle_buffer`` still-encoded samples over the whole job.

    ``skip_batches=k`` drops the first ``k`` batches of the epoch *before decoding*: every stream discards the
    raw (still-encoded, shuffled) samples of the positions below ``k * batch_size * R``.

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

import dataclasses
import functools
import io
import itertools
import os
import random
import tarfile
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import AugConfig, ConfigError, DataConfig
from pipeline.data.aspect_buckets import check_native, train_bucket, train_bucket_shapes
from pipeline.data.base import EvalLoader, NativeEvalLoader, TrainLoader
from pipeline.data.device_decode import CropDrawer, EncodedBatch, decode_resized_crops
from pipeline.rng import make_seed, seeded
from pipeline.schedules import with_magnitude
from pipeline.data.shard_index import SplitIndex
from pipeline.data.tar_samples import KEY_EXT, META_NAME, TarFormatError, tar_samples
from pipeline.data.transforms import decode_image, eval_scale_size, eval_transform, train_transform_from_bytes


def pin_batches(data: DataConfig, device: torch.device, encoded: bool = False) -> bool:
    """Whether the DataLoader pins its batches: ``data.pin_memory`` with a CUDA device (uint8 batches then cross
    with ``non_blocking=True`` copies). ``encoded`` batches (device decoding) keep the JPEG bytes on the host
    (nvJPEG reads host memory) and are not pinned."""
    return bool(data.pin_memory) and device.type == "cuda" and not encoded


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _collate(images: list[torch.Tensor], labels: list[int], keys: list[str], shape: tuple[int, int] = (0, 0)):
    """uint8 CHW images (views of HWC pixels, as timm's MaybePILToTensor returns them) -> (B, 3, H, W) batch.

    Stacked as HWC, so each image is one contiguous copy (``torch.stack`` of the permuted views is a strided
    gather, ~5x slower); the batch is NCHW with channels-last memory, which the batch normaliser turns into
    the requested layout in the pass it makes anyway. An empty part of a batch (a worker whose streams have no
    position in it) is an empty ``(0, 3, H, W)`` batch of the batch's ``shape``."""
    if not images:
        return torch.empty((0, 3, *shape), dtype=torch.uint8), torch.empty(0, dtype=torch.int64), keys
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
def stream_counts(num_positions: int, num_streams: int) -> list[int]:
    """Positions ``p < num_positions`` of each stream (``p % num_streams == v``)."""
    return [max(0, -(-(num_positions - v) // num_streams)) for v in range(num_streams)]


def segment_samples(urls: list[str], lengths: list[int], start: int, count: int) -> Iterator[dict]:
    """Samples ``[start, start + count)`` of the concatenation of ``urls`` (``lengths``: their sample counts)."""
    offset = 0
    for url, n in zip(urls, lengths):
        if count <= 0:
            return
        if offset + n <= start:
            offset += n
            continue
        for sample in itertools.islice(tar_samples([{"url": url}]), max(0, start - offset), None):
            if count <= 0:
                return
            yield sample
            count -= 1
        offset += n
    if count > 0:
        raise RuntimeError(f"WebDataset shards hold fewer samples than _info.json's shard_lengths claim "
                           f"({count} missing in the segment at {start})")


def canonical_stream(index: SplitIndex, data: DataConfig, aug: AugConfig, *, seed: int, epoch: int,
                     stream: int) -> Iterator[dict[str, Any]]:
    """The still-encoded, shuffled samples of canonical ``stream`` in ``epoch`` (see the module docstring)."""
    num_streams = data.canonical_streams
    order = list(range(len(index.urls)))
    random.Random(make_seed(seed, epoch, 0x5A4D)).shuffle(order)
    urls = [index.urls[i] for i in order]
    lengths = [index.shard_lengths[i] for i in order]
    raw = [-(-c // aug.repeats) for c in stream_counts(index.num_samples, num_streams)]
    samples: Iterator[dict] = segment_samples(urls, lengths, sum(raw[:stream]), raw[stream])
    if aug.repeats > 1:
        samples = repeat_each(aug.repeats)(samples)
    rng = random.Random(make_seed(seed, epoch, stream, num_streams, 0x5F))
    return iter(wds.shuffle(data.shuffle_buffer, initial=data.shuffle_initial, rng=rng)(samples))


def repeat_each(k: int):
    """Pipeline stage for DeiT's repeated augmentation on a stream: every (still-encoded) sample ``k`` times in
    a row, before the shuffle buffer spreads the copies; each copy is augmented independently."""
    def stage(samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            for _ in range(k):
                yield sample
    return stage


def worker_blocks(num_streams: int, num_workers: int) -> list[range]:
    """The rank-local streams ``j`` each worker reads: contiguous blocks, sizes differing by <= 1."""
    return [range(w * num_streams // num_workers, (w + 1) * num_streams // num_workers) for w in range(num_workers)]


class _TrainStream(IterableDataset):
    """Yields, for every batch of this rank's configured epoch, this worker's part of it (see module docstring).

    The epoch's settings live in a shared-memory tensor, so the DataLoader's persistent workers (forked once,
    at the first epoch) see each :meth:`configure` made in the trainer's process before the next iteration."""

    def __init__(self, index: SplitIndex, data: DataConfig, aug: AugConfig, *, rank: int, world_size: int,
                 seed: int, num_parts: int):
        super().__init__()
        self.index, self.data, self.aug = index, data, aug
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.streams_per_rank = data.canonical_streams // world_size
        self.blocks = worker_blocks(self.streams_per_rank, num_parts)
        # epoch, resolution, batch size, batches in the epoch, batches to skip, batches per optimizer step,
        # RandAugment magnitude (-1: aug.auto_augment as it is)
        self.settings = torch.tensor([0, 224, 1, 0, 0, 1, -1], dtype=torch.int64).share_memory_()

    def configure(self, *, epoch: int, resolution: int, batch_size: int, num_batches: int, skip: int,
                  accum: int = 1, magnitude: int | None = None) -> None:
        self.settings.copy_(torch.tensor([epoch, resolution, batch_size, num_batches, skip, accum,
                                          -1 if magnitude is None else magnitude], dtype=torch.int64))

    def batch_tools(self, epoch: int, resolution: int, accum: int, magnitude: int = -1):
        """``tools(b)`` -> (per-sample transform, collate) of batch index ``b``: on the CPU path the transform of the
        batch's shape (one aspect bucket per optimizer step, or the square), built once per shape, with the epoch's
        RandAugment ``magnitude`` (-1: the recipe's spec)."""
        aug = self.aug if magnitude < 0 else dataclasses.replace(
            self.aug, auto_augment=with_magnitude(self.aug.auto_augment, magnitude))
        if self.data.decode == "device":   # same draws, bytes shipped: decoded on the trainer's device
            drawer = CropDrawer(aug, resolution, draft=self.data.jpeg_draft)
            device_tools = (drawer, lambda drawn, labels, keys: (
                _pack(drawer, drawn, resolution), torch.tensor(labels, dtype=torch.int64), keys))
            return lambda b: device_tools
        shapes = (train_bucket_shapes(resolution, self.aug.aspect_multiple, tuple(self.aug.ratio))
                  if self.aug.aspect_buckets else None)
        square, built = (resolution, resolution), {}

        def tools(b: int):
            shape = train_bucket(shapes, seed=self.seed, epoch=epoch, step=b // accum) if shapes else square
            if shape not in built:   # when the bucket first comes up
                built[shape] = (train_transform_from_bytes(aug, resolution, draft=self.data.jpeg_draft,
                                                           shape=None if shape == square else shape),
                                functools.partial(_collate, shape=shape))
            return built[shape]
        return tools

    def raw_samples(self, epoch: int, j: int) -> Iterator[dict[str, Any]]:
        """The still-encoded sample stream of this rank's ``j``-th canonical stream (shuffled, before skipping)."""
        return canonical_stream(self.index, self.data, self.aug, seed=self.seed, epoch=epoch,
                                stream=self.rank + self.world_size * j)

    def __iter__(self):
        worker, _ = _worker()
        epoch, res, bs, num_batches, skip, accum, magnitude = self.settings.tolist()
        S, R = self.streams_per_rank, self.world_size
        block = self.blocks[worker]
        streams = {}
        for j in block:   # skipped positions: read, never decoded
            raw = self.raw_samples(epoch, j)
            streams[j] = itertools.islice(raw, len(range(j, skip * bs, S)), None)
        tools = self.batch_tools(epoch, res, accum, magnitude)
        for b in range(skip, num_batches):
            transform, collate = tools(b)
            images, labels, keys = [], [], []
            with seeded(0):   # the caller's generators stay untouched; every sample is reseeded below
                for j in block:   # this worker's positions of batch b, by stream then position
                    for q in range(b * bs + (j - b * bs) % S, (b + 1) * bs, S):
                        sample = next(streams[j], None)
                        if sample is None:
                            raise RuntimeError(f"WebDataset stream {self.rank + R * j} ran dry at batch {b} "
                                               f"(empty shards?)")
                        _reseed(make_seed(self.seed, epoch, self.rank + R * q))   # by global position
                        images.append(transform(sample["jpg"]))
                        labels.append(int(sample["cls"]))
                        keys.append(sample["__key__"])
            yield collate(images, labels, keys)


def _reseed(seed: int) -> None:
    """Seed the generators the per-sample transforms draw from (inside a ``seeded`` block)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)


def _pack(drawer: CropDrawer, drawn: list, res: int) -> EncodedBatch:
    if drawn:
        return drawer.pack(drawn)
    e = torch.empty
    return EncodedBatch(jpeg=e(0, dtype=torch.uint8), lengths=e(0, dtype=torch.int64),
                        boxes=e((0, 4), dtype=torch.int64), interp=e(0, dtype=torch.int8),
                        flips=e(0, dtype=torch.bool),
                        jitter_order=e((0, 4 if drawer.jitter is not None else 0), dtype=torch.int8),
                        jitter=e((0, 3), dtype=torch.float32), decoded=e((0, 3, res, res), dtype=torch.uint8),
                        decoded_index=e(0, dtype=torch.int64))


def _merge_encoded(parts: list[EncodedBatch]) -> EncodedBatch:
    """Concatenate the workers' parts of one batch (``decoded_index`` re-based to the merged batch)."""
    offsets = itertools.accumulate([0] + [len(p.lengths) for p in parts[:-1]])
    fields = {name: torch.cat([getattr(p, name) for p in parts]) for name in EncodedBatch._fields
              if name != "decoded_index"}
    fields["decoded_index"] = torch.cat([p.decoded_index + o for p, o in zip(parts, offsets)])
    return EncodedBatch(**fields)


def check_canonical_streams(data: DataConfig, world_size: int) -> None:
    """WebDataset training: the world size must divide ``data.canonical_streams`` (one-line ConfigError)."""
    if data.format == "wds" and data.canonical_streams % world_size:
        raise ConfigError(f"data.canonical_streams: {data.canonical_streams} is not divisible by the world size "
                          f"{world_size}; allowed: a multiple of {world_size} (keep the run's value to resume it)")


class WdsTrainLoader(TrainLoader):
    format = "wds"

    def __init__(self, index: SplitIndex, data: DataConfig, aug: AugConfig, *, num_classes: int, rank: int,
                 world_size: int, seed: int, device=None):
        check_canonical_streams(data, world_size)
        super().__init__(data, aug, num_classes=num_classes, rank=rank, world_size=world_size, seed=seed,
                         num_samples=index.num_samples, device=device)
        self.index = index
        nw = min(data.num_workers, data.canonical_streams // world_size)
        self.num_parts = max(1, nw)
        self.dataset = _TrainStream(index, data, aug, rank=rank, world_size=world_size, seed=seed,
                                    num_parts=self.num_parts)
        # workers are forked once and kept across epochs (the epoch's settings reach them through shared
        # memory); their base seed comes from this generator, not from the trainer's global RNG (augmentation
        # is seeded per sample from (seed, epoch, position) anyway)
        self.generator = torch.Generator().manual_seed(make_seed(seed, rank, 0xD1))
        self.pin = pin_batches(data, self.device, data.decode == "device")
        self.dataloader = DataLoader(self.dataset, batch_size=None, num_workers=nw,
                                     prefetch_factor=data.prefetch_factor if nw > 0 else None,
                                     pin_memory=self.pin and self.num_parts == 1,
                                     persistent_workers=nw > 0, generator=self.generator)

    def _configure(self) -> None:
        self.dataset.configure(epoch=self.epoch, resolution=self.resolution, batch_size=self.batch_size,
                               num_batches=len(self), skip=self.skip_batches, accum=self.accum,
                               magnitude=self.magnitude)

    def _parts(self):
        """The workers' parts of each batch, merged: (images or EncodedBatch, labels, keys)."""
        if self.num_parts == 1:
            yield from self.dataloader
            return
        it = iter(self.dataloader)
        while parts := list(itertools.islice(it, self.num_parts)):   # one part per worker, in worker order
            images, labels, keys = zip(*parts)
            keys = [k for ks in keys for k in ks]
            if self.data.decode == "device":
                yield _merge_encoded(list(images)), torch.cat(labels), keys
            else:
                batch = torch.cat(images)
                yield (batch.pin_memory() if self.pin else batch), torch.cat(labels), keys

    def _batches(self):
        """(uint8 images, labels, keys, the device path's EncodedBatch or None) for the configured epoch."""
        for images, labels, keys in self._parts():
            if self.data.decode == "device":
                encoded = images
                images = decode_resized_crops(encoded, (self.resolution, self.resolution), self.device)
                yield images, labels, keys, encoded
            else:
                yield images, labels, keys, None

    def _iter_raw(self):
        for images, labels, _keys, _ in self._batches():
            yield images, labels

    def _iter_raw_keys(self):
        for images, labels, keys, _ in self._batches():
            yield images, labels, keys

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
                if not m.isfile() or META_NAME.match(m.name) or not (match := KEY_EXT.match(m.name)):
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


__all__ = ["WdsEvalLoader", "WdsNativeEvalLoader", "WdsNativeSource", "WdsTrainLoader", "canonical_stream",
           "check_canonical_streams", "pin_batches", "repeat_each", "segment_samples", "stream_counts", "worker_blocks"]
