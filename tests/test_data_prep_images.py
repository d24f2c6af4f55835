"""Image normalisation on real files of every bad kind (no mocks)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from data_prep.demo_dataset import BAD_KINDS, bad_file, render
from data_prep.images import load_rgb_array, prepare_image, probe_image, target_size

EXPECTED = {
    "cmyk": ("converted", "CMYK->RGB"),
    "png_named_jpeg": ("converted", "PNG named .JPEG"),
    "grayscale": ("converted", "grayscale (L)->RGB"),
    "truncated": ("skipped", "truncated"),
    "zero_byte": ("skipped", "zero-byte file"),
    "not_an_image": ("skipped", "not an image"),
}


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_every_bad_kind_is_converted_or_skipped_with_reason(tmp_path, kind):
    rng = np.random.default_rng(0)
    p = tmp_path / f"x_{kind}.JPEG"
    p.write_bytes(bad_file(kind, 2, rng, 40, 30))
    status, reason = EXPECTED[kind]
    r = prepare_image(str(p), max_side=512)
    assert r.status == status and r.reason.startswith(reason)
    pr = probe_image(str(p), max_side=512)
    assert pr.status == status and pr.reason.startswith(reason)
    if status == "converted":
        out = Image.open(io.BytesIO(r.data))
        assert out.format == "JPEG" and out.mode == "RGB" and out.size == (40, 30)
        assert load_rgb_array(str(p), 512).shape == (30, 40, 3)
    else:
        assert r.data is None
        with pytest.raises(Exception):
            load_rgb_array(str(p), 512)


def test_fine_rgb_jpeg_keeps_original_bytes(tmp_path):
    data = _jpeg(render(1, 200, 120, np.random.default_rng(1)))
    p = tmp_path / "ok.JPEG"
    p.write_bytes(data)
    r = prepare_image(str(p), max_side=200)
    assert r.status == "ok" and r.reason is None and r.data == data and r.size == (200, 120)


def test_large_jpeg_is_downscaled_with_draft_close_to_full_decode(tmp_path):
    img = render(3, 1200, 800, np.random.default_rng(2))
    p = tmp_path / "big.JPEG"
    p.write_bytes(_jpeg(img))
    r = prepare_image(str(p), max_side=256, quality=95)
    assert r.status == "converted" and r.reason == "resized 1200x800->256x171"
    out = Image.open(io.BytesIO(r.data))
    assert out.size == (256, 171) == target_size((1200, 800), 256)
    full = np.asarray(Image.open(p).convert("RGB").resize((256, 171), Image.BICUBIC), np.float64)
    draft = np.asarray(out.convert("RGB"), np.float64)
    assert np.abs(full - draft).mean() < 12   # DCT-domain downscale: same picture, small resampling noise
    arr = load_rgb_array(str(p), 300)
    assert max(arr.shape[:2]) == 300 and arr.dtype == np.uint8


def test_other_modes_and_formats(tmp_path):
    rng = np.random.default_rng(3)
    rgba = render(0, 50, 40, rng).convert("RGBA")
    p = tmp_path / "alpha.png"
    rgba.save(p)
    r = prepare_image(str(p), max_side=64)
    assert r.status == "converted" and r.reason == "PNG re-encoded as JPEG, RGBA->RGB"
    assert Image.open(io.BytesIO(r.data)).mode == "RGB"
    pal = tmp_path / "pal.gif"
    render(1, 30, 30, rng).convert("P").save(pal)
    assert prepare_image(str(pal), 64).status == "converted"
    # a truncated PNG and a JPEG with garbage after its header are skipped, not fatal
    png = (tmp_path / "alpha.png").read_bytes()
    (tmp_path / "t.png").write_bytes(png[: len(png) // 2])
    assert prepare_image(str(tmp_path / "t.png"), 64).status == "skipped"
    good = _jpeg(render(2, 64, 64, rng))
    (tmp_path / "g.JPEG").write_bytes(good[:200] + b"\x00" * 50)
    assert prepare_image(str(tmp_path / "g.JPEG"), 64).status == "skipped"
    assert prepare_image(str(tmp_path / "missing.JPEG"), 64).status == "skipped"
