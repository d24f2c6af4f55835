"""Native-aspect vs center-crop evaluation, one run, same weights and val split (``eval.mode``).

Per test resolution (= the short side in native mode): top-1/top-5 of both modes, then the throughput of a
whole evaluation pass (decode + resize + forward, loaders built once, interleaved rounds) and of the forward
alone (the pass's batches held in memory), as img/s and patch tokens/s; native processes more tokens per image
(the long side is kept), so the ratios are native / center-crop.

    python -m benchmarks.bench_native_eval --checkpoint runs/demo/export/cpvt_demo.safetensors \\
        --data runs/demo/data --resolutions 64 96
    python -m benchmarks.bench_native_eval --quick      # tiny random model + tiny demo data (smoke test)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from benchmarks.common import add_common_args, command_line, format_table, measure_interleaved, ratio, write_result

MODES = ("center_crop", "native")


def _quick_setup(tmp: Path):
    import timm

    import pipeline.models  # noqa: F401
    from data_prep.demo_dataset import make_demo_dataset
    from data_prep.write_webdataset import write_webdataset

    make_demo_dataset(tmp / "src", num_classes=3, train_per_class=2, val_per_class=6, min_side=40, max_side=120,
                      large_images=0, bad_files=False, val_layout="folders")
    write_webdataset(tmp / "src", tmp / "out", workers=1, progress=False)
    torch.manual_seed(0)
    model = timm.create_model("cpvt_ti", num_classes=3, embed_dim=48, depth=2, num_heads=2)
    return model.eval(), "cpvt_ti (tiny, random)", tmp / "out"


def _passes(model: torch.nn.Module, batches):
    """One evaluation pass over ``batches`` (a loader: decode + forward; a list: the forward alone)."""
    from pipeline.evaluate import batch_counts

    def fn():
        for x, y in batches:
            batch_counts(model(x), y)
    return fn


def run(model: torch.nn.Module, data_root: str | Path, resolutions: Sequence[int], *, fmt: str, batch_size: int,
        workers: int, rounds: int, max_aspect: float) -> dict[str, Any]:
    from pipeline.config import AugConfig, DataConfig, from_dict
    from pipeline.evaluate import evaluate

    data_cfg = from_dict(DataConfig, {"format": fmt, "root": str(data_root), "eval_batch_size": batch_size,
                                      "num_workers": workers}, prefix="data.")
    aug = AugConfig()
    device = torch.device("cpu")
    patch = getattr(model, "patch_size", 16)
    loaders: dict = {}
    rows, summary, per_res = [], {}, {}
    with torch.inference_mode():
        for res in resolutions:
            acc = {m: evaluate(model, data_cfg, resolutions=[res], rank=0, world_size=1, crop_pct=aug.crop_pct,
                               device=device, aug_cfg=aug, loaders=loaders, mode=m, patch_size=patch,
                               max_aspect=max_aspect)[res] for m in MODES}
            held = {m: list(loaders[(m, res)]) for m in MODES}   # the pass's batches, for the forward-only timing

            t_full = measure_interleaved({m: _passes(model, loaders[(m, res)]) for m in MODES}, warmup=0,
                                         rounds=rounds)
            t_fwd = measure_interleaved({m: _passes(model, held[m]) for m in MODES}, warmup=1, rounds=rounds)
            per_mode = {}
            for m in MODES:
                n, tok = acc[m]["n"], acc[m]["tokens"]
                shapes = sorted({tuple(x.shape[2:]) for x, _ in held[m]})
                per_mode[m] = {"top1": acc[m]["top1"], "top5": acc[m]["top5"], "n": n, "tokens": tok,
                               "tokens_per_img": tok / n, "batches": len(held[m]), "shapes": shapes,
                               "pass_img_s": n / t_full[m].median, "pass_tokens_s": tok / t_full[m].median,
                               "pass_spread": t_full[m].spread,
                               "fwd_img_s": n / t_fwd[m].median, "fwd_tokens_s": tok / t_fwd[m].median}
                rows.append({"res": res, "mode": m, "top1": f"{acc[m]['top1']:.2f}", "tok/img": f"{tok / n:.1f}",
                             "batches": len(held[m]), "pass img/s": f"{per_mode[m]['pass_img_s']:.1f}",
                             "pass tok/s": f"{per_mode[m]['pass_tokens_s']:.0f}",
                             "fwd img/s": f"{per_mode[m]['fwd_img_s']:.1f}",
                             "fwd tok/s": f"{per_mode[m]['fwd_tokens_s']:.0f}"})
            c, nv = per_mode["center_crop"], per_mode["native"]
            summary.update({
                f"top1 native - crop {res}px": round(nv["top1"] - c["top1"], 2),
                f"native/crop pass img/s {res}px": round(ratio(nv["pass_img_s"], c["pass_img_s"]), 3),
                f"native/crop pass tokens/s {res}px": round(ratio(nv["pass_tokens_s"], c["pass_tokens_s"]), 3),
                f"native/crop fwd img/s {res}px": round(ratio(nv["fwd_img_s"], c["fwd_img_s"]), 3),
                f"native/crop fwd tokens/s {res}px": round(ratio(nv["fwd_tokens_s"], c["fwd_tokens_s"]), 3),
            })
            per_res[int(res)] = per_mode
            loaders.clear()
    return {"rows": rows, "per_resolution": per_res, "summary": summary}


def main(argv: Sequence[str] | None = None) -> int:
    p = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--checkpoint", default="runs/demo/export/cpvt_demo.safetensors",
                   help="export .safetensors, checkpoint dir or run dir (default: `python -m launchers.demo`'s)")
    p.add_argument("--data", default=None, help="data_prep output root (default: <run dir>/data)")
    p.add_argument("--format", default="wds", choices=["wds", "ffcv"])
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 96])
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-aspect", type=float, default=2.0)
    args = p.parse_args(argv)
    if not args.quick and not Path(args.checkpoint).exists():
        print(f"bench_native_eval: --checkpoint {args.checkpoint} does not exist: run `make demo` (or "
              f"`python -m benchmarks.bench_demo`, which make bench runs first) or name an export", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            model, source, data = _quick_setup(Path(tmp))
            args.resolutions, args.rounds, args.batch_size = [32], 1, 8
        else:
            from pipeline.evaluate import load_model

            model, name = load_model(args.checkpoint)
            model.eval()
            ckpt = Path(args.checkpoint)
            run_dir = ckpt.parent.parent if ckpt.suffix == ".safetensors" else ckpt
            data = Path(args.data) if args.data else run_dir / "data"
            source = f"{name} from {args.checkpoint}"
        out = run(model, data, args.resolutions, fmt=args.format, batch_size=args.batch_size,
                  workers=args.workers, rounds=args.rounds, max_aspect=args.max_aspect)
    print(f"model: {source}; data: {data} ({args.format}); threads: {torch.get_num_threads()}")
    print(format_table(out["rows"]))
    for k, v in out["summary"].items():
        print(f"{k}: {v}")
    path = write_result("bench_native_eval" + ("_quick" if args.quick else ""),
                        {"config": {**vars(args), "model": source, "data": str(data)}, **out},
                        args.results_dir, command=command_line("benchmarks.bench_native_eval", argv))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
