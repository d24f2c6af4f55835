"""Per-sample transforms: crop-aware reduced-scale JPEG decoding and the Pillow-safe RandAugment posterize."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import AugConfig
from pipeline.data.transforms import (DraftRandomResizedCrop, decode_image, decode_jpeg_crop, open_image,
                                      train_transform, train_transform_from_bytes)

CROP_ONLY = AugConfig(auto_augment=None, hflip=0.0)


def _jpeg(w: int, h: int, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """A smooth gradient picture (JPEG-friendly, so DCT downscaling is close to a real resize)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([255 * x / w, 255 * y / h, 127 + 100 * np.sin(x / 37 + y / 53)], -1).astype(np.uint8)
    img = Image.fromarray(rgb).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _seeded_call(fn, arg, seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    out = fn(arg)
    return out, random.random()   # the next draw shows how much of the RNG stream the call consumed


@pytest.mark.parametrize("crop, out, expect", [((800, 600), (128, 128), 4), ((300, 300), (128, 128), 2),
                                               ((255, 600), (128, 128), 1), ((100, 90), (224, 224), 1),
                                               ((2000, 1800), (224, 224), 8)])
def test_dct_scale_keeps_the_crop_at_least_output_size(crop, out, expect):
    s = DraftRandomResizedCrop.dct_scale(*crop, *out)
    assert s == expect
    assert crop[0] // s >= out[0] or s == 1


@pytest.fixture
def decode_calls(monkeypatch):
    """Records the (crop box, DCT scale) of every OpenCV crop decode (the real function still runs)."""
    import pipeline.data.transforms as T

    calls, real = [], T.decode_jpeg_crop

    def recording(data, size, box, s=1):
        calls.append((box, s))
        return real(data, size, box, s)

    monkeypatch.setattr(T, "decode_jpeg_crop", recording)
    return calls


def _seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.mark.parametrize("res", [64, 160])
def test_same_boxes_and_rng_as_timm_and_close_pixels(res, decode_calls):
    """Same RNG consumption as timm's RandomResizedCrop, and nearly the same picture; big crops decode at a
    reduced DCT scale, small crops at full size."""
    data = _jpeg(640, 480)
    ref_tf, ours_tf = train_transform(CROP_ONLY, res), train_transform_from_bytes(CROP_ONLY, res)
    for seed in range(40):
        _seed_all(seed)
        ref, ref_next = _seeded_call(ref_tf, decode_image(data), seed)
        ours, ours_next = _seeded_call(ours_tf, data, seed)
        assert ours_next == ref_next
        assert ours.shape == ref.shape == (3, res, res) and ours.dtype == torch.uint8
        diff = (ours.float() - ref.float()).abs().mean().item()
        assert diff < 6, (seed, diff)
    assert len(decode_calls) == 40
    scales = [s for _, s in decode_calls]
    assert sum(s > 1 for s in scales) > 10      # large crops: decoded at 1/2 .. 1/8
    assert res == 64 or 1 in scales             # at 160 px crops under 320 px exist: decoded at full size
    for (i, j, h, w), s in decode_calls:        # never upsampled from a reduced decode
        assert w / s >= res and h / s >= res or s == 1


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "random"])
def test_full_size_crops_match_timm_within_rounding(interpolation):
    """Where no reduction applies (output >= crop / 2), the crop box is exact, so the only difference from
    timm's PIL path is the resize kernel: torchvision's uint8 antialiased filters vs PIL's (<= 1 level)."""
    data = _jpeg(300, 260)
    aug = AugConfig(auto_augment=None, hflip=0.0, color_jitter=0.0, train_interpolation=interpolation)
    ref_tf, ours_tf = train_transform(aug, 224), train_transform_from_bytes(aug, 224)
    for seed in range(10):
        ref, _ = _seeded_call(ref_tf, decode_image(data), seed)
        ours, _ = _seeded_call(ours_tf, data, seed)
        assert (ours.int() - ref.int()).abs().max().item() <= 2, seed


@pytest.mark.parametrize("s", [1, 2, 4, 8])
def test_decode_jpeg_crop_has_pils_pixels(s):
    """OpenCV's reduced decode gives exactly PIL's draft-decode pixels; the box is mapped to the reduced grid."""
    data = _jpeg(803, 611)
    img = Image.open(io.BytesIO(data))
    if s > 1:
        img.draft("RGB", (803 // s, 611 // s))
    full = np.asarray(img.convert("RGB"))
    box = (100, 200, 400, 480)   # top, left, height, width in full-size pixels
    crop = decode_jpeg_crop(data, (803, 611), box, s)
    y0, x0 = round(100 * full.shape[0] / 611), round(200 * full.shape[1] / 803)
    assert crop.shape == (round(500 * full.shape[0] / 611) - y0, round(680 * full.shape[1] / 803) - x0, 3)
    assert abs(crop.shape[0] - 400 / s) <= 1 and abs(crop.shape[1] - 480 / s) <= 1
    assert np.array_equal(crop, full[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]])


def test_exif_orientation_is_ignored_like_pil():
    """OpenCV rotates by EXIF orientation by default; PIL (and so timm/torchvision) does not."""
    rgb = np.asarray(Image.open(io.BytesIO(_jpeg(300, 200))).convert("RGB"))
    exif = Image.Exif()
    exif[0x0112] = 6   # "rotate 90 CW" on display
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, exif=exif)
    crop = decode_jpeg_crop(buf.getvalue(), (300, 200), (0, 0, 200, 300))
    assert crop.shape == (200, 300, 3)
    assert np.array_equal(crop, np.asarray(decode_image(buf.getvalue())))


def test_no_draft_decodes_full_size(decode_calls):
    data = _jpeg(1600, 1200)
    tf = train_transform_from_bytes(CROP_ONLY, 160, draft=False)
    for seed in range(10):
        _seed_all(seed)
        assert tf(data).shape == (3, 160, 160)
    assert [s for _, s in decode_calls] == [1] * 10


@pytest.mark.parametrize("mode, fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("P", "PNG")])
def test_other_modes_and_formats_come_out_rgb_like_timm(mode, fmt, decode_calls):
    """Grayscale JPEGs take the OpenCV path (3 equal channels, as PIL's convert), the rest PIL's."""
    data = _jpeg(500, 400, mode, fmt)
    ref_tf, ours_tf = train_transform(CROP_ONLY, 96), train_transform_from_bytes(CROP_ONLY, 96)
    for arg in (data, open_image(data)):      # bytes, or an already opened image
        ours, _ = _seeded_call(ours_tf, arg, 3)
        ref, _ = _seeded_call(ref_tf, decode_image(data), 3)
        assert ours.shape == (3, 96, 96) and ours.dtype == torch.uint8
        assert (ours.float() - ref.float()).abs().mean().item() < 6
    assert len(decode_calls) == (1 if (mode, fmt) == ("L", "JPEG") else 0)
    out = train_transform_from_bytes(AugConfig(), 96)(data)
    assert out.shape == (3, 96, 96) and out.dtype == torch.uint8


def test_randaugment_posterize_zero_bits_is_pillow_safe():
    """timm's PosterizeIncreasing reaches 0 bits at magnitude 10; Pillow >= 11 raises there. The transform
    uses the historical result (an all-black image) instead of failing a worker mid-epoch."""
    from timm.data.auto_augment import AugmentOp

    img = Image.fromarray(np.full((32, 32, 3), 200, np.uint8))
    raw = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    try:
        raw(img)
        pillow_raises = False
    except ValueError:
        pillow_raises = True
    tf = train_transform(AugConfig(auto_augment="rand-m10-n1-mstd0-inc1"), 32)
    rand_augment = next(t for t in tf.transforms if hasattr(t, "ops"))
    posterize = [op for op in rand_augment.ops if op.name == "PosterizeIncreasing"]
    assert len(posterize) == 1
    posterize[0].prob = 1.0
    out = np.asarray(posterize[0](img))
    assert out.shape == (32, 32, 3) and out.max() == 0
    assert pillow_raises or np.asarray(raw(img)).max() == 0   # same result where Pillow still allows 0 bits
