"""Progressive resolution: training wall-clock per resolution, and a progressive schedule vs a fixed one.

Two real training runs of ``python -m pipeline.train`` on a small demo dataset, same model, data, batch size,
epochs (hence the same number of optimizer steps) and final evaluation resolution:

* ``fixed``       - every epoch at the final resolution (224 on a GPU; scaled down on a CPU),
* ``progressive`` - low resolutions first (FFCV / Composer style), the last epochs at the final resolution.

Per-step times come from the runs' own MLflow metrics (``time/compute_ms`` + ``time/data_wait_ms`` logged every
step, grouped by ``train/resolution``), giving the wall-clock of one epoch-equivalent at each resolution; the
runs' ``wall_time_s`` (training loop incl. evaluation and checkpoints) gives the end-to-end ratio. Top-1 at
the final resolution is reported for both (on a few demo images after a few epochs this is a smoke number,
not a claim). With ``--repeats 2`` the two runs alternate (fixed, progressive, progressive, fixed) to cancel
drift from other load on the machine.

    python -m benchmarks.bench_progressive [--resolutions 64 96 128] [--epochs 4]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from benchmarks.common import ROOT, add_common_args, format_table, write_result


def progressive_steps(resolutions: Sequence[int], epochs: int) -> list[list[int]]:
    """``[[epoch, res], ...]``: one epoch per low resolution, the remaining epochs at the last (final) one."""
    if epochs < len(resolutions):
        raise ValueError(f"epochs: {epochs} must be >= the number of resolutions {list(resolutions)}")
    return [[i, int(r)] for i, r in enumerate(resolutions)]


def make_data(root: Path, num_classes: int, per_class: int) -> Path:
    from data_prep.demo_dataset import make_demo_dataset
    from data_prep.write_webdataset import write_webdataset

    make_demo_dataset(root / "src", num_classes=num_classes, train_per_class=per_class,
                      val_per_class=max(2, per_class // 4), min_side=48, max_side=160, large_images=0,
                      bad_files=False, val_layout="folders", seed=0)
    write_webdataset(root / "src", root / "data", workers=1, progress=False)
    return root / "data"


def ds_config_path(tmp: Path, bf16: bool) -> str:
    """The project's ZeRO-2 config, with bf16 switched off on CPUs without native bf16 (it is 2-3x slower
    there, which would dominate what this benchmark is about)."""
    cfg = json.loads((ROOT / "deepspeed_configs" / "zero2_bf16.json").read_text())
    cfg["bf16"] = {"enabled": bf16}
    path = tmp / "zero2.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def train_once(kind: str, *, data: Path, run_dir: Path, ds_config: str, model: str, epochs: int, batch: int,
               resolutions: Sequence[int], model_kwargs: str | None) -> dict[str, Any]:
    schedule = (["schedule.resolution.kind=fixed", f"schedule.resolution.resolution={resolutions[-1]}"]
                if kind == "fixed" else
                ["schedule.resolution.kind=steps",
                 f"schedule.resolution.steps={progressive_steps(resolutions, epochs)}"])
    argv = ["--model", model, "--data", str(data), "--run-dir", str(run_dir), "--deepspeed_config", ds_config,
            f"run.epochs={epochs}", f"data.batch_size={batch}", "data.eval_batch_size=32", "data.num_workers=1",
            "eval.every_epochs=0", "eval.resolutions=[]", "run.log_every=1", "tracking.system_metrics=false",
            "checkpoint.keep_last=1", "checkpoint.keep_best=false", "schedule.lr.warmup_epochs=1",
            "schedule.lr.lr=1e-3", "schedule.lr.ref_batch=16", "model.drop_path_rate=0.0", *schedule]
    if model_kwargs:
        argv.append(f"model.kwargs={model_kwargs}")
    # Its own process per run: DeepSpeed caches process groups module-wide, so a second engine in the same
    # process after destroy_process_group() fails; a process per run is also how the trainer is used.
    log = run_dir.with_suffix(".log")
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "pipeline.train", *argv], cwd=ROOT, stdout=f,
                            stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"{kind} training run failed (exit {rc}):\n{tail}")
    out = json.loads((run_dir / "final_metrics.json").read_text())
    return dict(out, step_times=step_times(run_dir, out["mlflow_run_id"]))


def step_times(run_dir: Path, run_id: str) -> dict[int, list[float]]:
    """{resolution: [seconds per optimizer step, ...]} from the run's MLflow metric history."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{Path(run_dir).resolve()}/mlflow.db")
    hist = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)}
            for k in ("train/resolution", "time/compute_ms", "time/data_wait_ms")}
    out: dict[int, list[float]] = {}
    for step, res in sorted(hist["train/resolution"].items()):
        out.setdefault(int(res), []).append((hist["time/compute_ms"][step] + hist["time/data_wait_ms"][step]) / 1000)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cpvt_ti")
    p.add_argument("--model-kwargs", default=None if on_gpu else "{embed_dim: 96, depth: 4, num_heads: 3}",
                   help="YAML mapping passed as model.kwargs (CPU default: the narrow CPVT-Ti of `make demo`)")
    p.add_argument("--resolutions", nargs="+", type=int, default=[128, 160, 192, 224] if on_gpu else [64, 96, 128],
                   help="progressive resolutions; the last is the fixed run's and the final eval resolution")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64 if on_gpu else 8)
    p.add_argument("--classes", type=int, default=10 if on_gpu else 4)
    p.add_argument("--per-class", type=int, default=200 if on_gpu else 8)
    p.add_argument("--repeats", type=int, default=1, help="2: alternate the runs (fixed, prog, prog, fixed)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=on_gpu, help="bf16 (default: on GPU only)")
    add_common_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.resolutions, args.classes, args.per_class, args.batch_size = [32, 48], 3, 4, 4
        args.model_kwargs = args.model_kwargs or "{embed_dim: 48, depth: 3, num_heads: 2}"
    epochs = args.epochs or len(args.resolutions) + 1
    order = ["fixed", "progressive"] + (["progressive", "fixed"] if args.repeats > 1 else [])
    runs: dict[str, list[dict[str, Any]]] = {"fixed": [], "progressive": []}
    with tempfile.TemporaryDirectory(prefix="bench_progressive_") as tmp:
        tmp = Path(tmp)
        data = make_data(tmp, args.classes, args.per_class)
        ds = ds_config_path(tmp, args.bf16)
        for i, kind in enumerate(order):
            runs[kind].append(train_once(kind, data=data, run_dir=tmp / f"{kind}_{i}", ds_config=ds, model=args.model,
                                         epochs=epochs, batch=args.batch_size, resolutions=args.resolutions,
                                         model_kwargs=args.model_kwargs))
    final = args.resolutions[-1]
    steps_per_epoch = runs["fixed"][0]["global_step"] // epochs
    # seconds per step at each resolution: median over every step at that resolution in every run
    per_res: dict[int, list[float]] = {}
    for kind in runs:
        for r in runs[kind]:
            for res, ts in r["step_times"].items():
                per_res.setdefault(res, []).extend(ts[1:] if len(ts) > 1 else ts)  # first step: warm-up
    res_rows = [{"resolution": res, "step_s": statistics.median(ts), "epoch_s": statistics.median(ts) * steps_per_epoch,
                 "epoch_vs_final": statistics.median(ts) / statistics.median(per_res[final])}
                for res, ts in sorted(per_res.items())]
    kinds = {}
    for kind, rs in runs.items():
        loop = [sum(sum(ts) for ts in r["step_times"].values()) for r in rs]
        kinds[kind] = {"steps": rs[0]["global_step"], "train_steps_s": statistics.median(loop),
                       "wall_time_s": statistics.median(r["wall_time_s"] for r in rs),
                       f"top1_at_{final}": statistics.median(r["eval"][str(final)]["top1"] for r in rs)}
    print(format_table(res_rows, floatfmt="{:.3g}"))
    print(format_table([{"run": k, **v} for k, v in kinds.items()], floatfmt="{:.3g}"))
    ratio_steps = kinds["progressive"]["train_steps_s"] / kinds["fixed"]["train_steps_s"]
    ratio_wall = kinds["progressive"]["wall_time_s"] / kinds["fixed"]["wall_time_s"]
    summary = {f"epoch time {r['resolution']}px / {final}px": round(r["epoch_vs_final"], 3) for r in res_rows}
    summary.update({"progressive / fixed train-step time": round(ratio_steps, 3),
                    "progressive / fixed wall time (incl. eval+ckpt)": round(ratio_wall, 3),
                    f"top1@{final} fixed vs progressive": f"{kinds['fixed'][f'top1_at_{final}']:.1f} vs "
                                                          f"{kinds['progressive'][f'top1_at_{final}']:.1f}"})
    payload = {"model": args.model, "model_kwargs": args.model_kwargs, "resolutions": args.resolutions,
               "epochs": epochs, "batch_size": args.batch_size, "bf16": args.bf16, "steps_per_epoch": steps_per_epoch,
               "schedule": progressive_steps(args.resolutions, epochs), "per_resolution": res_rows, "runs": kinds,
               "order": order, "summary": summary}
    path = write_result("bench_progressive" + ("_quick" if args.quick else ""), payload, args.results_dir)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
