"""Per-sample transforms (timm's DeiT recipe) and the batch normaliser (FFCV's: :mod:`pipeline.data.ffcv_pipelines`).

Per sample, loaders only crop/flip/augment and hand back ``uint8`` pixels (timm's "prefetcher" mode:
``create_transform(..., use_prefetcher=True)``); normalisation to float/bfloat16, random erasing and Mixup/CutMix
run once on the whole batch (:class:`BatchNormalizer`, :mod:`pipeline.data.mixup`). This keeps worker->trainer
transfers 4x smaller and lets the batch ops run on the training device.

JPEGs are decoded at reduced scale when the image is much larger than needed: libjpeg skips DCT coefficients
(scale 1/2, 1/4, 1/8) while keeping both sides >= the requested size (PIL's ``draft`` mode, OpenCV's
``IMREAD_REDUCED_*``: the same pixels). For training, :class:`DraftRandomResizedCrop` draws the RandomResizedCrop
box from the JPEG header first and picks the largest DCT reduction that still leaves the *crop* at least as large
as the output (so a small crop is never upsampled from a reduced decode), then resizes just the crop.
"""
from __future__ import annotations

import io
import math
import random
from typing import Any, Callable

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.auto_augment import AugmentOp, augment_and_mix_transform, auto_augment_transform, rand_augment_transform
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import pil_modes_mapping
from torchvision.transforms.v2.functional import resize

from pipeline.config import AugConfig

# torchvision resizes uint8 tensors with these (antialiased, PIL's filters); BOX/HAMMING stay on PIL
TENSOR_INTERP = frozenset({InterpolationMode.NEAREST, InterpolationMode.BILINEAR, InterpolationMode.BICUBIC,
                            InterpolationMode.LANCZOS})


# ----------------------------------------------------------------------------------------- decoding
def decode_image(data: bytes, draft_size: int | None = None) -> Image.Image:
    """JPEG/PNG bytes -> RGB PIL image; with ``draft_size`` JPEGs decode at the smallest DCT scale whose
    output still covers ``draft_size`` x ``draft_size``."""
    img = Image.open(io.BytesIO(data))
    if draft_size and img.format == "JPEG":
        img.draft("RGB", (draft_size, draft_size))
    if img.mode == "RGB":   # skip convert()'s full copy for the common case
        img.load()
        return img
    return img.convert("RGB")


def open_image(data: bytes) -> Image.Image:
    """Bytes -> PIL image with only the header parsed (decoding happens on first pixel access / ``load()``)."""
    return Image.open(io.BytesIO(data))


def opencv_decodes(header: Image.Image) -> bool:
    """Whether :func:`decode_jpeg_crop` gives the same pixels as PIL for this image (RGB or grayscale JPEG)."""
    return header.format == "JPEG" and header.mode in ("RGB", "L")


def decode_jpeg_crop(data: bytes, size: tuple[int, int], box: tuple[int, int, int, int], s: int = 1) -> np.ndarray:
    """RGB pixels (``(h', w', 3)`` uint8, a view) of ``box`` = (top, left, height, width), given in full-size
    coordinates of the RGB/grayscale JPEG ``data`` of ``size`` = (W, H), decoded at DCT scale 1/``s`` (s in
    1, 2, 4, 8) by OpenCV's libjpeg-turbo: identical pixels to PIL's decode / ``draft`` decode (EXIF orientation
    ignored, as PIL does). The box is rounded to whole pixels of the reduced image."""
    reduce = {1: 0, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
              8: cv2.IMREAD_REDUCED_GRAYSCALE_8}[s]   # (only the DCT-scale bits of these flags)
    flags = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION | reduce
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if pixels is None:
        raise OSError(f"cannot decode JPEG ({len(data)} bytes)")
    hd, wd = pixels.shape[:2]
    sy, sx = size[1] / hd, size[0] / wd   # libjpeg's exact reduction (it rounds the reduced size up)
    i, j, h, w = box
    y0, x0 = min(hd - 1, round(i / sy)), min(wd - 1, round(j / sx))
    y1, x1 = max(y0 + 1, min(hd, round((i + h) / sy))), max(x0 + 1, min(wd, round((j + w) / sx)))
    return pixels[y0:y1, x0:x1]


def resize_u8(pixels: np.ndarray, out_size: tuple[int, int], interp: Any) -> Image.Image:
    """HWC uint8 pixels -> PIL image of ``out_size`` = (h, w), resized by torchvision's antialiased kernel."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)   # (3, h, w) view of HWC memory
    y = resize(x, list(out_size), interpolation=interp, antialias=True)   # (3, H, W), channels-last memory
    return Image.fromarray(y.permute(1, 2, 0).contiguous().numpy())


class DraftRandomResizedCrop:
    """timm's ``RandomResizedCropAndInterpolation`` (same box and interpolation draws, same RNG calls) applied
    to a not-yet-decoded image, decoding only as many pixels as the crop needs.

    Given the encoded bytes of an RGB or grayscale JPEG (what data_prep writes), the box is drawn from the header,
    the JPEG is decoded by OpenCV's libjpeg-turbo at the largest DCT reduction 1/s (s in 8, 4, 2, 1) with
    ``crop_w / s >= out_w`` and ``crop_h / s >= out_h`` (pixels identical to PIL's ``draft`` decode), and the
    crop (box rounded to whole pixels of the reduced image) is resized by torchvision's antialiased uint8 tensor
    kernel (the same filters as PIL's; bilinear/bicubic/lanczos/nearest). With the rest of the DeiT transform,
    25-30 % less CPU per image than timm's transform on a PIL-decoded image (``benchmarks/bench_loaders.py``,
    ``ms/img`` columns); pixels within 1 level of timm's at the 99th percentile where the box needs no rounding
    (``tests/test_loaders_transforms.py``). ``draft=False`` decodes at full size.

    Other inputs (a PIL image, PNG, CMYK JPEG, PIL-only interpolations) take PIL's path: reduced-scale
    ``draft`` decode, then one fused ``Image.resize(box=...)``; non-RGB modes are converted to RGB."""

    def __init__(self, rrc: Any, draft: bool = True):
        self.rrc, self.draft = rrc, draft
        interp = rrc.interpolation if isinstance(rrc.interpolation, (tuple, list)) else (rrc.interpolation,)
        self._resample = {mode: pil_modes_mapping[mode] for mode in interp}

    @staticmethod
    def dct_scale(crop_w: int, crop_h: int, out_w: int, out_h: int) -> int:
        """Largest libjpeg reduction factor that keeps the crop >= the output size."""
        return next((s for s in (8, 4, 2) if crop_w >= s * out_w and crop_h >= s * out_h), 1)

    def __call__(self, img: bytes | Image.Image) -> Image.Image:
        data = img if isinstance(img, (bytes, bytearray, memoryview)) else None
        header = open_image(data) if data is not None else img
        rrc = self.rrc
        i, j, h, w = rrc.get_params(header, rrc.scale, rrc.ratio)   # uses the size only: no decoding yet
        interp = random.choice(rrc.interpolation) if isinstance(rrc.interpolation, (tuple, list)) \
            else rrc.interpolation
        out_h, out_w = rrc.size
        s = self.dct_scale(w, h, out_w, out_h) if self.draft and header.format == "JPEG" else 1
        if data is not None and interp in TENSOR_INTERP and opencv_decodes(header):
            crop = decode_jpeg_crop(data, header.size, (i, j, h, w), s)
            return resize_u8(crop, (out_h, out_w), interp)
        return self.pil_resized_crop(header, (i, j, h, w), s, (out_h, out_w), interp)

    def pil_resized_crop(self, img: Image.Image, box: tuple[int, int, int, int], s: int,
                         out_size: tuple[int, int], interp: Any) -> Image.Image:
        i, j, h, w = box
        scale = 1.0
        if s > 1:
            full_w = img.size[0]
            drafted = img.draft("RGB", (max(1, img.size[0] // s), max(1, img.size[1] // s)))
            if drafted is not None:   # (mode, (0, 0, W / scale, H / scale)): libjpeg's exact factor
                scale = full_w / drafted[1][2]
        pil_box = (j / scale, i / scale, min((j + w) / scale, img.size[0]), min((i + h) / scale, img.size[1]))
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        out = img.resize((out_size[1], out_size[0]), self._resample[interp], box=pil_box)
        return out if out.mode == "RGB" else out.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.rrc!r}, draft={self.draft})"


def eval_scale_size(resolution: int, crop_pct: float) -> int:
    """Shorter-side size before the center crop (timm's rule)."""
    return int(math.floor(resolution / crop_pct))


# ----------------------------------------------------------------------------------------- timm transforms
def train_transform(aug: AugConfig, resolution: int,
                    shape: tuple[int, int] | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """RandomResizedCrop + flip + RandAugment (DeiT) -> uint8 CHW tensor (normalisation happens per batch).
    ``shape`` (H, W): an aspect bucket -- the crop takes its aspect ratio and is resized to it, undistorted."""
    ratio = tuple(aug.ratio) if shape is None else (shape[1] / shape[0],) * 2
    tf = create_transform(
        input_size=resolution if shape is None else (3, *shape),
        is_training=True,
        scale=tuple(aug.scale),
        ratio=ratio,
        hflip=aug.hflip,
        vflip=0.0,
        color_jitter=aug.color_jitter if aug.color_jitter > 0 else None,
        auto_augment=aug.auto_augment or None,
        interpolation=aug.train_interpolation,
        mean=tuple(aug.mean),
        std=tuple(aug.std),
        re_prob=0.0,
        use_prefetcher=True,
    )
    for t in getattr(tf, "transforms", []):
        _pillow_safe_posterize(t)
    return tf


def train_transform_from_bytes(aug: AugConfig, resolution: int, draft: bool = True,
                               shape: tuple[int, int] | None = None) -> Callable[[bytes], torch.Tensor]:
    """:func:`train_transform` for encoded image bytes: its RandomResizedCrop becomes
    :class:`DraftRandomResizedCrop`, which decodes only at the scale the crop needs (``draft``). Same augmentation
    distribution and RNG consumption as :func:`train_transform` on the decoded image."""
    tf = train_transform(aug, resolution, shape)
    first = tf.transforms[0]
    if not isinstance(first, RandomResizedCropAndInterpolation):
        raise TypeError(f"expected timm's RandomResizedCropAndInterpolation first, got {first!r}")
    tf.transforms[0] = DraftRandomResizedCrop(first, draft=draft)
    return tf


def _posterize(img: Image.Image, bits_to_keep: int, **__) -> Image.Image:
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:   # what Pillow < 11 returned for 0 bits (it now raises ValueError)
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _pillow_safe_posterize(augment: Any) -> Any:
    """timm's ``PosterizeIncreasing`` asks for 0 bits at magnitude 10, which ``m9-mstd0.5`` reaches ~2% of the
    time; Pillow >= 11 rejects that. Point timm's posterize ops at a version with the historical result."""
    ops = getattr(augment, "ops", None) or [op for sub in getattr(augment, "policy", []) for op in sub]
    for op in ops:
        if isinstance(op, AugmentOp) and op.name.startswith("Posterize"):
            op.aug_fn = _posterize
    return augment


def timm_auto_augment(spec: str, hparams: dict) -> Callable[[Image.Image], Image.Image]:
    """timm's RandAugment / AugMix / AutoAugment from its spec string (Pillow-safe posterize)."""
    if spec.startswith("rand"):
        return _pillow_safe_posterize(rand_augment_transform(spec, hparams))
    if spec.startswith("augmix"):
        return _pillow_safe_posterize(augment_and_mix_transform(spec, dict(hparams, translate_pct=0.3)))
    return _pillow_safe_posterize(auto_augment_transform(spec, hparams))


def eval_transform(aug: AugConfig, resolution: int,
                   crop_pct: float | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the shorter side to ``resolution / crop_pct``, center-crop ``resolution`` -> uint8 CHW tensor."""
    return create_transform(
        input_size=resolution,
        is_training=False,
        crop_pct=crop_pct or aug.crop_pct,
        interpolation=aug.eval_interpolation,
        mean=tuple(aug.mean),
        std=tuple(aug.std),
        use_prefetcher=True,
    )


class NativeResize:
    """Native-aspect evaluation: the whole RGB image resized to ``shape`` = (H, W) (its aspect bucket, see
    :mod:`pipeline.data.aspect_buckets`) with ``interpolation`` -> uint8 HWC array. PIL's antialiased resize, the
    same filter timm's center-crop transform resizes with, so the two modes differ only by the crop. A class,
    not a closure: DataLoader workers started by spawn/forkserver pickle it."""

    def __init__(self, interpolation: str = "bicubic"):
        self.interpolation = interpolation
        self.resample = str_to_pil_interp(interpolation)

    def __call__(self, img: Image.Image, shape: tuple[int, int]) -> np.ndarray:
        h, w = shape
        if img.mode != "RGB":
            img = img.convert("RGB")
        if img.size != (w, h):
            img = img.resize((w, h), self.resample)
        return np.asarray(img, dtype=np.uint8)


def native_eval_transform(aug: AugConfig) -> NativeResize:
    """:class:`NativeResize` with ``aug.eval_interpolation``."""
    return NativeResize(aug.eval_interpolation)


# ----------------------------------------------------------------------------------------- batch normalise
class BatchNormalizer:
    """uint8 (B, 3, H, W) (any memory layout) -> normalised float32 or bfloat16, NCHW or channels-last."""

    def __init__(self, mean, std, dtype: str = "float32", channels_last: bool = False,
                 device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.scale = (1.0 / std).to(self.device)
        self.shift = (-mean / std).to(self.device)
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True)
        if x.is_floating_point():   # already normalised upstream (FFCV's compiled pipeline on CPU)
            return x.to(dtype=torch.float32, memory_format=self.memory_format)
        x = x.to(dtype=torch.float32, memory_format=self.memory_format)
        return x.mul_(self.scale).add_(self.shift)

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        """Final dtype cast (after random erasing / mixup, which run in float32)."""
        return images if images.dtype == self.dtype else images.to(self.dtype)


__all__ = ["BatchNormalizer", "DraftRandomResizedCrop", "TENSOR_INTERP", "decode_image", "decode_jpeg_crop",
           "eval_scale_size", "eval_transform", "NativeResize", "native_eval_transform", "open_image",
           "opencv_decodes", "resize_u8", "timm_auto_augment", "train_transform", "train_transform_from_bytes"]
