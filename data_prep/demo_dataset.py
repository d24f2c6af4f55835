"""A small synthetic dataset in ImageNet layout, learnable by a small CPVT on CPU in minutes.

Classes differ by a shape or texture (disc, square, triangle, stripes in 3 orientations, checkerboard, ring,
cross, dots, ...) drawn in a class colour (jittered; or a random colour with ``class_colours=False``) at a
random place and scale over a noisy gradient background; images have varied sizes and aspect ratios (a few are
larger than the default ``--max-side`` so the downscale path is exercised). Above 10 classes the patterns repeat
with a shifted colour palette.

Layout (like ILSVRC2012 / Kaggle)::

    OUT/train/<wnid>/<wnid>_<n>.JPEG
    OUT/val/ILSVRC2012_val_<n:08d>.JPEG          (flat) + OUT/LOC_val_solution.csv      val_layout="loc_csv"
                                                 (flat) + OUT/ILSVRC2012_devkit_t12/data/
                                                   ILSVRC2012_validation_ground_truth.txt + meta.mat
                                                                                     val_layout="devkit"
    OUT/val/<wnid>/ILSVRC2012_val_<n:08d>.JPEG                                       val_layout="folders"
    OUT/LOC_synset_mapping.txt, OUT/demo_dataset.json (what was generated, incl. the bad files)

With ``bad_files=True`` each split also gets one file of every bad kind real ImageNet (or a broken copy)
has: a CMYK JPEG, a PNG named ``.JPEG``, a grayscale JPEG (these three are converted and keep their label), a
truncated JPEG, a zero-byte file and a non-image file (these three are skipped).
"""
from __future__ import annotations

import colorsys
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.io
from PIL import Image, ImageDraw

PATTERNS = ("disc", "square", "triangle", "hstripes", "vstripes", "checker", "ring", "cross", "dstripes",
            "dots")
BAD_KINDS = ("cmyk", "png_named_jpeg", "grayscale", "truncated", "zero_byte", "not_an_image")
SKIPPED_KINDS = ("truncated", "zero_byte", "not_an_image")


def wnid(c: int) -> str:
    """Synthetic WordNet-style ids whose sorted order is the class order."""
    return f"n{90000000 + c:08d}"


def class_name(c: int) -> str:
    return f"{PATTERNS[c % len(PATTERNS)]}-{c // len(PATTERNS)}"


def _class_colour(c: int, rng: np.random.Generator, by_class: bool = True) -> tuple[int, int, int]:
    base_hue = ((c % len(PATTERNS)) * 0.1 + (c // len(PATTERNS)) * 0.37) % 1.0 if by_class else rng.random()
    h = (base_hue + rng.normal(0, 0.02)) % 1.0
    s = float(np.clip(rng.normal(0.8, 0.1), 0.4, 1.0))
    v = float(np.clip(rng.normal(0.85, 0.1), 0.5, 1.0))
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def _background(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    c0, c1 = rng.uniform(30, 200, 3), rng.uniform(30, 200, 3)
    t = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
    img = c0 * (1 - t) + c1 * t + rng.normal(0, 18, (h, w, 3))
    return np.broadcast_to(img, (h, w, 3))


def render(c: int, w: int, h: int, rng: np.random.Generator, class_colours: bool = True) -> Image.Image:
    """One RGB image of class ``c`` (pattern ``c % 10``) of size ``w`` x ``h``.

    ``class_colours=False`` draws the pattern in a random colour, so only shape/texture tells classes apart.
    """
    pattern = PATTERNS[c % len(PATTERNS)]
    col = np.array(_class_colour(c, rng, class_colours), dtype=np.float64)
    img = _background(w, h, rng).copy()
    m = min(w, h)
    size = int(m * rng.uniform(0.45, 0.8))
    x0 = int(rng.integers(0, max(1, w - size + 1)))
    y0 = int(rng.integers(0, max(1, h - size + 1)))
    yy, xx = np.mgrid[0:h, 0:w]
    inside = (xx >= x0) & (xx < x0 + size) & (yy >= y0) & (yy < y0 + size)
    period = max(4, int(size * rng.uniform(0.12, 0.22)))
    if pattern in ("hstripes", "vstripes", "dstripes", "checker", "dots"):
        u, v = xx - x0, yy - y0
        if pattern == "hstripes":
            mask = (v // period) % 2 == 0
        elif pattern == "vstripes":
            mask = (u // period) % 2 == 0
        elif pattern == "dstripes":
            mask = ((u + v) // period) % 2 == 0
        elif pattern == "checker":
            mask = ((u // period) + (v // period)) % 2 == 0
        else:
            cu, cv = (u % period) - period / 2, (v % period) - period / 2
            mask = cu * cu + cv * cv < (period * 0.3) ** 2
        mask &= inside
    else:
        layer = Image.new("L", (w, h), 0)
        d = ImageDraw.Draw(layer)
        box = (x0, y0, x0 + size - 1, y0 + size - 1)
        if pattern == "disc":
            d.ellipse(box, fill=255)
        elif pattern == "square":
            d.rectangle((x0 + size // 8, y0 + size // 8, x0 + size * 7 // 8, y0 + size * 7 // 8), fill=255)
        elif pattern == "triangle":
            d.polygon([(x0 + size // 2, y0), (x0, y0 + size - 1), (x0 + size - 1, y0 + size - 1)], fill=255)
        elif pattern == "ring":
            d.ellipse(box, fill=255)
            k = size // 4
            d.ellipse((x0 + k, y0 + k, x0 + size - 1 - k, y0 + size - 1 - k), fill=0)
        elif pattern == "cross":
            k = max(2, size // 6)
            mid = size // 2
            d.rectangle((x0 + mid - k, y0, x0 + mid + k, y0 + size - 1), fill=255)
            d.rectangle((x0, y0 + mid - k, x0 + size - 1, y0 + mid + k), fill=255)
        mask = np.asarray(layer) > 127
    img[mask] = col + rng.normal(0, 12, (int(mask.sum()), 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _jpeg(img: Image.Image, rng: np.random.Generator, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(80, 96)), **kw)
    return buf.getvalue()


def bad_file(kind: str, c: int, rng: np.random.Generator, w: int, h: int) -> bytes:
    img = render(c, w, h, rng)
    if kind == "cmyk":
        return _jpeg(img.convert("CMYK"), rng)
    if kind == "png_named_jpeg":
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()
    if kind == "grayscale":
        return _jpeg(img.convert("L"), rng)
    if kind == "truncated":
        data = _jpeg(img, rng)
        return data[: len(data) * 2 // 3]
    if kind == "zero_byte":
        return b""
    if kind == "not_an_image":
        return b"<html><body>404 Not Found: this is not a JPEG</body></html>\n"
    raise ValueError(f"unknown bad kind {kind!r}")


def _write_meta_mat(path: Path, classes: list[str], ids: dict[str, int]) -> None:
    """A tiny devkit ``meta.mat``: leaf synsets (num_children 0) + one internal node, IDs not in wnid order."""
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O"),
             ("children", "O"), ("wordnet_height", "O"), ("num_train_images", "O")]
    rows = [(ids[w], w, class_name(i), f"synthetic class {i}", 0, np.zeros((0,), np.uint16), 0, 0)
            for i, w in enumerate(classes)]
    rows.append((len(classes) + 1, "n99999999", "entity", "root of the synthetic hierarchy", len(classes),
                 np.array(sorted(ids.values()), np.uint16), 1, 0))
    arr = np.array(rows, dtype=dtype).reshape(-1, 1)
    scipy.io.savemat(str(path), {"synsets": arr})


@dataclass
class _DemoWriter:
    """What writing the demo images needs: the output root, the classes, the image sizes and the one RNG.

    Every random draw of the dataset comes from ``rng``, in the order the files are written.
    """

    out: Path
    classes: list[str]
    rng: np.random.Generator
    min_side: int
    max_side: int
    large_images: int
    large_side: int
    bad_files: bool
    class_colours: bool

    def size(self) -> tuple[int, int]:
        """A random (width, height) in [min_side, max_side]."""
        return (int(self.rng.integers(self.min_side, self.max_side + 1)),
                int(self.rng.integers(self.min_side, self.max_side + 1)))

    def image(self, c: int, size: tuple[int, int]) -> bytes:
        """A JPEG of class ``c`` (the picture's draws first, then its quality's)."""
        return _jpeg(render(c, *size, self.rng, self.class_colours), self.rng)

    def split_entry(self, found: int, bad: dict[str, list[str]]) -> dict:
        """A split's entry in demo_dataset.json."""
        return {"found": found, "bad": bad,
                "expected_written": found - (len(SKIPPED_KINDS) if self.bad_files else 0)}


def _check_demo_args(num_classes: int, val_layout: str, min_side: int, max_side: int) -> None:
    if num_classes < 2:
        raise ValueError(f"num_classes: {num_classes} must be >= 2")
    if val_layout not in ("loc_csv", "devkit", "folders"):
        raise ValueError(f"val_layout: {val_layout!r} is not one of ['loc_csv', 'devkit', 'folders']")
    if not 8 <= min_side <= max_side:
        raise ValueError(f"min_side/max_side: need 8 <= min_side <= max_side, got {min_side}, {max_side}")


def _write_train(demo: _DemoWriter, train_per_class: int) -> dict:
    """train/<wnid>/<wnid>_<n>.JPEG (+ one file of every bad kind); returns the split's description."""
    train_files: list[tuple[str, int]] = []
    bad: dict[str, list[str]] = {}
    for c, w in enumerate(demo.classes):
        d = demo.out / "train" / w
        d.mkdir(parents=True, exist_ok=True)
        for n in range(train_per_class):
            big = n < demo.large_images and c == 0
            sz = (demo.large_side, demo.large_side * 3 // 4) if big else demo.size()
            p = d / f"{w}_{n}.JPEG"
            p.write_bytes(demo.image(c, sz))
            train_files.append((str(p), c))
    if demo.bad_files:
        for i, kind in enumerate(BAD_KINDS):
            c = i % len(demo.classes)
            p = demo.out / "train" / demo.classes[c] / f"{demo.classes[c]}_bad_{kind}.JPEG"
            p.write_bytes(bad_file(kind, c, demo.rng, *demo.size()))
            bad[kind] = [str(p)]
            train_files.append((str(p), c))
    return demo.split_entry(len(train_files), bad)


def _val_order(demo: _DemoWriter, val_per_class: int) -> list[tuple[int, str | None]]:
    """(label, bad kind or None) of every val file, in a shuffled order."""
    num_classes = len(demo.classes)
    labels = [c for c in range(num_classes) for _ in range(val_per_class)]
    kinds: list[str | None] = [None] * len(labels)
    if demo.bad_files:
        for i, kind in enumerate(BAD_KINDS):
            labels.append((i + 3) % num_classes)
            kinds.append(kind)
    order = demo.rng.permutation(len(labels))
    return [(labels[i], kinds[i]) for i in order]


def _write_val(demo: _DemoWriter, val_per_class: int, val_layout: str) -> tuple[dict, list[tuple[str, str]]]:
    """val/ILSVRC2012_val_<n>.JPEG (flat, or under val/<wnid>/ for "folders"); returns the split's description
    and the (image id, wnid) rows of its ground truth."""
    val_dir = demo.out / "val"
    val_dir.mkdir(parents=True, exist_ok=True)
    vbad: dict[str, list[str]] = {}
    rows = []
    n_large = 0
    for n, (c, kind) in enumerate(_val_order(demo, val_per_class), start=1):
        name = f"ILSVRC2012_val_{n:08d}.JPEG"
        d = val_dir / demo.classes[c] if val_layout == "folders" else val_dir
        d.mkdir(exist_ok=True)
        if kind is not None:
            data = bad_file(kind, c, demo.rng, *demo.size())
            vbad.setdefault(kind, []).append(str(d / name))
        else:
            big = n_large < max(0, demo.large_images // 2)
            n_large += big
            sz = (demo.large_side * 3 // 4, demo.large_side) if big else demo.size()
            data = demo.image(c, sz)
        (d / name).write_bytes(data)
        rows.append((name[:-5], demo.classes[c]))
    return demo.split_entry(len(rows), vbad), rows


def _write_val_ground_truth(out: Path, val_layout: str, classes: list[str], rows: list[tuple[str, str]]) -> None:
    """Kaggle's LOC_val_solution.csv ("loc_csv") or the devkit's ground-truth txt + meta.mat ("devkit")."""
    if val_layout == "loc_csv":
        with open(out / "LOC_val_solution.csv", "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["ImageId", "PredictionString"])
            for image_id, w in rows:
                wr.writerow([image_id, f"{w} 0 0 10 10 "])
    elif val_layout == "devkit":
        data_dir = out / "ILSVRC2012_devkit_t12" / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        ids = {w: len(classes) - i for i, w in enumerate(classes)}   # deliberately not sorted-wnid order
        (data_dir / "ILSVRC2012_validation_ground_truth.txt").write_text(
            "".join(f"{ids[w]}\n" for _, w in rows))
        _write_meta_mat(data_dir / "meta.mat", classes, ids)


def make_demo_dataset(out: str | Path, *, num_classes: int = 10, train_per_class: int = 100,
                      val_per_class: int = 20, min_side: int = 48, max_side: int = 160, large_images: int = 2,
                      large_side: int = 720, bad_files: bool = True,
                      val_layout: Literal["loc_csv", "devkit", "folders"] = "loc_csv", class_colours: bool = True,
                      seed: int = 0) -> dict:
    """Write the demo dataset under ``out`` and return its description (also saved as demo_dataset.json).

    ``class_colours=False`` makes colour uninformative (classes differ by shape/texture only): a harder task.
    """
    _check_demo_args(num_classes, val_layout, min_side, max_side)
    out = Path(out)
    classes = [wnid(c) for c in range(num_classes)]
    demo = _DemoWriter(out=out, classes=classes, rng=np.random.default_rng(seed), min_side=min_side,
                       max_side=max_side, large_images=large_images, large_side=large_side,
                       bad_files=bad_files, class_colours=class_colours)
    desc: dict = {"classes": classes, "class_names": [class_name(c) for c in range(num_classes)],
                  "val_layout": val_layout, "class_colours": class_colours, "seed": seed, "splits": {}}
    desc["splits"]["train"] = _write_train(demo, train_per_class)
    desc["splits"]["val"], rows = _write_val(demo, val_per_class, val_layout)
    _write_val_ground_truth(out, val_layout, classes, rows)
    (out / "LOC_synset_mapping.txt").write_text("".join(f"{w} {class_name(i)}\n" for i, w in enumerate(classes)))
    (out / "demo_dataset.json").write_text(json.dumps(desc, indent=2) + "\n")
    return desc
