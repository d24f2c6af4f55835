"""Per-sample transforms: crop-aware reduced-scale JPEG decoding and the Pillow-safe RandAugment posterize."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.config import AugConfig
from pipeline.data.transforms import (DraftRandomResizedCrop, decode_image, open_image, train_transform,
                                      train_transform_from_bytes)

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


@pytest.mark.parametrize("res", [64, 160])
def test_same_boxes_and_rng_as_timm_and_close_pixels(res):
    """Same RNG consumption as timm's RandomResizedCrop, and nearly the same picture; big crops decode at a
    reduced DCT scale (the image object's size shrinks), small crops at full size."""
    data = _jpeg(640, 480)
    ref_tf, ours_tf = train_transform(CROP_ONLY, res), train_transform_from_bytes(CROP_ONLY, res)
    reduced = 0
    for seed in range(40):
        ref, ref_next = _seeded_call(ref_tf, decode_image(data), seed)
        img = open_image(data)
        ours, ours_next = _seeded_call(ours_tf, img, seed)
        assert ours_next == ref_next
        assert ours.shape == ref.shape == (3, res, res) and ours.dtype == torch.uint8
        diff = (ours.float() - ref.float()).abs().mean().item()
        assert diff < 6, (seed, diff)
        reduced += img.size[0] < 640
    assert reduced > 10                     # large crops: decoded at 1/2 .. 1/8
    assert res == 64 or reduced < 40        # at 160 px crops under 320 px exist: decoded at full size


def test_no_draft_decodes_full_size_and_small_crops_are_never_upsampled_from_a_reduced_decode():
    data = _jpeg(1600, 1200)
    tf = train_transform_from_bytes(CROP_ONLY, 160, draft=False)
    img = open_image(data)
    tf(img)
    assert img.size == (1600, 1200)
    rrc = DraftRandomResizedCrop(train_transform(CROP_ONLY, 160).transforms[0])
    for seed in range(30):
        random.seed(seed)
        i, j, h, w = rrc.rrc.get_params(open_image(data), rrc.rrc.scale, rrc.rrc.ratio)
        random.seed(seed)
        img = open_image(data)
        rrc(img)
        s = 1600 / img.size[0]
        assert w / s >= 160 - 1e-6 and h / s >= 160 - 1e-6, (seed, w, h, s)


@pytest.mark.parametrize("mode, fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("P", "PNG")])
def test_other_modes_and_formats_come_out_rgb(mode, fmt):
    out = train_transform_from_bytes(AugConfig(), 96)(open_image(_jpeg(500, 400, mode, fmt)))
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
