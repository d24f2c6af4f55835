"""FFCV pipelines (decoder + operations) for the loaders in :mod:`pipeline.data.ffcv_loader`: the FFCV
counterparts of :mod:`pipeline.data.transforms` (RandomResizedCrop, flip, timm's RandAugment, optional
in-pipeline normalisation; center crop for evaluation; the label pipeline).

This module is FFCV's alone and imports ffcv at the top, keeping torch's thread count
(:func:`pipeline.ffcv_compat.keep_torch_threads`); modules that serve WebDataset too import it lazily.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import numpy as np
from PIL import Image
from timm.data.transforms import str_to_pil_interp

from pipeline.config import AugConfig
from pipeline.data.transforms import timm_auto_augment
from pipeline.ffcv_compat import keep_torch_threads
from pipeline.schedules import with_magnitude

with keep_torch_threads():   # importing ffcv sets torch's intra-op thread count to 1: put it back
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.operation import Operation
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage


class TimmAugment(Operation):
    """An FFCV Operation applying timm's auto-augment (RandAugment) to each uint8 HWC image of the batch.

    FFCV has no RandAugment; this runs timm's PIL implementation outside numba (FFCV allows non-JIT stages).
    The op is resolution-agnostic: timm's translate constant is derived from the image size it receives, so
    changing the decoder's output size between epochs needs no rebuild. :attr:`magnitude` (set by the loader
    per epoch; None: the recipe's spec) is RandAugment's magnitude, read when a batch is augmented (FFCV runs the
    op in this process's threads).
    """

    def __init__(self, aug: AugConfig):
        super().__init__()
        self.aug = aug
        self.mean = tuple(min(255, round(255 * m)) for m in aug.mean)
        self.magnitude: int | None = None
        self._by_size: dict[tuple[int, int | None], Callable] = {}

    def transform_for(self, size: int) -> Callable:
        key = (size, self.magnitude)
        if key not in self._by_size:
            hp: dict[str, Any] = {"translate_const": int(size * 0.45), "img_mean": self.mean}
            if self.aug.train_interpolation != "random":
                hp["interpolation"] = str_to_pil_interp(self.aug.train_interpolation)
            spec = self.aug.auto_augment
            self._by_size[key] = timm_auto_augment(spec if self.magnitude is None
                                                   else with_magnitude(spec, self.magnitude), hp)
        return self._by_size[key]

    def generate_code(self) -> Callable:
        def apply(images, dst):
            tf = self.transform_for(min(images.shape[1], images.shape[2]))
            for i in range(images.shape[0]):
                dst[i] = np.asarray(tf(Image.fromarray(images[i])))
            return dst[: images.shape[0]]

        return apply

    def declare_state_and_memory(self, previous_state):
        return (replace(previous_state, jit_mode=False),
                AllocationQuery(previous_state.shape, previous_state.dtype))


def ffcv_timm_augment_op(aug: AugConfig) -> TimmAugment:
    """The :class:`TimmAugment` op for ``aug.auto_augment``."""
    return TimmAugment(aug)


def ffcv_train_image_pipeline(aug: AugConfig, resolution: int, normalize: bool = False) -> tuple[Any, list]:
    """(decoder, ops): RandomResizedCrop decoder -> flip -> [RandAugment] -> [normalise] -> NCHW (channels-last
    memory) tensor, uint8 or, with ``normalize``, float32 normalised inside FFCV's parallel compiled pipeline
    (``NormalizeImage``: one lookup-table pass per image on FFCV's threads; for CPU training).

    The decoder's ``output_size`` is what the loader changes between epochs (as FFCV's ImageNet example does).
    """
    decoder = RandomResizedCropRGBImageDecoder((resolution, resolution), scale=tuple(aug.scale),
                                               ratio=tuple(aug.ratio))
    ops: list = [decoder]
    if aug.hflip > 0:
        ops.append(RandomHorizontalFlip(aug.hflip))
    if aug.auto_augment:
        ops.append(ffcv_timm_augment_op(aug))
    if normalize:
        ops.append(NormalizeImage(np.array(aug.mean) * 255, np.array(aug.std) * 255, np.float32))
    ops += [ToTensor(), ToTorchImage(channels_last=True)]
    return decoder, ops


def ffcv_eval_image_pipeline(resolution: int, crop_pct: float) -> tuple[Any, list]:
    """Center crop of ``crop_pct`` of the shorter side resized to ``resolution`` (= resize + center crop)."""
    decoder = CenterCropRGBImageDecoder((resolution, resolution), ratio=crop_pct)
    return decoder, [decoder, ToTensor(), ToTorchImage(channels_last=True)]


def ffcv_label_pipeline() -> list:
    return [IntDecoder(), ToTensor(), Squeeze()]


__all__ = ["TimmAugment", "ffcv_eval_image_pipeline", "ffcv_label_pipeline", "ffcv_timm_augment_op",
           "ffcv_train_image_pipeline"]
