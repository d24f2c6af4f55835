"""Open, validate and normalise one source image.

Outcomes (``Prepared.status``):

* ``"ok"``: an RGB JPEG whose longer side is <= ``max_side``; the original bytes are kept untouched;
* ``"converted"``: readable but not usable as is (CMYK, grayscale/palette/alpha, PNG or other format named
  ``.JPEG``, or longer side > ``max_side``): decoded, converted to RGB, downscaled, re-encoded as JPEG;
  ``reason`` says what was done;
* ``"skipped"``: zero-byte, not an image, truncated or otherwise undecodable; ``reason`` says why.

Large JPEGs are downscaled with PIL's draft mode (libjpeg's DCT-domain 1/2, 1/4, 1/8 scaling), which decodes
far fewer pixels than a full decode followed by a resize; the final resize to the exact target size is done on
the (already small) draft image. Validation of kept JPEGs also decodes in draft mode at the smallest scale:
the entropy decoder still reads the whole file, so truncation is detected at a fraction of the cost.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False   # a truncated file must fail loudly, never be padded with grey


@dataclass
class Prepared:
    status: str                  # "ok" | "converted" | "skipped"
    reason: str | None = None    # what was converted / why it was skipped
    data: bytes | None = None    # JPEG bytes to store (None when skipped)
    size: tuple[int, int] | None = None   # (width, height) of the stored image
    source_size: tuple[int, int] | None = None
    source_bytes: int = 0        # size of the file as read


def target_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(w, h) scaled so that the longer side is ``max_side`` (unchanged when already within it)."""
    w, h = size
    longer = max(w, h)
    if longer <= max_side:
        return w, h
    s = max_side / longer
    return max(1, round(w * s)), max(1, round(h * s))


def _open(data: bytes) -> Image.Image:
    if len(data) == 0:
        raise _Skip("zero-byte file")
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise _Skip("not an image (unidentified format)") from None


class _Skip(Exception):
    pass


def _conversion_reasons(img: Image.Image, path: str, max_side: int) -> list[str]:
    reasons = []
    ext = path.rsplit(".", 1)[-1] if "." in path else ""
    if img.format != "JPEG":
        reasons.append(f"{img.format} named .{ext}" if ext.lower() in ("jpeg", "jpg")
                       else f"{img.format} re-encoded as JPEG")
    if img.mode == "CMYK":
        reasons.append("CMYK->RGB")
    elif img.mode in ("L", "LA", "1", "I", "I;16", "F"):
        reasons.append(f"grayscale ({img.mode})->RGB")
    elif img.mode != "RGB":
        reasons.append(f"{img.mode}->RGB")
    if max(img.size) > max_side:
        w, h = img.size
        tw, th = target_size(img.size, max_side)
        reasons.append(f"resized {w}x{h}->{tw}x{th}")
    return reasons


def decode_rgb(img: Image.Image, max_side: int | None, draft: bool = True) -> Image.Image:
    """Decode ``img`` to RGB with its longer side <= ``max_side`` (draft mode first when it is a JPEG)."""
    src = img.size
    tgt = target_size(src, max_side) if max_side else src
    if draft and img.format == "JPEG" and tgt != src:
        img.draft(img.mode if img.mode in ("RGB", "L", "CMYK") else None, tgt)
    img.load()
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            bg = Image.new("RGB", img.size, (255, 255, 255))
            bg.paste(img, mask=img.getchannel("A"))
            img = bg
        elif img.mode in ("I", "I;16", "F"):
            arr = np.asarray(img, dtype=np.float64)
            hi = arr.max() if arr.size and arr.max() > 0 else 1.0
            img = Image.fromarray(np.clip(arr * (255.0 / hi), 0, 255).astype(np.uint8)).convert("RGB")
        else:
            img = img.convert("RGB")
    if img.size != tgt:
        img = img.resize(tgt, Image.BICUBIC, reducing_gap=None)
    return img


def prepare_image(path: str, max_side: int = 512, quality: int = 90, data: bytes | None = None) -> Prepared:
    """Read ``path`` and return the JPEG bytes to store (or a skip reason). Never raises for bad files."""
    try:
        if data is None:
            with open(path, "rb") as f:
                data = f.read()
        img = _open(data)
        src = img.size
        reasons = _conversion_reasons(img, path, max_side)
        if not reasons:
            # Fine RGB JPEG within max_side: keep the original bytes, but prove they decode completely.
            tiny = (max(1, src[0] // 8), max(1, src[1] // 8))
            img.draft("RGB", tiny)
            img.load()
            return Prepared("ok", None, data, src, src, len(data))
        rgb = decode_rgb(img, max_side)
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=quality)
        return Prepared("converted", ", ".join(reasons), buf.getvalue(), rgb.size, src, len(data))
    except _Skip as e:
        return Prepared("skipped", str(e))
    except Image.DecompressionBombError as e:
        return Prepared("skipped", f"decompression bomb ({e})")
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        kind = "truncated" if "truncated" in msg else "undecodable"
        return Prepared("skipped", f"{kind} ({type(e).__name__}: {msg})")
    except Exception as e:  # a bad file must never kill the job; the reason ends up in the manifest
        return Prepared("skipped", f"undecodable ({type(e).__name__}: {e})")


def probe_image(path: str, max_side: int) -> Prepared:
    """Validate ``path`` without producing output bytes (status + reason), decoding in draft mode."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        img = _open(data)
        src = img.size
        reasons = _conversion_reasons(img, path, max_side)
        if img.format == "JPEG":
            img.draft(img.mode if img.mode in ("RGB", "L", "CMYK") else None,
                      (max(1, src[0] // 8), max(1, src[1] // 8)))
        img.load()
        return Prepared("converted" if reasons else "ok", ", ".join(reasons) or None, None,
                        target_size(src, max_side), src)
    except _Skip as e:
        return Prepared("skipped", str(e))
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        kind = "truncated" if "truncated" in msg else "undecodable"
        return Prepared("skipped", f"{kind} ({type(e).__name__}: {msg})")


def load_rgb_array(path: str, max_side: int | None) -> np.ndarray:
    """HxWx3 uint8 RGB array with longer side <= ``max_side`` (draft-mode decode). Raises on bad files."""
    with open(path, "rb") as f:
        img = _open(f.read())
    return np.asarray(decode_rgb(img, max_side), dtype=np.uint8)
