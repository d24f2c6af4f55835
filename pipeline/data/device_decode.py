"""JPEG decoding on the training device for WebDataset training (``data.decode: device``).

A GPU node has ~12-16 cores per GPU and CPU JPEG decoding costs ~1.3 ms per ImageNet image, so a small ViT at
224 px (thousands of img/s per GPU) is decode-bound on the CPU. With ``data.decode: device`` the work splits so:

Workers (CPU, :class:`CropDrawer`)
    read the tar samples exactly as the CPU path does (same shard order, shuffle buffer, repeats, per-batch
    ``seeded(make_seed(stream_seed, b))``), parse only the JPEG *header* and make the CPU path's random draws for
    each sample, with the same calls in the same order on the same generators: timm's RandomResizedCrop box
    (``get_params``, Python ``random``), the interpolation (``random.choice`` when ``train_interpolation:
    random``), the flip (``torch.rand(1) < p``, torchvision's ``RandomHorizontalFlip``) and, when
    ``aug.color_jitter > 0``, torchvision's ``ColorJitter.get_params`` (order + factors, torch RNG). They ship
    the still-encoded bytes (one flat uint8 buffer per batch + lengths) with those draws (:class:`EncodedBatch`).
    Samples the device cannot decode identically (PNG, CMYK or grayscale JPEG, a PIL-only interpolation) are
    decoded, cropped and resized in the worker by the CPU path's own code and travel as pixels.

Trainer process (:func:`decode_resized_crops`)
    ``torchvision.io.decode_jpeg(list_of_byte_tensors, device=device)`` (nvJPEG batched decode on CUDA; on a
    CPU device the same call decodes with libjpeg-turbo, which is how the tests run it), then per sample: crop
    the box, antialiased resize in float32 (``F.interpolate(..., antialias=True)``: PIL's bilinear/bicubic
    filters, the family the CPU path's uint8 kernel uses) rounded back to uint8, then the flips and colour
    jitter on the whole batch, and the uint8 batch goes to the usual normaliser, random erasing and Mixup on
    the same device.

So the sample order, boxes, flips and jitter factors are a function of (seed, epoch, rank, batch index) exactly
as on the CPU path, and ``skip_batches`` resumes exactly. Pixels differ slightly from the CPU path: the CPU
path decodes at a reduced DCT scale when the crop allows it (``data.jpeg_draft``) and resizes with torchvision's
fixed-point uint8 kernel; this path decodes at full size and resizes in float. RandAugment / AutoAugment / AugMix
(``aug.auto_augment``) need decoded pixels in the worker and are refused with ``decode: device``.
"""
from __future__ import annotations

import random
import warnings
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import ColorJitter, InterpolationMode, RandomHorizontalFlip

from pipeline.config import ConfigError
from pipeline.data import transforms as T

# interpolation codes shipped per sample; the device resize supports these two (timm's train choices)
INTERP_CODES = (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)
_MODES = ("bilinear", "bicubic")
# ColorJitter op ids in torchvision's order (fn_idx); hue (3) is never set by timm's scalar color_jitter
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3


class EncodedBatch(NamedTuple):
    """One batch as the workers ship it for device decoding (all CPU tensors, B samples)."""
    jpeg: torch.Tensor            # (sum(lengths),) uint8: the device-decoded samples' bytes, back to back
    lengths: torch.Tensor         # (B,) int64: bytes of each sample in ``jpeg``; 0 = decoded in the worker
    boxes: torch.Tensor           # (B, 4) int64: RandomResizedCrop box (top, left, height, width), full-size pixels
    interp: torch.Tensor          # (B,) int8: index into INTERP_CODES (device-decoded samples)
    flips: torch.Tensor           # (B,) bool: horizontal flip
    jitter_order: torch.Tensor    # (B, 4) int8: ColorJitter's fn_idx, or (B, 0) when colour jitter is off
    jitter: torch.Tensor          # (B, 3) float32: brightness, contrast, saturation factors (1 = identity)
    decoded: torch.Tensor         # (K, 3, h, w) uint8: worker-decoded crops (resized, not yet flipped/jittered)
    decoded_index: torch.Tensor   # (K,) int64: their positions in the batch


def _check_timm_transform(tf: Any) -> tuple[Any, Any, Any]:
    """(RandomResizedCrop, flip or None, ColorJitter or None) of timm's train transform; refuse anything else
    (so the device path can never silently drop a per-sample augmentation the CPU path applies)."""
    rrc, *rest = tf.transforms
    if not isinstance(rrc, RandomResizedCropAndInterpolation):
        raise TypeError(f"expected timm's RandomResizedCropAndInterpolation first, got {rrc!r}")
    flip = jitter = None
    for t in rest:
        if isinstance(t, RandomHorizontalFlip):
            flip = t
        elif isinstance(t, ColorJitter):
            if t.hue is not None:
                raise ConfigError("aug.color_jitter: a hue jitter is not supported with data.decode: device")
            jitter = t
        elif not isinstance(t, MaybePILToTensor):
            raise ConfigError(f"data.decode: 'device' cannot apply the per-sample transform {t!r}; "
                              f"use data.decode: cpu")
    return rrc, flip, jitter


class CropDrawer:
    """Worker side: bytes -> the CPU path's per-sample random draws (same calls, same order, same generators).

    Call it on every sample of a batch inside the batch's ``seeded(...)`` block, as the CPU path calls its
    transform; :meth:`pack` turns the batch's results into an :class:`EncodedBatch`."""

    def __init__(self, aug: Any, resolution: int, draft: bool = True):
        rrc, flip, jitter = _check_timm_transform(T.train_transform(aug, resolution))
        self.rrc, self.flip, self.jitter = rrc, flip, jitter
        self.cpu_crop = T.DraftRandomResizedCrop(rrc, draft=draft)
        self.draft = draft
        self.out_size = tuple(rrc.size)   # (h, w)

    def __call__(self, data: bytes) -> tuple:
        header = T.open_image(data)
        rrc = self.rrc
        # the draws of DraftRandomResizedCrop.__call__ (timm's get_params, then the interpolation) ...
        box = rrc.get_params(header, rrc.scale, rrc.ratio)
        interp = random.choice(rrc.interpolation) if isinstance(rrc.interpolation, (tuple, list)) \
            else rrc.interpolation
        # ... then torchvision's RandomHorizontalFlip.forward ...
        flip = bool(torch.rand(1) < self.flip.p) if self.flip is not None else False
        # ... then ColorJitter.forward's get_params
        if self.jitter is not None:
            j = self.jitter
            fn_idx, b, c, s, _h = j.get_params(j.brightness, j.contrast, j.saturation, j.hue)
            order = fn_idx.tolist()
            factors = tuple(1.0 if v is None else v for v in (b, c, s))
        else:
            order, factors = [], (1.0, 1.0, 1.0)
        if header.format == "JPEG" and header.mode == "RGB" and interp in INTERP_CODES:
            return data, box, INTERP_CODES.index(interp), flip, order, factors, None
        return b"", box, 0, flip, order, factors, self._cpu_crop(data, header, box, interp)

    def _cpu_crop(self, data: bytes, header: Any, box: tuple, interp: Any) -> torch.Tensor:
        """The CPU path's resized crop (DraftRandomResizedCrop's pixels for the same draws), (3, h, w) uint8."""
        out_h, out_w = self.out_size
        i, j, h, w = box
        s = self.cpu_crop.dct_scale(w, h, out_w, out_h) if self.draft and header.format == "JPEG" else 1
        if interp in T.TENSOR_INTERP and T.opencv_decodes(header):
            img = T.resize_u8(T.decode_jpeg_crop(data, header.size, box, s), (out_h, out_w), interp)
        else:
            img = self.cpu_crop.pil_resized_crop(header, box, s, (out_h, out_w), interp)
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def pack(self, drawn: list[tuple]) -> EncodedBatch:
        datas, boxes, interps, flips, orders, factors, crops = zip(*drawn)
        n = len(drawn)
        flat = b"".join(datas)
        jpeg = torch.frombuffer(bytearray(flat), dtype=torch.uint8) if flat else torch.empty(0, dtype=torch.uint8)
        k = [i for i, c in enumerate(crops) if c is not None]
        h, w = self.out_size
        return EncodedBatch(
            jpeg=jpeg,
            lengths=torch.tensor([len(d) for d in datas], dtype=torch.int64),
            boxes=torch.tensor(boxes, dtype=torch.int64).view(n, 4),
            interp=torch.tensor(interps, dtype=torch.int8),
            flips=torch.tensor(flips, dtype=torch.bool),
            jitter_order=torch.tensor(orders, dtype=torch.int8).view(n, -1),
            jitter=torch.tensor(factors, dtype=torch.float32).view(n, 3),
            decoded=torch.stack([crops[i] for i in k]) if k else torch.empty((0, 3, h, w), dtype=torch.uint8),
            decoded_index=torch.tensor(k, dtype=torch.int64),
        )


# ----------------------------------------------------------------------------------------- device side
def resize_f32(img: torch.Tensor, out_size: tuple[int, int], mode: str) -> torch.Tensor:
    """(C, h, w) uint8 -> (C, H, W) float32 (unrounded levels), antialiased bilinear/bicubic: PIL's filters, the
    same arithmetic on CPU and CUDA (torch has no uint8 antialiased kernel on CUDA)."""
    return F.interpolate(img[None].float(), size=out_size, mode=mode, align_corners=False, antialias=True)[0]


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) float of uint8 values -> (N, 1, H, W) luma, truncated to whole levels like torchvision's
    ``rgb_to_grayscale`` on uint8."""
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).floor_()


def color_jitter_(images: torch.Tensor, order: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision ``ColorJitter`` (brightness, contrast, saturation; tensor semantics: blend, clamp, truncate
    to uint8 after each op) with per-sample op order ``order`` (B, 4) and ``factors`` (B, 3), vectorised over
    the samples that apply the same op at the same step. In place on the uint8 batch (B, 3, H, W)."""
    if order.numel() == 0:
        return images
    order, factors = order.cpu(), factors.cpu()   # the selections are made on the host: no device syncs
    for step in range(order.shape[1]):
        for op in (_BRIGHTNESS, _CONTRAST, _SATURATION):
            sel_cpu = (order[:, step] == op).nonzero().flatten()
            if sel_cpu.numel() == 0:
                continue
            sel = sel_cpu.to(images.device, non_blocking=True)
            x = images[sel].float()
            f = factors[sel_cpu, op].to(images.device, non_blocking=True).view(-1, 1, 1, 1)
            if op == _BRIGHTNESS:
                ref = torch.zeros_like(x[:, :1])
            elif op == _CONTRAST:
                ref = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
            else:
                ref = _gray(x)
            images[sel] = (f * x + (1.0 - f) * ref).clamp_(0, 255).to(torch.uint8)
    return images


def decode_resized_crops(batch: EncodedBatch, out_size: tuple[int, int],
                         device: torch.device | str) -> torch.Tensor:
    """An :class:`EncodedBatch` -> the augmented uint8 batch ``(B, 3, h, w)`` on ``device``: decode (nvJPEG on
    CUDA), crop each box, antialiased resize, then flips and colour jitter on the whole batch."""
    device = torch.device(device)
    n = batch.lengths.shape[0]
    out = torch.empty((n, 3, *out_size), dtype=torch.float32, device=device)   # rounded to uint8 once, below
    lengths = batch.lengths.tolist()
    on_device = [i for i, k in enumerate(lengths) if k > 0]
    if on_device:
        parts = list(torch.split(batch.jpeg, [lengths[i] for i in on_device]))
        with warnings.catch_warnings():   # torchvision 0.29 deprecates torchvision.io decoding (-> TorchCodec)
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*TorchVision are deprecated")
            images = decode_jpeg(parts, mode=ImageReadMode.RGB, device=device)
        boxes, interp = batch.boxes.tolist(), batch.interp.tolist()
        for i, img in zip(on_device, images):   # crops differ in size: one resize per sample
            top, left, h, w = boxes[i]
            out[i] = resize_f32(img[:, top:top + h, left:left + w], out_size, _MODES[interp[i]])
    if batch.decoded_index.numel():
        out[batch.decoded_index.to(device)] = batch.decoded.to(device, non_blocking=True).float()
    out = out.round_().clamp_(0, 255).to(torch.uint8)
    if bool(batch.flips.any()):
        sel = batch.flips.nonzero().flatten().to(device)
        out[sel] = out[sel].flip(-1)
    return color_jitter_(out, batch.jitter_order, batch.jitter)


__all__ = ["CropDrawer", "EncodedBatch", "INTERP_CODES", "color_jitter_",
           "decode_resized_crops", "resize_f32"]
