"""Shards from a loopback S3 server and loopback HTTP vs the local folder: the same shards, one run, interleaved.

    python -m benchmarks.bench_remote [--images 768] [--rounds 3] [--workers 2] [--quick]

Servers (started here, 127.0.0.1 only): moto's standalone S3 server and ``python -m http.server`` (threaded)
over the local output folder; the shards are written to the bucket by ``python -m data_prep``'s writer
(:func:`data_prep.write_webdataset.write_webdataset` with an ``s3://`` out), byte-identical to the local ones.

Rows:

* ``read``: raw shard read MB/s -- every shard of the train split through
  :func:`pipeline.data.tar_samples.tar_samples` (tar parse included, no decode), by client: ``local`` (a file),
  ``s3_boto3`` and ``http_requests`` (:mod:`pipeline.storage`, what the loader uses), and the alternatives the
  client was chosen against: ``http_fsspec`` (fsspec's HTTP filesystem over aiohttp) and ``http_gopen_curl``
  (webdataset's ``gopen("pipe:curl -s URL")``). ``s3_s3fs`` runs when s3fs is installed;
* ``loader``: training-loader images/s at 128 px (:class:`pipeline.data.webdataset_loader.WdsTrainLoader`,
  the DeiT recipe's per-sample augmentation, ``--workers`` DataLoader workers) with ``data.root`` = the local
  folder, the ``s3://`` URL and the ``http://`` URL.

A loopback server measures the client and protocol overhead (request handling, copies, the server's own CPU,
which competes with the loader for the same cores), not a network. Results: ``benchmarks/results/bench_remote.json``.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import webdataset

from benchmarks.common import (add_common_args, command_line, format_table, measure_interleaved, paired_ratios, ratio,
                               ratio_spread, write_result)

BUCKET = "cpvt-bench"
RESOLUTION = 128


def make_data(base: Path, images: int, s3_root: str) -> Path:
    from data_prep.demo_dataset import make_demo_dataset
    from data_prep.write_webdataset import write_webdataset

    classes = 8
    src = base / "src"
    make_demo_dataset(src, num_classes=classes, train_per_class=max(1, images // classes), val_per_class=1,
                      min_side=300, max_side=500, large_images=0, bad_files=False)
    kw = dict(splits=("train",), max_side=512, shard_max_count=64, workers=2, progress=False)
    write_webdataset(src, base / "out", **kw)
    write_webdataset(src, s3_root, **kw)
    return base / "out"


def _read_all(urls: list[str], open_fn: Callable | None = None) -> int:
    """Samples read through tar_samples (or, with ``open_fn``, tar_members over that client's stream)."""
    from pipeline.data.tar_samples import tar_members, tar_samples

    if open_fn is None:
        return sum(1 for _ in tar_samples({"url": u} for u in urls))
    n = 0
    for u in urls:
        with open_fn(u) as f:
            n += sum(1 for _ in tar_members(f, u))
            while f.read(1 << 20):   # the tar's trailing padding: a pipe's writer must see its whole output read
                pass
    return n // 2   # members: jpg + cls per sample


def _loader(root: str, *, batch_size: int, workers: int):
    from pipeline.config import AugConfig, DataConfig, from_dict
    from pipeline.data.loader import build_train_loader

    data = from_dict(DataConfig, {"format": "wds", "root": root, "batch_size": batch_size, "num_workers": workers,
                                  "shuffle_buffer": 256, "shuffle_initial": 64})
    aug = from_dict(AugConfig, {"mixup": 0.0, "cutmix": 0.0})
    loader = build_train_loader(data, aug, num_classes=8, rank=0, world_size=1, seed=0)

    def epoch() -> int:
        loader.set_epoch(0, RESOLUTION)
        return sum(int(x.shape[0]) for x, _ in loader)
    return epoch


def main(argv: list[str] | None = None) -> dict:
    from tests.helpers_remote import HttpServer, S3Server, restore_env, set_aws_env

    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--images", type=int, default=768, help="training images in the generated dataset")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timed calls per candidate")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.rounds, args.batch_size = 64, 1, 16

    t0 = time.time()
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as bench_loaders: the workers fill the cores
    base = Path(tempfile.mkdtemp(prefix="bench_remote_"))
    s3 = S3Server(base / "moto")
    old_env = set_aws_env(s3.aws_files())
    http = None
    try:
        s3.client().create_bucket(Bucket=BUCKET)
        s3_root = f"s3://{BUCKET}/data"
        local = make_data(base, args.images, s3_root)
        http = HttpServer(local, base / "http.log")
        roots = {"local": str(local), "s3": s3_root, "http": http.url}
        from pipeline.data.shard_index import load_split_index

        urls = {k: list(load_split_index(r, "train").urls) for k, r in roots.items()}
        total_bytes = sum((local / "wds" / Path(u).name).stat().st_size for u in urls["local"])
        t_data = time.time() - t0

        read = {
            "local": lambda: _read_all(urls["local"]),
            "s3_boto3": lambda: _read_all(urls["s3"]),
            "http_requests": lambda: _read_all(urls["http"]),
            "http_gopen_curl": lambda: _read_all(
                urls["http"], lambda u: webdataset.gopen(f"pipe:curl -s -f {u}", "rb")),
        }
        skipped = {}
        try:
            import fsspec

            fs_http = fsspec.filesystem("http")
            read["http_fsspec"] = lambda: _read_all(urls["http"], lambda u: fs_http.open(u, "rb"))
        except ImportError as e:
            skipped["http_fsspec"] = str(e)
        try:
            import s3fs  # noqa: F401

            fs_s3 = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3.url})
            read["s3_s3fs"] = lambda: _read_all(urls["s3"], lambda u: fs_s3.open(u, "rb"))
        except ImportError as e:
            skipped["s3_s3fs"] = f"not installed ({e})"
        counts = {k: fn() for k, fn in read.items()}   # warm-up + every client reads every sample
        assert len(set(counts.values())) == 1, counts
        read_t = measure_interleaved(read, warmup=0, rounds=max(3, args.rounds))
        mb_s = {k: total_bytes / t.median / 1e6 for k, t in read_t.items()}

        loaders = {k: _loader(r, batch_size=args.batch_size, workers=args.workers) for k, r in roots.items()}
        produced = {k: fn() for k, fn in loaders.items()}   # untimed first epoch: workers start
        load_t = measure_interleaved(loaders, warmup=0, rounds=args.rounds)
        ips = {k: produced[k] / t.median for k, t in load_t.items()}
    finally:
        torch.set_num_threads(caller_threads)
        if http is not None:
            http.stop()
        s3.stop()
        restore_env(old_env)
        shutil.rmtree(base, ignore_errors=True)

    ratios = {
        "read_s3_vs_local": ratio(mb_s["s3_boto3"], mb_s["local"]),
        "read_http_vs_local": ratio(mb_s["http_requests"], mb_s["local"]),
        "loader_s3_vs_local": ratio(ips["s3"], ips["local"]),
        "loader_http_vs_local": ratio(ips["http"], ips["local"]),
        "read_requests_vs_gopen_curl": ratio(mb_s["http_requests"], mb_s["http_gopen_curl"]),
    }
    if "http_fsspec" in mb_s:
        ratios["read_requests_vs_fsspec"] = ratio(mb_s["http_requests"], mb_s["http_fsspec"])
    pairs = {"read_s3_vs_local": (read_t, "s3_boto3", "local"),
             "read_http_vs_local": (read_t, "http_requests", "local"),
             "loader_s3_vs_local": (load_t, "s3", "local"), "loader_http_vs_local": (load_t, "http", "local"),
             "read_requests_vs_gopen_curl": (read_t, "http_requests", "http_gopen_curl"),
             "read_requests_vs_fsspec": (read_t, "http_requests", "http_fsspec")}
    # per-round rate ratios a/b (rate = amount / time): the spread of each ratio
    ratio_spreads = {k: ratio_spread(paired_ratios(t[b].samples, t[a].samples)) for k, (t, a, b) in pairs.items()
                     if k in ratios}
    rows = [{"row": "read MB/s", **{k: round(v, 1) for k, v in mb_s.items()}},
            {"row": f"loader img/s @{RESOLUTION}", **{k: round(v, 1) for k, v in ips.items()}}]
    summary = {k: f"{v:.2f} (spread {ratio_spreads[k]:.1%})" for k, v in ratios.items()}
    print(format_table(rows[:1]))
    print(format_table(rows[1:]))
    for k, v in summary.items():
        print(f"{k}: {v}")
    payload = {
        "read_mb_per_s": mb_s, "loader_images_per_s": ips, "ratios": ratios, "ratio_spread": ratio_spreads,
        "summary": summary,
        "skipped": skipped,
        "spread": {**{f"read_{k}": t.spread for k, t in read_t.items()},
                   **{f"loader_{k}": t.spread for k, t in load_t.items()}},
        "config": {"images": produced["local"], "shards": len(urls["local"]), "shard_bytes_total": total_bytes,
                   "batch_size": args.batch_size, "workers": args.workers, "rounds": args.rounds,
                   "resolution": RESOLUTION, "data_seconds": t_data, "total_seconds": time.time() - t0},
    }
    path = write_result("bench_remote" + ("_quick" if args.quick else ""), payload, args.results_dir,
                        command=command_line("benchmarks.bench_remote", argv))
    print(f"wrote {path} ({time.time() - t0:.0f} s)")
    return payload


if __name__ == "__main__":
    main()
