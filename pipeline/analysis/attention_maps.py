"""Attention maps (the paper's RQ5 figure): where does each head look, with and without explicit positions?

For a few images and chosen blocks, each head's attention over the patch grid is taken from
``model.get_attention_maps`` -- the class token's attention row for class-token models, or the mean over all
query tokens for GAP models -- reshaped to the (H/16, W/16) grid and plotted side by side for two (or more)
runs: one row per (image, run), first column the input image, then one column per (layer, head).

    python -m pipeline.analysis.attention_maps --checkpoint runs/cpvt runs/learned_pe --label CPVT DeiT-PE \\
        --data runs/demo/data --layers 0 5 11 --num-images 2 --out runs/demo/analysis/attention.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from pipeline.analysis.common import (add_mlflow_args, analysis_device, denormalize, eval_batches, load_model,
                                      log_to_mlflow, run_labels)
from pipeline.device import autocast


@torch.no_grad()
def patch_attention(model: torch.nn.Module, images: torch.Tensor, layers: Sequence[int]) -> dict[int, np.ndarray]:
    """{layer: float32 array (B, heads, H/p, W/p)} whose [b, h] map sums to <= 1 over the patch grid.

    Class-token models: the class token's attention row restricted to patch keys. GAP models (no prefix token):
    the attention averaged over all queries. Negative layer indices count from the end.
    """
    model.eval()
    p = model.patch_size
    gh, gw = images.shape[-2] // p, images.shape[-1] // p
    npt = getattr(model, "num_prefix_tokens", 1 if getattr(model, "global_pool", "token") == "token" else 0)
    maps = model.get_attention_maps(images, layers)
    depth = len(model.blocks)
    out = {}
    for layer in layers:
        a = maps[layer % depth].float()  # (B, heads, N, N)
        rows = a[:, :, 0, npt:] if npt > 0 else a[:, :, :, npt:].mean(dim=2)  # (B, heads, H*W)
        out[int(layer)] = rows.reshape(a.shape[0], a.shape[1], gh, gw).cpu().numpy()
    return out


def plot_attention_comparison(images: np.ndarray, runs: Mapping[str, Mapping[int, np.ndarray]], out: str | Path,
                              title: str | None = None) -> dict[str, Any]:
    """Grid PNG; ``images`` (B, H, W, 3) in [0, 1]; ``runs`` = {label: {layer: (B, heads, gh, gw)}}.

    Returns the data plotted: {"labels", "layers", "heads", "panels": {(image, label, layer, head): 2-D array},
    "images"} so tests can check what is drawn without reading pixels."""
    labels = list(runs)
    layers = list(next(iter(runs.values())))
    heads = {label: next(iter(runs[label].values())).shape[1] for label in labels}
    max_heads = max(heads.values())
    n_img = images.shape[0]
    ncols = 1 + len(layers) * max_heads
    nrows = n_img * len(labels)
    fig = Figure(figsize=(1.6 * ncols, 1.7 * nrows), dpi=100)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    panels: dict[tuple[int, str, int, int], np.ndarray] = {}
    for b in range(n_img):
        for j, label in enumerate(labels):
            row = b * len(labels) + j
            ax = axes[row, 0]
            ax.imshow(images[b])
            ax.set_ylabel(f"img {b}\n{label}", fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
            for li, layer in enumerate(layers):
                for h in range(max_heads):
                    ax = axes[row, 1 + li * max_heads + h]
                    ax.set_xticks([]), ax.set_yticks([])
                    if h >= heads[label]:
                        ax.axis("off")
                        continue
                    m = runs[label][layer][b, h]
                    ax.imshow(m, cmap="inferno", interpolation="nearest")
                    panels[(b, label, layer, h)] = m
                    if row == 0:
                        ax.set_title(f"layer {layer} head {h}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return {"labels": labels, "layers": layers, "heads": heads, "panels": panels, "images": images}


def attention_stats(maps: Mapping[int, np.ndarray]) -> dict[int, dict[str, float]]:
    """Per layer: mean attention entropy (nats) over images and heads, and mean distance (in patches) of the
    attended location from the grid centre -- a compact number for 'local vs global' attention."""
    stats = {}
    for layer, a in maps.items():
        gh, gw = a.shape[-2:]
        p = a / np.clip(a.sum(axis=(-2, -1), keepdims=True), 1e-12, None)
        ent = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=(-2, -1))
        yy, xx = np.mgrid[0:gh, 0:gw]
        dist = np.sqrt((yy - (gh - 1) / 2) ** 2 + (xx - (gw - 1) / 2) ** 2)
        stats[int(layer)] = {"entropy": float(ent.mean()),
                             "mean_dist_from_centre": float((p * dist).sum(axis=(-2, -1)).mean())}
    return stats


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", nargs="+", required=True, help="export .safetensors, checkpoint dir or run dir")
    p.add_argument("--label", nargs="+", default=None)
    p.add_argument("--data", required=True, help="data_prep output root (the first val images are used)")
    p.add_argument("--format", default="wds", choices=["wds", "ffcv"])
    p.add_argument("--layers", nargs="+", type=int, default=[0, 5, 11])
    p.add_argument("--num-images", type=int, default=2)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--out", default="attention.png", help="PNG path; a .json of per-layer stats goes next to it")
    add_mlflow_args(p)
    args = p.parse_args(argv)
    labels = run_labels(p, args.label, args.checkpoint)

    images, _ = next(iter(eval_batches(args.data, args.res, fmt=args.format, batch_size=args.num_images,
                                       max_batches=1)))
    images = images[: args.num_images].float()
    runs, stats = {}, {}
    device = analysis_device()
    for i, ckpt in enumerate(args.checkpoint):
        model, meta = load_model(ckpt, device)
        label = labels[i] if labels else f"{meta['model']}#{i}"
        with autocast(device):
            runs[label] = patch_attention(model, images.to(device), args.layers)
        stats[label] = attention_stats(runs[label])
    out = Path(args.out)
    plotted = plot_attention_comparison(denormalize(images).numpy(), runs, out,
                                        title="class-token (or mean-query) attention per head")
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps({"checkpoints": args.checkpoint, "layers": args.layers, "stats": stats}, indent=2))
    for label, s in stats.items():
        print(label, {k: {n: round(v, 3) for n, v in d.items()} for k, d in s.items()})
    run_id = log_to_mlflow(run_id=args.mlflow_run_id, experiment=args.mlflow_experiment,
                           tracking_uri=args.tracking_uri, artifacts=[out, json_path], run_name="attention-maps")
    print(f"wrote {out} and {json_path}" + (f"; logged to MLflow run {run_id}" if run_id else ""))
    return {"maps": runs, "stats": stats, "plotted": plotted, "png": str(out), "mlflow_run_id": run_id}


if __name__ == "__main__":
    main()
