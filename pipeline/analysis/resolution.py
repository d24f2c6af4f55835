"""Resolution generalisation: evaluate trained models at several test resolutions without fine-tuning.

The paper's claim: a PEG generalises to larger inputs (CPVT-Ti 72.4 -> 73.2 top-1 from 224 to 384) while an
interpolated learned position embedding loses accuracy (DeiT-tiny 72.2 -> 71.2). This command produces the
same table and an accuracy-vs-resolution PNG for one or more checkpoints (e.g. a CPVT run and the
``learned_pe`` ablation run), optionally logged to MLflow.

Each checkpoint is scored in both evaluation modes by default (``--modes``): ``center_crop`` (the paper's
protocol) and ``native`` (the whole image at its aspect bucket, short side = the test resolution; see
:mod:`pipeline.data.aspect_buckets`), side by side in the table, the PNG (native: dotted) and the MLflow metrics
(``res_top1_<r>`` and ``res_top1_native_<r>``). A learned-PE model (the ``learned_pe`` ablation) is evaluated the
same way: its table is resampled to each bucket's token grid (``CPVT._pos_embed``).

    python -m pipeline.analysis.resolution --checkpoint runs/demo --data runs/demo/data \\
        --resolutions 160 224 288 384 --out runs/demo/analysis/resolution.png
    python -m pipeline.analysis.resolution --checkpoint runs/ablations/peg_pos_0 runs/ablations/learned_pe \\
        --label CPVT-Ti DeiT-style --data DATA --modes center_crop native
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from pipeline.analysis.common import add_mlflow_args, analysis_device, load_model, log_to_mlflow, run_labels
from pipeline.config import EVAL_RESOLUTIONS, AugConfig, DataConfig, from_dict
from pipeline.device import autocast_forward
from pipeline.evaluate import evaluate

# Paper (ImageNet, trained at 224, no fine-tuning; secondary source): top-1 per test resolution.
PAPER_TOP1 = {
    "DeiT-tiny": {224: 72.2, 384: 71.2, 448: 68.8, 512: 65.9},
    "CPVT-Ti": {224: 72.4, 384: 73.2, 448: 71.8, 512: 70.3},
    "DeiT-small": {224: 79.9, 384: 78.1, 448: 75.9, 512: 72.6},
    "CPVT-S": {224: 79.9, 384: 80.4, 448: 78.6, 512: 76.8},
}


def evaluate_resolutions(model: torch.nn.Module, data_root: str | Path, resolutions: Sequence[int], *,
                         fmt: str = "wds", batch_size: int = 64, num_workers: int = 0, crop_pct: float | None = None,
                         max_batches: int | None = None, mode: str = "center_crop",
                         max_aspect: float = 2.0) -> dict[int, dict[str, float]]:
    """{resolution: {"top1", "top5", "loss", "n", "tokens"}} of ``model`` on the val split (single process),
    through the trainer's own :func:`pipeline.evaluate.evaluate` so the numbers match the ones logged during
    training; ``mode``: ``center_crop`` or ``native``."""
    patch = getattr(model, "patch_size", 16)
    bad = [r for r in resolutions if r % patch]
    if bad:
        raise ValueError(f"resolutions: {bad} are not multiples of the patch size {patch}")
    data_cfg = from_dict(DataConfig, {"format": fmt, "root": str(data_root), "eval_batch_size": batch_size,
                                      "num_workers": num_workers}, prefix="data.")
    model.eval()
    device = next(model.parameters()).device
    results = evaluate(autocast_forward(model, device), data_cfg, resolutions=resolutions, rank=0, world_size=1,
                       crop_pct=AugConfig().crop_pct if crop_pct is None else crop_pct,
                       device=device, max_batches=max_batches, mode=mode, patch_size=patch, max_aspect=max_aspect)
    return {int(r): results[int(r)] for r in resolutions}


def plot_resolution_curves(curves: Mapping[str, Mapping[int, Mapping[str, float]]], out: str | Path,
                           train_res: int | None = 224, title: str = "top-1 vs test resolution (no fine-tuning)",
                           native: Mapping[str, Mapping[int, Mapping[str, float]]] | None = None
                           ) -> dict[str, dict[str, list]]:
    """PNG with one top-1 line (solid) and top-5 line (dashed) per run, plus a dotted native-aspect top-1 line
    per run in ``native``. Returns exactly the plotted data: {label: {"resolution": [...], "top1": [...],
    "top5": [...]}} (+ "native_resolution", "native_top1" for runs in ``native``)."""
    # local: the trainer draws this figure at the end of a run; matplotlib stays out of its import chain
    from matplotlib.figure import Figure

    plotted: dict[str, dict[str, list]] = {}
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    for i, (label, res_map) in enumerate(curves.items()):
        res = sorted(int(r) for r in res_map)
        data = {"resolution": res, "top1": [float(res_map[r]["top1"]) for r in res],
                "top5": [float(res_map[r]["top5"]) for r in res if "top5" in res_map[r]]}
        color = f"C{i}"
        ax.plot(res, data["top1"], "o-", color=color, label=f"{label} top-1")
        if len(data["top5"]) == len(res):
            ax.plot(res, data["top5"], "s--", color=color, alpha=0.6, label=f"{label} top-5")
        if native and label in native:
            nres = sorted(int(r) for r in native[label])
            data["native_resolution"] = nres
            data["native_top1"] = [float(native[label][r]["top1"]) for r in nres]
            ax.plot(nres, data["native_top1"], "x:", color=color, label=f"{label} top-1 native")
        plotted[label] = data
    if train_res is not None:
        ax.axvline(train_res, color="grey", lw=0.8, ls=":", label=f"train res {train_res}")
    ax.set_xlabel("test resolution (px)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return plotted


def format_table(curves: Mapping[str, Mapping[int, Mapping[str, float]]],
                 native: Mapping[str, Mapping[int, Mapping[str, float]]] | None = None) -> str:
    """Markdown top-1 table, one row per run; with ``native``, a center-crop and a native column per test
    resolution side by side (``224 crop | 224 native``)."""
    res = sorted({int(r) for m in (*curves.values(), *(native or {}).values()) for r in m})

    def cell(m, r):
        return f"{m[r]['top1']:.1f}" if m and r in m else ""

    if native:
        head = [h for r in res for h in (f"{r} crop", f"{r} native")]
        lines = ["| run | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
        for label in dict.fromkeys([*curves, *native]):
            m, n = curves.get(label, {}), native.get(label, {})
            lines.append(f"| {label} | " + " | ".join(c for r in res for c in (cell(m, r), cell(n, r))) + " |")
    else:
        lines = ["| run | " + " | ".join(str(r) for r in res) + " |", "|---|" + "---|" * len(res)]
        for label, m in curves.items():
            lines.append(f"| {label} | " + " | ".join(cell(m, r) for r in res) + " |")
    lines.append("paper (ImageNet, center crop, top-1):")
    for label, m in PAPER_TOP1.items():
        lines.append(f"| {label} | " + " | ".join(f"{m[r]:.1f}" if r in m else "" for r in res) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", nargs="+", required=True, help="export .safetensors, checkpoint dir or run dir")
    p.add_argument("--label", nargs="+", default=None, help="one label per checkpoint (default: model name)")
    p.add_argument("--data", required=True, help="data_prep output root")
    p.add_argument("--format", default="wds", choices=["wds", "ffcv"])
    p.add_argument("--resolutions", nargs="+", type=int, default=list(EVAL_RESOLUTIONS))
    p.add_argument("--train-res", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--crop-pct", type=float, default=None, help="eval center-crop fraction (default: aug.crop_pct)")
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--modes", nargs="+", choices=["center_crop", "native"], default=["center_crop", "native"],
                   help="evaluation modes, reported side by side (default: both)")
    p.add_argument("--max-aspect", type=float, default=2.0, help="native mode: long side <= this x short side")
    p.add_argument("--out", default="resolution.png", help="PNG path; a .json with the data goes next to it")
    add_mlflow_args(p)
    args = p.parse_args(argv)
    labels = run_labels(p, args.label, args.checkpoint)

    by_mode: dict[str, dict[str, dict[int, dict[str, float]]]] = {m: {} for m in dict.fromkeys(args.modes)}
    device = analysis_device()
    for i, ckpt in enumerate(args.checkpoint):
        model, meta = load_model(ckpt, device)
        label = labels[i] if labels else meta["model"] + (f"#{i}" if len(args.checkpoint) > 1 else "")
        for mode, curves in by_mode.items():
            curves[label] = evaluate_resolutions(model, args.data, args.resolutions, fmt=args.format,
                                                 batch_size=args.batch_size, num_workers=args.workers,
                                                 crop_pct=args.crop_pct, max_batches=args.max_batches, mode=mode,
                                                 max_aspect=args.max_aspect)
    curves, native = (by_mode["center_crop"], by_mode.get("native")) if "center_crop" in by_mode \
        else (by_mode["native"], None)   # native only: its numbers are the main lines
    out = Path(args.out)
    plotted = plot_resolution_curves(curves, out, train_res=args.train_res, native=native)
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps({"curves": {k: {str(r): v for r, v in m.items()} for k, m in curves.items()},
                                     "native_curves": {k: {str(r): v for r, v in m.items()}
                                                       for k, m in (native or {}).items()},
                                     "native_max_aspect": args.max_aspect,
                                     "checkpoints": args.checkpoint, "paper_top1": PAPER_TOP1}, indent=2))
    print(format_table(curves, native))
    metrics = {}
    for mode, mode_curves in by_mode.items():
        tag = "native_" if mode == "native" else ""
        for label, m in mode_curves.items():
            suffix = "" if len(mode_curves) == 1 else "_" + re.sub(r"[^\w\-./]", "_", label)
            metrics.update({f"res_top1_{tag}{r}{suffix}": v["top1"] for r, v in m.items()})
    run_id = log_to_mlflow(run_id=args.mlflow_run_id, experiment=args.mlflow_experiment,
                           tracking_uri=args.tracking_uri, metrics=metrics, artifacts=[out, json_path],
                           run_name="resolution-analysis")
    print(f"wrote {out} and {json_path}" + (f"; logged to MLflow run {run_id}" if run_id else ""))
    return {"curves": curves, "native_curves": native, "plotted": plotted, "png": str(out), "json": str(json_path),
            "mlflow_run_id": run_id}


if __name__ == "__main__":
    main()
    sys.exit(0)
