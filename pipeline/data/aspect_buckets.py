"""Aspect-ratio buckets: the HxW shapes a PEG model is fed instead of square crops -- the rank-balanced batch
schedule of native-aspect evaluation, and the per-step shapes of aspect-bucketed training.

The shape rule (:func:`native_shape`), for a target resolution ``s`` (a multiple of the patch size ``p``) and an
image of ``w x h`` pixels:

* the short side becomes ``s``;
* the long side becomes ``s * long / short`` rounded to the nearest multiple of ``p``, then clamped to
  ``[s, floor(max_aspect * s / p) * p]`` (default ``max_aspect = 2``: at most twice the short side);
* orientation is kept (a portrait image gets ``H >= W``). The whole image is resized to that shape, never
  cropped: the aspect ratio changes by at most ``p / 2`` pixels of rounding on the long side, except for images
  more elongated than ``max_aspect``, which are squeezed to it.

So the buckets of one resolution are a small fixed set (:func:`bucket_shapes`): ``s x s`` plus, for each long
side ``L`` in ``s + p, s + 2p, ... <= max_aspect * s``, the landscape ``s x L`` and the portrait ``L x s``
(at 224 px with patch 16: 29 shapes).

The schedule (:func:`plan_native_batches`) is a pure function of the per-sample shapes, the batch size, the
rank and the world size, so every rank computes it alone and they agree: shapes in :func:`bucket_shapes`
order; the global members of a bucket (ascending sample index) are split contiguously between the ranks like
the exact center-crop evaluation splits the whole split (``[r*n/R, (r+1)*n/R)``); every rank runs the bucket's
largest share ``ceil(n/R)`` cut into batches of ``bs`` (the last one holds the remainder), a rank with a smaller
share padding its batches (label -1, as in the exact evaluation). Every rank runs the same (shape, batch size)
sequence, every sample is in exactly one batch of one rank, and padding is at most one sample per rank and
bucket (padding every bucket's last batch to full size, as the center-crop loader does for its single last
batch, would forward 67 % padding on the 203-image demo val split at 64 px with 9 buckets). A bucket's batch
holds ``bs = max(1, floor(batch * s^2 / (H * W)))`` images, so no batch has more pixels than a center-crop
batch at ``s``.

Training (``aug.aspect_buckets: true``, :func:`train_bucket_shapes`, :func:`train_bucket`): at resolution ``s``
the buckets are the shapes ``H x W`` with ``W`` a multiple of ``m = aug.aspect_multiple`` (the patch size),
``H = s^2 / W`` rounded to the nearest multiple of ``m`` -- so ``H * W`` is ``s^2`` up to that rounding -- and
``W / H`` inside ``aug.ratio``, RandomResizedCrop's aspect range (224 px, patch 16, DeiT's ``[3/4, 4/3]``:
``192x256, 208x240, 224x224, 240x208, 256x192``). Each optimizer step draws one bucket, uniformly, from
``(seed, epoch, step)`` alone: every rank and micro-batch of the step takes it, at any world size and
accumulation split, and a mid-epoch resume finds the same sequence. Every image of the step is then
RandomResizedCropped with the bucket's aspect ratio (area from ``aug.scale``) and resized to the bucket without
distortion, where the square recipe draws an aspect per image and squeezes it to ``s x s``.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

from pipeline.config import ConfigError
from pipeline.rng import make_seed

DEFAULT_MAX_ASPECT = 2.0


def check_native(resolution: int, patch: int, max_aspect: float, field: str = "resolution") -> None:
    if int(resolution) <= 0 or int(resolution) % patch:
        raise ConfigError(f"{field}: {resolution!r} must be a positive multiple of the patch size {patch} "
                          f"for native-aspect evaluation")
    if not max_aspect >= 1.0:
        raise ConfigError(f"eval.native_max_aspect: {max_aspect!r} must be >= 1")


def max_long_side(resolution: int, patch: int = 16, max_aspect: float = DEFAULT_MAX_ASPECT) -> int:
    return max(resolution, int(math.floor(max_aspect * resolution / patch + 1e-9)) * patch)


def native_shape(width: int, height: int, resolution: int, patch: int = 16,
                 max_aspect: float = DEFAULT_MAX_ASPECT) -> tuple[int, int]:
    """(H, W) of an image of ``width x height`` px evaluated at ``resolution`` (see the module docstring)."""
    short, long = min(width, height), max(width, height)
    lmax = max_long_side(resolution, patch, max_aspect)
    target = int(math.floor(resolution * long / max(short, 1) / patch + 0.5)) * patch
    target = min(max(target, resolution), lmax)
    return (target, resolution) if height > width else (resolution, target)


def bucket_shapes(resolution: int, patch: int = 16, max_aspect: float = DEFAULT_MAX_ASPECT) -> list[tuple[int, int]]:
    """Every (H, W) :func:`native_shape` can return at ``resolution``, in schedule order: square, then by
    increasing long side, landscape before portrait."""
    shapes = [(resolution, resolution)]
    for long in range(resolution + patch, max_long_side(resolution, patch, max_aspect) + 1, patch):
        shapes += [(resolution, long), (long, resolution)]
    return shapes


def bucket_batch_size(batch_size: int, shape: tuple[int, int], resolution: int) -> int:
    """Images per batch of a bucket: at most the pixels of a ``batch_size`` batch of ``resolution^2`` images."""
    return max(1, batch_size * resolution * resolution // (shape[0] * shape[1]))


@dataclass(frozen=True)
class NativeBatch:
    shape: tuple[int, int]       # (H, W)
    indices: tuple[int, ...]     # global sample indices of this rank's real samples (may be empty)
    size: int                    # batch size after padding (the same on every rank)


def plan_native_batches(shapes: Sequence[tuple[int, int]], *, resolution: int, batch_size: int, rank: int,
                        world_size: int, patch: int = 16,
                        max_aspect: float = DEFAULT_MAX_ASPECT) -> list[NativeBatch]:
    """This rank's batches (see the module docstring); ``shapes[i]`` is sample ``i``'s :func:`native_shape`."""
    if not (0 <= rank < world_size):
        raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
    members: dict[tuple[int, int], list[int]] = {}
    for i, shape in enumerate(shapes):
        members.setdefault(tuple(shape), []).append(i)
    order = bucket_shapes(resolution, patch, max_aspect)
    unknown = set(members) - set(order)
    if unknown:
        raise ValueError(f"shapes {sorted(unknown)} are not buckets of {resolution} px")
    plan: list[NativeBatch] = []
    for shape in order:
        idx = members.get(shape, [])
        n = len(idx)
        if n == 0:
            continue
        bs = bucket_batch_size(batch_size, shape, resolution)
        share = math.ceil(n / world_size)          # the largest rank share: what every rank runs
        mine = idx[rank * n // world_size:(rank + 1) * n // world_size]
        for b in range(math.ceil(share / bs)):
            plan.append(NativeBatch(shape, tuple(mine[b * bs:(b + 1) * bs]), min(bs, share - b * bs)))
    return plan


def train_bucket_shapes(resolution: int, multiple: int = 16,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> list[tuple[int, int]]:
    """The training buckets (H, W) at ``resolution`` (see the module docstring), by increasing ``W / H``;
    always includes the square."""
    if int(resolution) <= 0 or int(resolution) % multiple:
        raise ConfigError(f"resolution: {resolution!r} must be a positive multiple of aug.aspect_multiple="
                          f"{multiple} for aspect-bucketed training")
    lo, hi = ratio
    area = resolution * resolution
    shapes = {(resolution, resolution)}
    for w in range(multiple, int(math.sqrt(area * hi)) + 2 * multiple, multiple):
        h = max(multiple, int(math.floor(area / w / multiple + 0.5)) * multiple)
        if lo - 1e-9 <= w / h <= hi + 1e-9:
            shapes.add((h, w))
    return sorted(shapes, key=lambda hw: hw[1] / hw[0])


def train_bucket(shapes: Sequence[tuple[int, int]], *, seed: int, epoch: int, step: int) -> tuple[int, int]:
    """The bucket of optimizer step ``step`` (counted within ``epoch``): a pure function of (seed, epoch, step)."""
    return tuple(shapes[random.Random(make_seed(seed, epoch, step, 0xB0C7)).randrange(len(shapes))])


__all__ = ["DEFAULT_MAX_ASPECT", "NativeBatch", "bucket_batch_size", "bucket_shapes", "check_native",
           "max_long_side", "native_shape", "plan_native_batches", "train_bucket", "train_bucket_shapes"]
