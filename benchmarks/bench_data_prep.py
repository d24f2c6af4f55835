"""Data-prep throughput per core, in one run: WebDataset writing, FFCV writing, a read-only loop, draft mode.

    python -m benchmarks.bench_data_prep [--images 240] [--large 24] [--out PATH.json]
    python -m benchmarks.bench_data_prep --quick      # 12 images, 2 large (smoke test)

Results: ``benchmarks/results/bench_data_prep.json`` (``bench_data_prep_quick.json`` with ``--quick``).

Everything runs with one worker process, so images/s is images/s per core. Both wall-clock and CPU-time rates
are reported (CPU time = this process + its reaped children, robust against other load on a shared machine).

* ``read_only``: open + read every source file (the I/O floor);
* ``read_decode``: read + full PIL decode (what any converter has to pay at least once per image);
* ``wds_write``: ``data_prep.write_webdataset`` end to end (validate/convert, tar, sha256, index);
* ``ffcv_write``: ``data_prep.write_ffcv`` end to end (probe pass + FFCV ``DatasetWriter``, jpg mode; ffcv is
  imported, i.e. numba-compiled, before timing);
* ``draft`` vs ``full``: downscaling large JPEGs (longer side 2000 px -> 512) with PIL's draft mode
  (DCT-domain 1/2..1/8 scaling) + final resize, versus a full decode + resize.

The source images are ImageNet-sized (about 500x375, with a share of larger ones), synthetic JPEGs from
``data_prep.demo_dataset.render``.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import add_common_args, command_line, write_result
from data_prep.demo_dataset import render, wnid
from data_prep.images import decode_rgb, target_size



def _cpu() -> float:
    multiprocessing.active_children()   # reap finished worker processes so their CPU time is counted
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class Timer:
    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), _cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w0, _cpu() - self.c0


def make_source(root: Path, n_images: int, n_classes: int = 8, seed: int = 0) -> list[Path]:
    """ImageNet-like JPEGs: mostly ~500x375 (varied aspect), 15% larger than 512 px."""
    rng = np.random.default_rng(seed)
    (root / "val").mkdir(parents=True, exist_ok=True)
    paths = []
    base = [render(c, 160, 120, rng) for c in range(n_classes)]
    for i in range(n_images):
        c = i % n_classes
        big = rng.random() < 0.15
        w = int(rng.integers(700, 1000)) if big else int(rng.integers(400, 500))
        h = int(w * rng.uniform(0.6, 0.9))
        arr = np.asarray(base[c].resize((w, h), Image.BICUBIC), np.float32)
        arr += rng.normal(0, 10, arr.shape)
        d = root / "train" / wnid(c)
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{wnid(c)}_{i}.JPEG"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(p)
    return paths


def make_large(root: Path, n: int, seed: int = 1) -> list[Path]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        small = render(i % 10, 250, 188, rng)
        arr = np.asarray(small.resize((2000, 1500), Image.BICUBIC), np.float32) + rng.normal(0, 8, (1500, 2000, 3))
        p = root / f"large_{i}.JPEG"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(p, quality=90)
        out.append(p)
    return out


def bench_draft(paths: list[Path], max_side: int = 512) -> dict:
    datas = [p.read_bytes() for p in paths]
    with Timer() as full:
        for d in datas:
            img = Image.open(io.BytesIO(d))
            img.load()
            img.convert("RGB").resize(target_size(img.size, max_side), Image.BICUBIC, reducing_gap=None)
    with Timer() as draft:
        for d in datas:
            decode_rgb(Image.open(io.BytesIO(d)), max_side, draft=True)
    n = len(paths)
    return {"images": n, "source": "2000x1500 JPEG q90", "target_max_side": max_side,
            "full_decode_resize": {"wall_s": full.wall, "cpu_s": full.cpu, "images_per_s": n / full.wall,
                                   "images_per_cpu_s": n / full.cpu},
            "draft_decode_resize": {"wall_s": draft.wall, "cpu_s": draft.cpu, "images_per_s": n / draft.wall,
                                    "images_per_cpu_s": n / draft.cpu},
            "speedup_wall": full.wall / draft.wall, "speedup_cpu": full.cpu / draft.cpu}


def run(n_images: int, n_large: int) -> dict:
    from data_prep.write_ffcv import import_ffcv, write_ffcv
    from data_prep.write_webdataset import write_webdataset

    import_ffcv()   # numba-compiles ffcv's kernels once (seconds): not part of writing throughput

    with tempfile.TemporaryDirectory(prefix="bench_data_prep_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        paths = make_source(tmp / "src", n_images)
        large = make_large(tmp / "large", n_large)
        gen_s = time.perf_counter() - t0
        src_bytes = sum(p.stat().st_size for p in paths)
        rows = {}
        with Timer() as t:
            for p in paths:
                with open(p, "rb") as f:
                    f.read()
        rows["read_only"] = t
        with Timer() as t:
            for p in paths:
                Image.open(p).load()
        rows["read_decode"] = t
        with Timer() as t:
            m = write_webdataset(tmp / "src", tmp / "out", splits=("train",), workers=1, progress=False,
                                 shard_max_count=100)
        rows["wds_write"] = t
        assert m["train"]["counts"]["written"] == n_images
        wds_resized = m["train"]["counts"]["resized"]
        with Timer() as t:
            mf = write_ffcv(tmp / "src", tmp / "out", splits=("train",), workers=1, progress=False,
                            max_resolution=512, write_mode="jpg", jpeg_quality=90)
        rows["ffcv_write"] = t
        assert mf["train"]["counts"]["written"] == n_images
        draft = bench_draft(large)

    table = {k: {"wall_s": v.wall, "cpu_s": v.cpu, "images_per_s": n_images / v.wall,
                 "images_per_cpu_s": n_images / max(v.cpu, 1e-9)} for k, v in rows.items()}
    def ratio(a: str, b: str, key: str) -> float:
        return table[a][key] / table[b][key]

    ratios = {}
    for suffix, key in (("", "images_per_s"), ("_cpu", "images_per_cpu_s")):
        ratios.update({
            f"wds_vs_read_only{suffix}": ratio("wds_write", "read_only", key),
            f"ffcv_vs_read_only{suffix}": ratio("ffcv_write", "read_only", key),
            f"wds_vs_read_decode{suffix}": ratio("wds_write", "read_decode", key),
            f"ffcv_vs_read_decode{suffix}": ratio("ffcv_write", "read_decode", key),
            f"wds_vs_ffcv{suffix}": ratio("wds_write", "ffcv_write", key),
        })
    ratios["draft_speedup_wall"] = draft["speedup_wall"]
    ratios["draft_speedup_cpu"] = draft["speedup_cpu"]
    return {
        "setup": {"images": n_images, "source_mb": src_bytes / 2**20, "workers": 1, "wds_max_side": 512,
                  "wds_resized": wds_resized, "ffcv_max_resolution": 512, "ffcv_write_mode": "jpg",
                  "generate_s": gen_s},
        "per_core": table,
        "draft": draft,
        "ratios": ratios,
        "ffcv_timings": mf["train"]["timings"],
        "wds_timings": m["train"]["timings"],
    }


def print_table(r: dict) -> None:
    print(f"\ndata prep, {r['setup']['images']} ImageNet-sized JPEGs ({r['setup']['source_mb']:.1f} MiB), 1 worker "
          f"(per core); load avg {r['machine'].get('load_avg_1m', float('nan')):.1f} "
          f"on {r['machine']['cpu_count']} cpus")
    print(f"{'stage':<14}{'wall s':>9}{'cpu s':>9}{'img/s (wall)':>15}{'img/cpu-s':>12}")
    for k, v in r["per_core"].items():
        print(f"{k:<14}{v['wall_s']:>9.2f}{v['cpu_s']:>9.2f}{v['images_per_s']:>15.1f}{v['images_per_cpu_s']:>12.1f}")
    d = r["draft"]
    print(f"\ndraft mode, {d['images']} x {d['source']} -> longer side {d['target_max_side']}:")
    for k in ("full_decode_resize", "draft_decode_resize"):
        print(f"  {k:<22}{d[k]['images_per_s']:>8.1f} img/s wall {d[k]['images_per_cpu_s']:>8.1f} img/cpu-s")
    print("\nratios:")
    for k, v in r["ratios"].items():
        print(f"  {k:<26}{v:>8.3f}")


def main(argv: list[str] | None = None) -> int:
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--images", type=int, default=240)
    p.add_argument("--large", type=int, default=24)
    p.add_argument("--out", default=None, help="JSON path (default: <results dir>/bench_data_prep.json)")
    a = p.parse_args(argv)
    if a.quick:
        a.images, a.large = 12, 2
    if a.images < 8 or a.large < 1:
        p.error("--images must be >= 8 and --large >= 1")
    payload = run(a.images, a.large)
    command = command_line("benchmarks.bench_data_prep", argv)
    name = "bench_data_prep" + ("_quick" if a.quick else "")
    out = (write_result(Path(a.out).stem, payload, Path(a.out).parent, command=command) if a.out
           else write_result(name, payload, a.results_dir, command=command))
    print_table(json.loads(out.read_text()))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
