"""Top-1/top-5 on the val split at several resolutions without fine-tuning (the paper's resolution experiment).

Distributed: each rank scores its share of the val split; the eval loader pads so every rank runs the same
number of batches (ZeRO-3 forwards are collective) and padding carries label -1, which is ignored. Counts are
summed over ranks, so every val sample is counted exactly once.

Standalone, over a DeepSpeed checkpoint (any ZeRO stage) or an exported ``.safetensors``::

    python -m pipeline.evaluate runs/demo --data runs/demo/data --resolutions 64 96 128
    torchrun --nproc_per_node 2 -m pipeline.evaluate runs/demo/export/model.safetensors --data DATA
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], data_cfg, *, resolutions: Sequence[int],
             rank: int, world_size: int, crop_pct: float, device: torch.device,
             input_dtype: torch.dtype = torch.float32, max_batches: int | None = None,
             aug_cfg=None) -> dict[int, dict[str, float]]:
    """``{resolution: {"top1": %, "top5": %, "loss": mean CE, "n": samples}}`` summed over all ranks."""
    from pipeline.data.loader import build_eval_loader
    from pipeline.distributed import all_reduce_sum

    results: dict[int, dict[str, float]] = {}
    for res in sorted(set(int(r) for r in resolutions)):
        loader = build_eval_loader(data_cfg, resolution=res, rank=rank, world_size=world_size, crop_pct=crop_pct,
                                   aug_cfg=aug_cfg)
        sums = torch.zeros(4, dtype=torch.float64)  # correct1, correct5, loss_sum, count
        for i, (images, labels) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            images = images.to(device=device, dtype=input_dtype, non_blocking=True)
            labels = labels.to(device)
            logits = forward(images).float()
            keep = labels >= 0
            if keep.any():
                lg, lb = logits[keep], labels[keep]
                top5 = lg.topk(min(5, lg.shape[1]), dim=1).indices
                hit = top5 == lb[:, None]
                sums += torch.tensor([hit[:, 0].sum().item(), hit.any(dim=1).sum().item(),
                                      torch.nn.functional.cross_entropy(lg, lb, reduction="sum").item(),
                                      keep.sum().item()], dtype=torch.float64)
        c1, c5, loss, n = all_reduce_sum(sums.tolist())
        if max_batches is None and int(n) != int(loader.num_samples):
            raise RuntimeError(f"eval at {res}px counted {int(n)} samples, the val split has {loader.num_samples}")
        results[res] = {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1),
                        "loss": loss / max(n, 1), "n": int(n)}
    return results


def format_table(results: dict[int, dict[str, float]], train_res: int | None = None) -> str:
    lines = ["resolution  top-1   top-5   samples"]
    for res in sorted(results):
        r = results[res]
        mark = "  (train)" if res == train_res else ""
        lines.append(f"{res:>10}  {r['top1']:6.2f}  {r['top5']:6.2f}  {r['n']:>7}{mark}")
    return "\n".join(lines)


def load_model(path: str | Path):
    """A plain fp32 timm model from an export (.safetensors) or a DeepSpeed checkpoint / run dir."""
    import timm

    import pipeline.models  # noqa: F401
    from pipeline import export as export_mod

    path = Path(path)
    if path.suffix == ".safetensors":
        model, meta = export_mod.load_export(path)
        return model, meta["model"]
    ckpt = export_mod.resolve_checkpoint(path)
    name, kwargs = export_mod.checkpoint_model_spec(ckpt)
    model = timm.create_model(name, **kwargs)
    model.load_state_dict(export_mod.consolidated_state_dict(ckpt))
    return model, name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="export .safetensors, checkpoint folder (step_*) or run dir")
    p.add_argument("--data", required=True, help="data_prep output root")
    p.add_argument("--format", default="wds", choices=["wds", "ffcv"])
    p.add_argument("--resolutions", type=int, nargs="+", default=[160, 224, 288, 384])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--crop-pct", type=float, default=0.875)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    from pipeline.config import from_dict
    from pipeline.data.config import DataConfig

    data_cfg = from_dict(DataConfig, {"format": args.format, "root": args.data, "eval_batch_size": args.batch_size,
                                      "num_workers": args.workers}, prefix="data.")
    from pipeline.distributed import destroy, detect_env, device as current_device, init_distributed

    env = detect_env()  # torchrun / deepspeed / SLURM variables, or a single process
    rank, world_size = env.rank, env.world_size
    if world_size > 1:
        init_distributed()
    device = current_device()
    model, name = load_model(args.model)
    model.to(device).eval()
    results = evaluate(model, data_cfg, resolutions=args.resolutions, rank=rank, world_size=world_size,
                       crop_pct=args.crop_pct, device=device)
    if rank == 0:
        print(f"{name} from {args.model}")
        print(format_table(results))
        if args.json:
            Path(args.json).write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
