"""Progressive resolution: one epoch-equivalent at each resolution, and a progressive schedule vs a fixed one.

Both parts train the same configuration -- model, optimizer, augmentation, the project's WebDataset training
loader over a small demo dataset that data_prep writes into a temporary directory -- built from one list of
trainer overrides (:func:`train_overrides`):

1. **Per resolution, interleaved in this process.** The model (on CPU a narrow CPVT-Ti:
   ``cpvt_ti`` with ``embed_dim=96, depth=4, num_heads=3``; on GPU the full ``cpvt_ti``), AdamW with DeiT's
   parameter groups and :func:`pipeline.data.loader.build_train_loader`. One timed call is one loader epoch at
   one resolution (``set_epoch`` + every batch of the epoch, loader start-up included, as in the trainer),
   each step a full training step: next batch + forward + loss + backward + gradient clipping + optimizer
   step. :func:`benchmarks.common.measure_interleaved` runs one untimed warm-up epoch per resolution, then
   ``--rounds`` rounds with the resolution order rotated each round; medians per resolution. Reported:
   seconds per step, seconds per epoch (steps per epoch x step), the epoch time relative to the final
   resolution and, for reference, the pixel ratio ``(res / final)^2``.
2. **Full schedule, end to end.** Real ``python -m pipeline.train`` runs (a process each, DeepSpeed ZeRO-2):
   ``fixed`` (every epoch at the final resolution: 224 on a GPU, scaled down on a CPU) and ``progressive``
   (one epoch at each lower resolution, the remaining epochs at the final one), same epochs and batch size,
   hence the same number of optimizer steps. ``--pairs 2`` (default) runs fixed, progressive, progressive,
   fixed to cancel drift from other load; medians per kind. Reported: train-step time (data wait + compute of
   every step, from the runs' MLflow metrics, logged once per epoch), wall time of the training loop (also
   the per-epoch checkpoints and the final evaluation, the same in both), their progressive / fixed ratios,
   and the ratio *predicted* by part 1: sum over the progressive schedule's epochs of the per-resolution
   epoch time / (epochs x final-resolution epoch time). The per-resolution table also shows the train time
   of the epochs at each resolution inside these runs (``epoch_s_in_runs``). Expect agreement within a few
   percent, not equality: the runs are only alternated, not interleaved epoch by epoch; the progressive
   run's low-resolution epochs are its first ones (no warm-up); part 1 steps a plain torch AdamW where the
   runs step a DeepSpeed ZeRO-2 engine. Top-1 at the final resolution is reported for both: after a few
   epochs on a few hundred demo images it is a smoke number, not an accuracy claim.

On a CPU everything runs with one compute thread (``--threads 1``) beside the loader's one worker process:
that fills a 2-core machine, and two OpenMP threads stall for seconds per step whenever another process
competes for the cores. Augmentation is the ``make demo`` recipe's (no RandAugment, Mixup/CutMix or random
erasing), so that a few epochs learn something.

    python -m benchmarks.bench_progressive [--resolutions 64 96 128] [--epochs 4] [--rounds 7] [--pairs 2]

Results: ``benchmarks/results/bench_progressive.json`` (``bench_progressive_quick.json`` with ``--quick``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from benchmarks.common import (ROOT, Timing, add_common_args, command_line, format_table, measure_interleaved,
                               paired_ratios, ratio, ratio_spread, write_result)

# the augmentation of pipeline/recipes/demo.yaml
DEMO_AUG = ["aug.auto_augment=null", "aug.reprob=0.0", "aug.mixup=0.0", "aug.cutmix=0.0", "aug.smoothing=0.1",
            "aug.scale=[0.35, 1.0]"]


def progressive_steps(resolutions: Sequence[int], epochs: int) -> list[list[int]]:
    """``[[epoch, res], ...]``: one epoch per low resolution, the remaining epochs at the last (final) one."""
    if epochs < len(resolutions):
        raise ValueError(f"epochs: {epochs} must be >= the number of resolutions {list(resolutions)}")
    return [[i, int(r)] for i, r in enumerate(resolutions)]


def epoch_resolutions(resolutions: Sequence[int], epochs: int) -> list[int]:
    """The resolution of every epoch of the progressive schedule (:func:`progressive_steps`)."""
    return [int(r) for r in resolutions] + [int(resolutions[-1])] * (epochs - len(resolutions))


def predicted_ratio(epoch_s: dict[int, float], resolutions: Sequence[int], epochs: int) -> float:
    """Progressive / fixed train time predicted from per-resolution epoch times."""
    return sum(epoch_s[r] for r in epoch_resolutions(resolutions, epochs)) / (epochs * epoch_s[resolutions[-1]])


def make_data(root: Path, num_classes: int, per_class: int, max_side: int) -> Path:
    from data_prep.demo_dataset import make_demo_dataset
    from data_prep.write_webdataset import write_webdataset

    make_demo_dataset(root / "src", num_classes=num_classes, train_per_class=per_class,
                      val_per_class=max(2, per_class // 4), min_side=48, max_side=max_side, large_images=0,
                      bad_files=False, val_layout="folders", seed=0)
    write_webdataset(root / "src", root / "data", workers=1, progress=False)
    return root / "data"


def ds_config_path(tmp: Path, bf16: bool) -> str:
    """The project's precision-neutral ZeRO-2 config with bf16 explicitly on or off (off on CPUs without native
    bf16: emulated bf16 is many times slower there, which would dominate what this benchmark is about)."""
    cfg = json.loads((ROOT / "deepspeed_configs" / "zero2.json").read_text())
    cfg["bf16"] = {"enabled": bf16}
    path = tmp / "zero2.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def train_overrides(*, data: Path, ds_config: str, model: str, model_kwargs: dict[str, Any], batch: int,
                    epochs: int) -> list[str]:
    """Trainer config overrides shared by part 1 (built in this process) and every training run of part 2."""
    return [f"model.name={model}", f"model.kwargs={json.dumps(model_kwargs)}", "model.drop_path_rate=0.0",
            f"data.root={data}", "data.format=wds", f"data.batch_size={batch}", "data.eval_batch_size=32",
            "data.num_workers=1", *DEMO_AUG, f"run.epochs={epochs}", f"run.deepspeed_config={ds_config}",
            "schedule.lr.lr=1e-3", f"schedule.lr.ref_batch={batch}", "schedule.lr.warmup_epochs=1",
            "eval.every_epochs=0", "eval.resolutions=[]", "tracking.system_metrics=false",
            "checkpoint.keep_last=1", "checkpoint.keep_best=false"]


# ----------------------------------------------------------------------------------------- part 1
def time_resolutions(overrides: list[str], resolutions: Sequence[int], *, rounds: int,
                     device: torch.device) -> tuple[dict[int, Timing], int]:
    """({resolution: seconds per loader epoch}, steps per epoch): every resolution interleaved, see part 1."""
    import timm
    from timm.loss import LabelSmoothingCrossEntropy

    import pipeline.models  # noqa: F401 - registers cpvt_* in timm
    from pipeline.data.loader import build_train_loader
    from pipeline.optim import build_optimizer
    from pipeline.config import load_train_config, precision
    from pipeline.data.shard_index import read_num_classes

    cfg, ds = load_train_config(None, overrides)
    num_classes = read_num_classes(cfg)
    dtype = torch.bfloat16 if precision(ds) == "bf16" else torch.float32
    torch.manual_seed(cfg.run.seed)
    model = timm.create_model(cfg.model.name, **cfg.model.create_kwargs(num_classes)).to(device, dtype).train()
    optimizer = build_optimizer(model, cfg.optim)
    for group in optimizer.param_groups:
        group["lr"] = cfg.schedule.lr.lr
    criterion = LabelSmoothingCrossEntropy(cfg.aug.smoothing)  # the trainer's loss without Mixup/CutMix
    loader = build_train_loader(cfg.data, cfg.aug, num_classes=num_classes, rank=0, world_size=1, seed=cfg.run.seed)
    epochs = itertools.count()

    def epoch_at(res: int):
        def run_epoch() -> None:
            loader.set_epoch(next(epochs), res)
            for images, targets in loader:
                loss = criterion(model(images.to(device, dtype)).float(), targets.to(device))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), ds["gradient_clipping"])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return run_epoch

    sync = torch.cuda.synchronize if device.type == "cuda" else None
    timings = measure_interleaved({str(r): epoch_at(r) for r in resolutions}, warmup=1, rounds=rounds, sync=sync)
    return {int(r): t for r, t in timings.items()}, len(loader)


# ----------------------------------------------------------------------------------------- part 2
def train_run(kind: str, run_dir: Path, *, overrides: list[str], resolutions: Sequence[int], epochs: int,
              steps_per_epoch: int, threads: int | None) -> dict[str, Any]:
    """One ``python -m pipeline.train`` run (``fixed`` or ``progressive``); its steps, times and final top-1."""
    schedule = (["schedule.resolution.kind=fixed", f"schedule.resolution.resolution={resolutions[-1]}"]
                if kind == "fixed" else
                ["schedule.resolution.kind=steps",
                 f"schedule.resolution.steps={progressive_steps(resolutions, epochs)}"])
    argv = [*overrides, f"run.run_dir={run_dir}", f"run.log_every={steps_per_epoch}",
            f"tracking.uri=sqlite:///{run_dir.resolve()}/mlflow.db", *schedule]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    # Its own process per run: DeepSpeed caches process groups module-wide, so a second engine in the same
    # process after destroy_process_group() fails; a process per run is also how the trainer is used.
    log = run_dir.with_suffix(".log")
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "pipeline.train", *argv], cwd=ROOT, env=env, stdout=f,
                            stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"{kind} training run failed (exit {rc}):\n{tail}")
    out = json.loads((run_dir / "final_metrics.json").read_text())
    per_epoch = epoch_train_times(run_dir, out["mlflow_run_id"], steps_per_epoch)
    return {"kind": kind, "steps": out["global_step"], "epoch_resolutions": [r for r, _ in per_epoch],
            "epoch_train_s": [s for _, s in per_epoch], "train_s": sum(s for _, s in per_epoch),
            "wall_time_s": out["wall_time_s"], "top1": out["eval"][str(resolutions[-1])]["top1"]}


def epoch_train_times(run_dir: Path, run_id: str, steps_per_epoch: int) -> list[tuple[int, float]]:
    """``[(resolution, seconds), ...]`` per epoch: data wait + compute of its steps, from the run's MLflow
    metrics (logged once per epoch, so each ``time/*_ms`` value is the mean over one epoch's steps)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{Path(run_dir).resolve()}/mlflow.db")
    hist = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)}
            for k in ("train/resolution", "time/compute_ms", "time/data_wait_ms")}
    return [(int(res), (hist["time/compute_ms"][step] + hist["time/data_wait_ms"][step]) * steps_per_epoch / 1000)
            for step, res in sorted(hist["train/resolution"].items())]


def run_order(pairs: int) -> list[str]:
    """Alternating pairs: fixed, progressive, progressive, fixed, fixed, ..."""
    return [kind for i in range(pairs) for kind in (("fixed", "progressive"), ("progressive", "fixed"))[i % 2]]


# ----------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cpvt_ti")
    p.add_argument("--model-kwargs", default=None,
                   help="YAML mapping passed as model.kwargs (default: none on GPU; on CPU a narrow CPVT-Ti, "
                        "{embed_dim: 96, depth: 4, num_heads: 3})")
    p.add_argument("--resolutions", nargs="+", type=int, default=[128, 160, 192, 224] if on_gpu else [64, 96, 128],
                   help="progressive resolutions; the last is the fixed run's and the final eval resolution")
    p.add_argument("--epochs", type=int, default=None, help="default: one more than the number of resolutions")
    p.add_argument("--batch-size", type=int, default=64 if on_gpu else 32)
    p.add_argument("--classes", type=int, default=10 if on_gpu else 4)
    p.add_argument("--per-class", type=int, default=200 if on_gpu else 64, help="training images per class")
    p.add_argument("--rounds", type=int, default=5 if on_gpu else 7, help="interleaved timed epochs per resolution")
    p.add_argument("--pairs", type=int, default=2, help="fixed/progressive run pairs, alternating (2: F P P F)")
    p.add_argument("--threads", type=int, default=None if on_gpu else 1,
                   help="torch compute threads, here and in the training runs (default: 1 on CPU)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=on_gpu, help="bf16 (default: on GPU only)")
    add_common_args(p)
    args = p.parse_args(argv)
    if args.pairs < 1:
        p.error(f"--pairs: {args.pairs} must be >= 1")
    if args.quick:
        args.resolutions, args.classes, args.per_class, args.batch_size = [32, 48], 3, 8, 8
        args.rounds, args.pairs = 2, 1
        args.model_kwargs = args.model_kwargs or "{embed_dim: 48, depth: 3, num_heads: 2}"
    if args.model_kwargs is None and not on_gpu:
        args.model_kwargs = "{embed_dim: 96, depth: 4, num_heads: 3}"
    model_kwargs = yaml.safe_load(args.model_kwargs or "{}")
    epochs = args.epochs or len(args.resolutions) + 1
    schedule = progressive_steps(args.resolutions, epochs)
    final = args.resolutions[-1]
    order = run_order(args.pairs)

    t0 = time.time()
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_progressive_") as tmp:
            tmp = Path(tmp)
            data = make_data(tmp, args.classes, args.per_class, max_side=max(160, final))
            overrides = train_overrides(data=data, ds_config=ds_config_path(tmp, args.bf16), model=args.model,
                                        model_kwargs=model_kwargs, batch=args.batch_size, epochs=epochs)
            timings, steps_per_epoch = time_resolutions(overrides, args.resolutions, rounds=args.rounds,
                                                        device=torch.device("cuda" if on_gpu else "cpu"))
            runs = [train_run(kind, tmp / f"{i}_{kind}", overrides=overrides, resolutions=args.resolutions,
                              epochs=epochs, steps_per_epoch=steps_per_epoch, threads=args.threads)
                    for i, kind in enumerate(order)]
    finally:
        torch.set_num_threads(threads_before)
    seconds = time.time() - t0

    epoch_s = {r: t.median for r, t in timings.items()}
    in_runs = [(r, s) for run in runs for r, s in zip(run["epoch_resolutions"], run["epoch_train_s"])]
    res_rows = [{"resolution": r, "step_s": epoch_s[r] / steps_per_epoch, "epoch_s": epoch_s[r],
                 "epoch_vs_final": ratio(epoch_s[r], epoch_s[final]), "pixels_vs_final": (r / final) ** 2,
                 "ratio_spread": ratio_spread(paired_ratios(timings[r].samples, timings[final].samples)),
                 "spread": timings[r].spread, "epoch_s_in_runs": statistics.median(s for rr, s in in_runs if rr == r)}
                for r in args.resolutions]
    if len({r["steps"] for r in runs}) != 1:
        raise RuntimeError(f"the runs made different numbers of steps: {[(r['kind'], r['steps']) for r in runs]}")
    kinds: dict[str, dict[str, Any]] = {}
    for kind in ("fixed", "progressive"):
        rs = [r for r in runs if r["kind"] == kind]
        kinds[kind] = {"runs": len(rs), "steps": rs[0]["steps"], "train_s": statistics.median(r["train_s"] for r in rs),
                       "wall_time_s": statistics.median(r["wall_time_s"] for r in rs),
                       f"top1_at_{final}": statistics.median(r["top1"] for r in rs)}
    ratios = {"predicted": predicted_ratio(epoch_s, args.resolutions, epochs),
              "train_steps": ratio(kinds["progressive"]["train_s"], kinds["fixed"]["train_s"]),
              "wall_time": ratio(kinds["progressive"]["wall_time_s"], kinds["fixed"]["wall_time_s"])}
    top1 = {kind: kinds[kind][f"top1_at_{final}"] for kind in kinds}

    print(f"1. one epoch ({steps_per_epoch} steps of batch {args.batch_size}) at each resolution, interleaved, "
          f"median of {args.rounds} rounds:")
    print(format_table(res_rows, floatfmt="{:.3g}"))
    print("spread: (max - min) / median over the rounds (ratio_spread: of the per-round ratios); "
          "epoch_s_in_runs: the same epochs inside the runs of 2.")
    print(f"2. full schedule, {epochs} epochs, runs in the order {', '.join(order)}; medians:")
    print(format_table([{"run": k, **v} for k, v in kinds.items()], floatfmt="{:.3g}"))
    print(f"progressive / fixed: train-step time {ratios['train_steps']:.3f} (predicted from 1.: "
          f"{ratios['predicted']:.3f}), wall time {ratios['wall_time']:.3f} (incl. checkpoints + final eval)")
    print(f"top-1 at {final}px (smoke number on demo data): fixed {top1['fixed']:.1f}, "
          f"progressive {top1['progressive']:.1f}")
    summary = {f"epoch time {r['resolution']}px / {final}px": f"{r['epoch_vs_final']:.3f} "
                                                               f"(pixels {r['pixels_vs_final']:.3f}, "
                                                               f"spread {r['ratio_spread']:.1%})"
               for r in res_rows}
    summary.update({"progressive / fixed train-step time": f"{ratios['train_steps']:.3f} "
                                                          f"(predicted {ratios['predicted']:.3f})",
                    "progressive / fixed wall time (incl. checkpoints + final eval)": round(ratios["wall_time"], 3),
                    f"top1@{final} fixed vs progressive (smoke, demo data)":
                        f"{top1['fixed']:.1f} vs {top1['progressive']:.1f}"})
    payload = {"model": args.model, "model_kwargs": model_kwargs, "resolutions": args.resolutions,
               "epochs": epochs, "batch_size": args.batch_size, "bf16": args.bf16, "threads": args.threads,
               "rounds": args.rounds, "steps_per_epoch": steps_per_epoch, "schedule": schedule,
               "schedule_epochs": epoch_resolutions(args.resolutions, epochs), "per_resolution": res_rows,
               "samples_s": {r: t.samples for r, t in timings.items()}, "order": order, "runs": runs,
               "kinds": kinds, "ratios": ratios, "summary": summary, "seconds": seconds}
    path = write_result("bench_progressive" + ("_quick" if args.quick else ""), payload, args.results_dir,
                        command=command_line("benchmarks.bench_progressive", argv))
    print(f"wrote {path} ({seconds:.0f} s)")
    return payload


if __name__ == "__main__":
    main()
