"""Time to accuracy: the budgeted progressive-resolution recipe against the fixed-resolution one, top-1 vs training
time and vs FLOPs, over seeds, and the time at which progressive training reaches the fixed recipe's final top-1.

Not part of CI (``--quick`` is its smoke mode, run by ``tests/test_benchmarks_time_to_accuracy.py``).

* **Data.** A larger demo-generator set (``data_prep.demo_dataset``: 10 classes, ``--train-per-class`` /
  ``--val-per-class`` images per class, small sides so that decoding is cheap), written as WebDataset shards by
  data_prep into ``--cache`` (``runs/bench_time_to_accuracy/``), reused when present. With 2000 val images one
  image is 0.05 points of top-1 and the binomial standard error near 90 % is about 0.7 points.
* **Recipes.** ``fixed``: ``pipeline/recipes/demo.yaml`` with ``schedule.resolution.kind=fixed`` at its final
  64 px for ``--epochs`` epochs (the reference). ``progressive``: ``pipeline/recipes/demo_fast.yaml`` (the budgeted
  schedule, ``pipeline.config.budget``) with ``reference_epochs`` = the reference's epochs and ``budget`` 0.5;
  ``--low-budget`` (default 0.33, EfficientTrain++'s 3x) for ``--low-budget-seeds`` seeds after the pairs.
* **Runs.** Every run is a real ``torchrun pipeline/train.py`` (``--nproc`` ranks, one compute thread each, as
  ``make demo`` trains; one rank: ``python pipeline/train.py``), evaluated after every epoch at the final
  resolution (``eval.every_epochs=1``, ``eval.resolutions=[64]``). One pair per seed, the order alternating per
  seed (fixed, progressive; progressive, fixed; ...) so that drift from other load falls on both recipes.
* **Time.** The *training time* of an epoch is the data wait + compute of its optimizer steps, from the run's
  MLflow metrics (``time/data_wait_ms``, ``time/compute_ms``; ``run.log_every`` = one epoch's steps, so each
  value is one epoch's mean). Evaluation and checkpoints are excluded from it and reported apart
  (``epoch/time_s`` minus the training time); so is the start-up of the processes (in ``process_s``).
* **FLOPs.** The model's forward FLOPs per image at each resolution, counted once with
  :class:`torch.utils.flop_counter.FlopCounterMode`, x3 for forward + backward, x the images of an epoch's steps.
* **Time to target.** The target is the mean over seeds of the fixed runs' final top-1. A progressive run's
  top-1-vs-time curve (starting at chance level at time 0) is interpolated linearly between epochs; the first
  crossing of the target, divided by the mean fixed training time (FLOPs), is the run's ratio ("not reached"
  when the curve never gets there). The ratio's verdict against ``<= 0.5`` uses :func:`benchmarks.common.verdict`
  with the spread of the per-seed ratios (inconclusive when the seeds disagree by more than the margin).
* **Data wait.** The share of the training time spent waiting for batches, per stage (resolution), pooled over
  the runs of a recipe; target ``<= 10 %``.

    python -m benchmarks.bench_time_to_accuracy [--seeds 0 1 2] [--epochs 12] [--train-per-class 150]

Results: ``benchmarks/results/bench_time_to_accuracy.json`` (``..._quick.json`` with ``--quick``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import mlflow
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import pipeline.models  # noqa: F401 - registers cpvt_* in timm
from benchmarks.common import ROOT, add_common_args, command_line, format_table, judged, ratio_spread, write_result
from data_prep.demo_dataset import make_demo_dataset
from data_prep.write_webdataset import write_webdataset
from pipeline.config import load_train_config
from pipeline.data.shard_index import read_wds_info
from pipeline.net import free_port

RECIPES = ROOT / "pipeline" / "recipes"
FINAL_RES = 64   # demo.yaml's final resolution, the fixed reference's and demo_fast.yaml's
TIME_TARGET = 0.5        # progressive time (and FLOPs) to the fixed top-1, relative to the fixed run
DATA_WAIT_TARGET = 0.10  # share of the training time spent waiting for data, in every stage
# the same in every run: eval after every epoch at the final resolution, checkpoints only at epoch ends
COMMON = ["eval.every_epochs=1", f"eval.resolutions=[{FINAL_RES}]", "checkpoint.every_steps=0",
          "checkpoint.keep_last=1", "checkpoint.keep_best=false", "tracking.system_metrics=false",
          "run.progress_bar=false"]


# ----------------------------------------------------------------------------------------- data
def make_data(cache: Path, *, classes: int, train_per_class: int, val_per_class: int, min_side: int,
              max_side: int, minival_fraction: float = 0.0) -> Path:
    """WebDataset shards of a demo-generator set under ``cache`` (one folder per size, reused when present)."""
    root = cache / (f"data_c{classes}_t{train_per_class}_v{val_per_class}_s{min_side}-{max_side}"
                    f"_m{minival_fraction:g}")
    src, data = root / "src", root / "data"
    if not (src / "demo_dataset.json").is_file():
        make_demo_dataset(src, num_classes=classes, train_per_class=train_per_class, val_per_class=val_per_class,
                          min_side=min_side, max_side=max_side, large_images=0, bad_files=False,
                          val_layout="folders", seed=0)
    if not (data / "wds" / "_info.json").is_file():
        write_webdataset(src, data, workers=2, progress=False, shard_max_count=250, max_side=max_side,
                         minival_fraction=minival_fraction)
    return data


# ----------------------------------------------------------------------------------------- runs
def recipe_args(kind: str, *, epochs: int, budget: float | None = None) -> tuple[Path, list[str]]:
    """(recipe file, overrides) of one recipe: ``fixed`` (demo.yaml, every epoch at 64 px) or ``progressive``
    (demo_fast.yaml at ``budget`` of the fixed run's ``epochs``)."""
    if kind == "fixed":
        return RECIPES / "demo.yaml", ["schedule.resolution.kind=fixed", f"schedule.resolution.resolution={FINAL_RES}",
                                       f"run.epochs={epochs}"]
    if kind == "progressive":
        return RECIPES / "demo_fast.yaml", [f"schedule.resolution.reference_epochs={epochs}",
                                            f"schedule.resolution.budget={budget}"]
    raise ValueError(f"kind: {kind!r} is not 'fixed' or 'progressive'")


def run_order(seeds: Sequence[int], budget: float, low_budget: float | None, low_seeds: int
              ) -> list[tuple[str, float | None, int]]:
    """``[(kind, budget, seed), ...]``: one pair per seed, alternating fixed-first and progressive-first, then the
    low-budget progressive runs (the first ``low_seeds`` seeds)."""
    order: list[tuple[str, float | None, int]] = []
    for i, seed in enumerate(seeds):
        pair = [("fixed", None, seed), ("progressive", budget, seed)]
        order += pair if i % 2 == 0 else pair[::-1]
    if low_budget is not None:
        order += [("progressive", low_budget, seed) for seed in list(seeds)[:low_seeds]]
    return order


def label(kind: str, budget: float | None) -> str:
    return "fixed" if kind == "fixed" else f"progressive_{budget:g}"


def train_run(run_dir: Path, recipe: Path, overrides: list[str], *, data: Path, nproc: int,
              steps_per_epoch: int) -> dict[str, Any]:
    """One training run (torchrun, ``nproc`` ranks); its final metrics, MLflow run id and process wall time."""
    argv = ["--recipe", str(recipe), "--data", str(data), "--run-dir", str(run_dir), *COMMON, *overrides,
            f"run.log_every={steps_per_epoch}", f"tracking.uri=sqlite:///{run_dir.resolve()}/mlflow.db"]
    launch = ([sys.executable] if nproc == 1 else   # one rank: no torchrun start-up
              [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(nproc), "--master_port",
               str(free_port())])
    cmd = [*launch, "pipeline/train.py", *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "train.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    process_s = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"training run {run_dir} failed (exit {rc}):\n{tail}")
    final = json.loads((run_dir / "final_metrics.json").read_text())
    return {"final": final, "process_s": process_s}


def epoch_metrics(run_dir: Path, run_id: str, steps_per_epoch: int) -> list[dict[str, float]]:
    """Per epoch, from the run's MLflow metrics (each logged once per epoch at the epoch's last step): resolution,
    training time (data wait + compute of its steps), data-wait seconds, evaluation + checkpoint seconds, top-1
    at the final resolution."""
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{Path(run_dir).resolve()}/mlflow.db")
    keys = ("train/resolution", "time/compute_ms", "time/data_wait_ms", "epoch/time_s", f"eval/top1_{FINAL_RES}px")
    hist = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)} for k in keys}
    rows = []
    for step in sorted(hist["train/resolution"]):
        wait = hist["time/data_wait_ms"][step] * steps_per_epoch / 1000
        train = wait + hist["time/compute_ms"][step] * steps_per_epoch / 1000
        rows.append({"resolution": int(hist["train/resolution"][step]), "train_s": train, "data_wait_s": wait,
                     "eval_ckpt_s": hist["epoch/time_s"][step] - train,
                     "top1": hist[f"eval/top1_{FINAL_RES}px"][step]})
    return rows


# ----------------------------------------------------------------------------------------- FLOPs
def forward_flops(model: torch.nn.Module, resolution: int) -> int:
    """Forward FLOPs of one image at ``resolution`` (FlopCounterMode: matmuls, convolutions, attention)."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, resolution, resolution))
    return counter.get_total_flops()


def train_flops_per_image(recipe: Path, overrides: list[str], num_classes: int, resolutions: Sequence[int]
                          ) -> dict[int, int]:
    """{resolution: forward + backward FLOPs of one training image (3x the forward)} for the recipe's model."""
    cfg, _ = load_train_config(recipe, overrides)
    model = timm.create_model(cfg.model.name, **cfg.model.create_kwargs(num_classes))
    return {int(r): 3 * forward_flops(model, int(r)) for r in sorted(set(resolutions))}


# ----------------------------------------------------------------------------------------- curves
def curve(epochs: list[dict[str, float]], flops_per_image: dict[int, int], images_per_epoch: int,
          chance: float) -> dict[str, list[float]]:
    """Cumulative training seconds, cumulative training FLOPs and top-1 after each epoch, each starting with
    the untrained point (0, 0, chance)."""
    t, f = [0.0], [0.0]
    for e in epochs:
        t.append(t[-1] + e["train_s"])
        f.append(f[-1] + flops_per_image[e["resolution"]] * images_per_epoch)
    return {"train_s": t, "flops": f, "top1": [chance, *(e["top1"] for e in epochs)]}


def time_to_target(xs: Sequence[float], top1: Sequence[float], target: float) -> float | None:
    """The first ``x`` at which the piecewise-linear curve ``(xs, top1)`` reaches ``target`` (None: never)."""
    for i, (x, y) in enumerate(zip(xs, top1)):
        if y >= target:
            if i == 0:
                return float(x)
            x0, y0 = xs[i - 1], top1[i - 1]
            return float(x0 + (x - x0) * (target - y0) / (y - y0))
    return None


def seed_stats(values: Sequence[float]) -> dict[str, float]:
    """Mean, min, max and (with two or more values) the sample standard deviation over seeds."""
    vals = [float(v) for v in values]
    return {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else float("nan"), "n": len(vals)}


def ratio_cell(ratios: Sequence[float | None], target: float) -> tuple[dict[str, Any], str]:
    """Per-seed ratios (None: not reached) -> (numbers, summary cell). The value judged is the mean over seeds;
    a seed that never reaches the target makes the value "not reached" (a FAIL)."""
    reached = [r for r in ratios if r is not None]
    out: dict[str, Any] = {"per_seed": list(ratios), "reached": len(reached), "runs": len(ratios)}
    if len(reached) < len(ratios):
        out |= {"mean": None, "spread": float("nan"), "verdict": "FAIL"}
        shown = ", ".join("not reached" if r is None else f"{r:.3f}" for r in ratios)
        return out, f"not reached by {len(ratios) - len(reached)} of {len(ratios)} runs ({shown}); FAIL"
    mean = statistics.fmean(reached)
    spread = ratio_spread(reached)
    out |= {"mean": mean, "min": min(reached), "max": max(reached), "spread": spread}
    cell = judged(mean, target, spread, higher_is_better=False)
    out["verdict"] = cell.rsplit(" ", 1)[-1]
    if len(reached) > 1:
        cell += f"; seeds {min(reached):.3f}-{max(reached):.3f}"
    return out, cell


def data_wait_by_stage(runs: Sequence[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """{resolution: pooled data-wait share, and its min/max over the runs} for the epochs at each resolution."""
    out: dict[int, dict[str, float]] = {}
    for res in sorted({e["resolution"] for r in runs for e in r["epochs"]}):
        per_run = []
        for r in runs:
            eps = [e for e in r["epochs"] if e["resolution"] == res]
            if eps:
                per_run.append(sum(e["data_wait_s"] for e in eps) / sum(e["train_s"] for e in eps))
        wait = sum(e["data_wait_s"] for r in runs for e in r["epochs"] if e["resolution"] == res)
        train = sum(e["train_s"] for r in runs for e in r["epochs"] if e["resolution"] == res)
        out[res] = {"share": wait / train, "min": min(per_run), "max": max(per_run)}
    return out


def summarize(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, str]]:
    """(per-recipe numbers, summary rows for the docs' table) from the runs' curves."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_label.setdefault(r["label"], []).append(r)
    fixed = by_label["fixed"]
    target = statistics.fmean(r["final_top1"] for r in fixed)
    fixed_s = statistics.fmean(r["train_s"] for r in fixed)
    fixed_flops = statistics.fmean(r["flops"] for r in fixed)
    recipes: dict[str, Any] = {}
    summary: dict[str, str] = {}
    for name, rs in by_label.items():
        top1, train_s = seed_stats([r["final_top1"] for r in rs]), seed_stats([r["train_s"] for r in rs])
        rec: dict[str, Any] = {"seeds": [r["seed"] for r in rs], "epochs": rs[0]["num_epochs"],
                               "plan": rs[0]["plan"], "final_top1": top1, "train_s": train_s,
                               "flops": statistics.fmean(r["flops"] for r in rs),
                               "eval_ckpt_s": statistics.fmean(r["eval_ckpt_s"] for r in rs),
                               "process_s": statistics.fmean(r["process_s"] for r in rs),
                               "data_wait": {str(k): v for k, v in data_wait_by_stage(rs).items()}}
        spread = f"{top1['min']:.2f}-{top1['max']:.2f}" if top1["n"] > 1 else "one seed"
        summary[f"{name} ({rec['plan']}): final top-1 @{FINAL_RES}px, mean ({spread})"] = (
            f"{top1['mean']:.2f}" + (f" (std {top1['std']:.2f}, {top1['n']} seeds)" if top1["n"] > 1 else ""))
        summary[f"{name}: training time s, mean ({train_s['min']:.0f}-{train_s['max']:.0f})"] = (
            f"{train_s['mean']:.0f}" + ("" if name == "fixed" else f" ({train_s['mean'] / fixed_s:.3f} of fixed; "
                                        f"FLOPs {rec['flops'] / fixed_flops:.3f} of fixed)"))
        if name != "fixed":
            for axis, key, den in (("time", "train_s", fixed_s), ("FLOPs", "flops", fixed_flops)):
                ratios = [None if r[f"{key}_to_target"] is None else r[f"{key}_to_target"] / den for r in rs]
                rec[f"{key}_to_target_ratio"], cell = ratio_cell(ratios, TIME_TARGET)
                summary[f"{name}: {axis} to the fixed top-1 ({target:.2f}) / fixed {axis}"] = cell
        waits = data_wait_by_stage(rs)
        worst = max(waits.values(), key=lambda w: w["share"])
        rel = (worst["max"] - worst["min"]) / worst["share"] if worst["share"] else float("nan")
        rec["data_wait_verdict"] = judged(worst["share"], DATA_WAIT_TARGET, rel, higher_is_better=False)
        summary[f"{name}: data-wait share per stage (max over stages judged)"] = (
            ", ".join(f"{k}px {w['share']:.1%}" for k, w in waits.items()) + "; " + rec["data_wait_verdict"])
        recipes[name] = rec
    return {"target_top1": target, "fixed_train_s": fixed_s, "fixed_flops": fixed_flops, "recipes": recipes}, summary


# ----------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=12, help="the fixed reference's epochs (demo_fast's reference)")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--low-budget", type=float, default=0.33, help="a second progressive budget (0: none)")
    p.add_argument("--low-budget-seeds", type=int, default=1, help="runs of --low-budget (the first seeds)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=150)
    p.add_argument("--val-per-class", type=int, default=200)
    p.add_argument("--min-side", type=int, default=64)
    p.add_argument("--max-side", type=int, default=96)
    p.add_argument("--nproc", type=int, default=2, help="training ranks per run (torchrun)")
    p.add_argument("--cache", default=str(ROOT / "runs" / "bench_time_to_accuracy"),
                   help="data and run folders (the data is reused when present)")
    add_common_args(p)
    args = p.parse_args(argv)
    extra: list[str] = []
    if args.quick:   # a narrow model on a tiny set, one seed: the whole path in well under a minute of training
        args.seeds, args.epochs, args.low_budget = [0], 2, 0.0
        args.classes, args.train_per_class, args.val_per_class, args.min_side, args.max_side = 3, 16, 8, 64, 72
        args.nproc = 1
        extra = ["model.kwargs={embed_dim: 48, depth: 2, num_heads: 2}", "data.batch_size=8",
                 "data.eval_batch_size=32", "data.shuffle_buffer=16", "data.shuffle_initial=8"]
    t0 = time.time()
    cache = Path(args.cache)
    data = make_data(cache, classes=args.classes, train_per_class=args.train_per_class,
                     val_per_class=args.val_per_class, min_side=args.min_side, max_side=args.max_side)
    info = read_wds_info(data)["splits"]
    cfg, _ = load_train_config(RECIPES / "demo.yaml", [*extra, f"data.root={data}"], world_size=args.nproc)
    global_batch = cfg.data.batch_size * args.nproc
    steps_per_epoch = info["train"]["num_samples"] // global_batch
    images_per_epoch = steps_per_epoch * global_batch
    chance = 100.0 / args.classes
    fast, _ = load_train_config(RECIPES / "demo_fast.yaml", [*extra, f"data.root={data}"], world_size=args.nproc)
    flops = train_flops_per_image(RECIPES / "demo.yaml", [*extra, f"data.root={data}"], args.classes,
                                  [*fast.schedule.resolution.resolutions, FINAL_RES])
    order = run_order(args.seeds, args.budget, args.low_budget or None, args.low_budget_seeds)
    runs_dir = cache / ("runs_quick" if args.quick else "runs")
    runs = []
    for i, (kind, budget, seed) in enumerate(order):
        recipe, overrides = recipe_args(kind, epochs=args.epochs, budget=budget)
        overrides = [*extra, *overrides, f"run.seed={seed}"]
        name = label(kind, budget)
        run_dir = runs_dir / f"{i:02d}_{name}_seed{seed}"
        if run_dir.exists():
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        rcfg, _ = load_train_config(recipe, [*overrides, f"data.root={data}"], world_size=args.nproc)
        res = rcfg.schedule.resolution
        plan = (" ".join(f"{s.resolution}x{s.epochs}" for s in res.stage_plan().stages)
                + f", share {res.stage_plan().share:.3f}" if res.kind == "budgeted" else f"{FINAL_RES}x{args.epochs}")
        print(f"[{i + 1}/{len(order)}] {name} seed {seed}: {plan}", flush=True)
        out = train_run(run_dir, recipe, overrides, data=data, nproc=args.nproc, steps_per_epoch=steps_per_epoch)
        epochs = epoch_metrics(run_dir, out["final"]["mlflow_run_id"], steps_per_epoch)
        c = curve(epochs, flops, images_per_epoch, chance)
        runs.append({"label": name, "kind": kind, "budget": budget, "seed": seed, "plan": plan,
                     "num_epochs": len(epochs), "epochs": epochs, "curve": c, "train_s": c["train_s"][-1],
                     "flops": c["flops"][-1], "final_top1": c["top1"][-1],
                     "eval_ckpt_s": sum(e["eval_ckpt_s"] for e in epochs), "process_s": out["process_s"],
                     "wall_time_s": out["final"]["wall_time_s"],
                     "data_wait_share": out["final"]["data_wait_share"]})
        print(f"    top-1 {c['top1'][-1]:.2f}, training {c['train_s'][-1]:.0f} s, eval + checkpoints "
              f"{runs[-1]['eval_ckpt_s']:.0f} s, process {out['process_s']:.0f} s", flush=True)
    target = statistics.fmean(r["final_top1"] for r in runs if r["kind"] == "fixed")
    for r in runs:
        r["train_s_to_target"] = time_to_target(r["curve"]["train_s"], r["curve"]["top1"], target)
        r["flops_to_target"] = time_to_target(r["curve"]["flops"], r["curve"]["top1"], target)
    numbers, summary = summarize(runs)
    seconds = time.time() - t0
    dataset = (f"{args.classes} classes, {info['train']['num_samples']} train / {info['val']['num_samples']} val "
               f"demo images ({args.min_side}-{args.max_side} px)")
    summary = {"setup": f"{dataset}; seeds {' '.join(map(str, args.seeds))}; {args.nproc} ranks; training time = "
                        f"data wait + compute (eval, checkpoints and start-up excluded)", **summary}
    rows = [{"run": f"{r['label']} s{r['seed']}", "epochs": r["num_epochs"], "top1": r["final_top1"],
             "train_s": r["train_s"], "GFLOPs": r["flops"] / 1e9, "eval_ckpt_s": r["eval_ckpt_s"],
             "process_s": r["process_s"], "to_target_s": r["train_s_to_target"]} for r in runs]
    print(format_table(rows, floatfmt="{:.4g}"))
    for k, v in summary.items():
        print(f"{k}: {v}")
    payload = {"dataset": dataset, "train_images": info["train"]["num_samples"],
               "val_images": info["val"]["num_samples"], "epochs": args.epochs, "budget": args.budget,
               "low_budget": args.low_budget or None, "seeds": args.seeds, "nproc": args.nproc,
               "global_batch": global_batch, "steps_per_epoch": steps_per_epoch,
               "train_flops_per_image": {str(k): v for k, v in flops.items()}, "order": [r["label"] for r in runs],
               "runs": runs, **numbers, "summary": summary, "seconds": seconds}
    path = write_result("bench_time_to_accuracy" + ("_quick" if args.quick else ""), payload, args.results_dir,
                        command=command_line("benchmarks.bench_time_to_accuracy", argv))
    print(f"wrote {path} ({seconds:.0f} s)")
    return payload


if __name__ == "__main__":
    main()
