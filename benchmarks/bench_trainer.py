"""Trainer overhead: steady-state images/s of the real ``pipeline.train`` loop against a bare DeepSpeed loop.

Both loops run in their own process (1 rank), on the same model, the same DeepSpeed config dict (resolved once by
``pipeline.config.resolve_deepspeed_config`` from the same recipe), the same precision and the same in-memory
batches (:class:`InMemoryLoader`: a few pre-built normalised batches on the training device, cycled), so the
only difference is the loop itself:

* ``trainer``: ``pipeline.train.run(cfg, ds_config, train_loader=InMemoryLoader(...))`` -- the real loop with its
  LR schedule, loss bookkeeping, non-finite checks, stop flag, logging and step timer (checkpoints only at the
  end of the one epoch, evaluation only after it on a tiny real validation split, neither timed);
* ``bare``: ``deepspeed.initialize`` with that dict + model + optimizer, then
  ``for x, y in loader: loss = criterion(engine(x), y); engine.backward(loss); engine.step()``.

Both rates are taken by the loader itself, identically: the clock starts when the trainer asks for batch
``--warmup`` (the first ``--warmup`` steps are excluded) and stops when it asks for the last batch or the one after
it, with a device synchronisation at those points only. On a GPU the clock is the wall clock; on a CPU it is the
process's CPU time (one compute thread; the wall-clock rates are recorded beside), because on a shared 2-core VM
other processes take whole seconds of wall time out of a run. The trainer's own ``throughput_img_s`` (from its summary,
if it reports one) is recorded beside. Processes alternate trainer, bare, bare, trainer, ... (``--rounds`` pairs,
the order flipped every pair) to cancel machine drift; rates are medians per loop. Reported: ``ratio`` =
trainer / bare (target >= 0.95 on CPU, >= 0.9 on a GPU).

On a CPU (default): a narrow CPVT-Ti (width 96, 4 blocks) at 64 px, batch 32, fp32, one thread.
On a GPU (``make gpu-check`` calls it): ``--device cuda --model-kwargs '{}' --resolution 224 --batch-size 256
--precision bf16``.

    python -m benchmarks.bench_trainer [--steps 100] [--warmup 10] [--rounds 2] [--threads 1]
    python -m benchmarks.bench_trainer --bare-only      # the bare ceiling alone

The trainer side calls ``pipeline.train.run(cfg, ds_config, train_loader=...)``; ``--bare-only`` skips it.
Results: ``benchmarks/results/bench_trainer.json`` (``bench_trainer_quick.json`` with ``--quick``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from benchmarks.common import (ROOT, add_common_args, command_line, format_table, judged, paired_ratios, ratio,
                               ratio_spread, verdict, write_result)
from pipeline.net import free_port

NUM_CLASSES = 10
CPU_MODEL_KWARGS = {"embed_dim": 96, "depth": 4, "num_heads": 3}


# ----------------------------------------------------------------------------------------- the loader
class InMemoryLoader:
    """The TrainLoader contract (``pipeline/data/base.py``) over pre-built batches, plus a steady-state clock.

    ``batches``: a list of ``(images, targets)`` tensors, cycled; ``len(loader)`` = ``num_batches``.
    ``sync``: called (e.g. ``torch.cuda.synchronize``) right before each clock read, which happens only when
    batch ``warmup`` and the batch after the last one are asked for (and at the last one, for a consumer that
    stops without asking again)."""

    def __init__(self, batches: Sequence[tuple[Any, Any]], num_batches: int, *, warmup: int = 0,
                 world_size: int = 1, sync=None, clock=time.perf_counter, cpu_clock=time.process_time):
        if not batches:
            raise ValueError("InMemoryLoader needs at least one batch")
        if not 0 <= warmup < num_batches:
            raise ValueError(f"warmup must be in [0, num_batches={num_batches}), got {warmup}")
        self.batches = list(batches)
        self.num_batches = int(num_batches)
        self.warmup = int(warmup)
        self.world_size = int(world_size)
        self.batch_size = int(batches[0][0].shape[0])
        self.resolution = int(batches[0][0].shape[-1])
        self.epoch, self.skip_batches = 0, 0
        self.set_epoch_calls: list[tuple[int, int, int | None, int]] = []
        self.stamps: dict[int, float] = {}
        self.cpu_stamps: dict[int, float] = {}
        self._sync = sync or (lambda: None)
        self._clock, self._cpu_clock = clock, cpu_clock

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int, resolution: int, batch_size: int | None = None, skip_batches: int = 0,
                  accum: int = 1, aug_strength: float = 1.0) -> None:
        self.set_epoch_calls.append((epoch, resolution, batch_size, skip_batches))
        if int(resolution) != self.resolution:
            raise ValueError(f"InMemoryLoader holds {self.resolution} px batches, asked for {resolution}")
        if batch_size is not None and int(batch_size) != self.batch_size:
            raise ValueError(f"InMemoryLoader holds batches of {self.batch_size}, asked for {batch_size}")
        if not 0 <= skip_batches <= self.num_batches:
            raise ValueError(f"skip_batches must be in [0, {self.num_batches}], got {skip_batches}")
        self.epoch, self.skip_batches = epoch, skip_batches

    def _stamp(self, index: int) -> None:
        self._sync()
        self.stamps[index] = self._clock()
        self.cpu_stamps[index] = self._cpu_clock()

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        last = self.num_batches - 1
        for i in range(self.skip_batches, self.num_batches):
            if i in (self.warmup, last):
                self._stamp(i)
            yield self.batches[i % len(self.batches)]
        self._stamp(self.num_batches)

    def rate(self, cpu: bool = False) -> float | None:
        """Images/s of the steps after warm-up (``cpu``: per second of this process's CPU time, which on a shared
        CPU machine leaves out the time other processes took); None before a run got past the warm-up."""
        stamps = self.cpu_stamps if cpu else self.stamps
        if self.warmup not in stamps:
            return None
        end = max(k for k in stamps)
        n = end - self.warmup
        dt = stamps[end] - stamps[self.warmup]
        return n * self.batch_size / dt if n > 0 and dt > 0 else None

    @property
    def timed_steps(self) -> int:
        return max(self.stamps) - self.warmup if self.warmup in self.stamps else 0


def make_batches(n: int, batch_size: int, resolution: int, num_classes: int, device, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 3, resolution, resolution, generator=g).to(device),
             torch.randint(0, num_classes, (batch_size,), generator=g).to(device)) for _ in range(n)]


# ----------------------------------------------------------------------------------------- config
def write_recipe(path: Path, args, data_root: Path, run_dir: Path, ds_json: Path) -> Path:
    recipe = {
        "model": {"name": args.model, "num_classes": NUM_CLASSES, "drop_path_rate": 0.0,
                  "kwargs": json.loads(args.model_kwargs)},
        "data": {"format": "wds", "root": str(data_root), "batch_size": args.batch_size, "eval_batch_size": 8,
                 "num_workers": 0},
        "aug": {"auto_augment": None, "reprob": 0.0, "mixup": 0.0, "cutmix": 0.0, "smoothing": 0.1},
        "schedule": {"resolution": {"kind": "fixed", "resolution": args.resolution},
                     "lr": {"lr": 1.0e-4, "ref_batch": args.batch_size, "warmup_epochs": 0.5, "warmup_lr": 1.0e-6,
                            "min_lr": 1.0e-6}},
        "checkpoint": {"every_steps": 0, "keep_last": 1},
        "tracking": {"enabled": False, "system_metrics": False},
        "eval": {"every_epochs": 0, "resolutions": [args.resolution], "max_batches": 1},
        "run": {"epochs": 1, "log_every": max(1, args.warmup), "seed": 0, "progress_bar": False,
                "run_dir": str(run_dir), "deepspeed_config": str(ds_json)},
    }
    import yaml

    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def ds_json_for(precision: str, stage: int) -> dict[str, Any]:
    ds: dict[str, Any] = {"gradient_clipping": 1.0, "steps_per_print": 10**6, "wall_clock_breakdown": False,
                          "zero_optimization": {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
                                                "reduce_bucket_size": 50_000_000}}
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return ds


def load_cfg(recipe: Path, precision: str):
    from pipeline.config import load_train_config

    return load_train_config(recipe, [f"run.precision={precision}"], 1)


# ----------------------------------------------------------------------------------------- workers
def _device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", 0) if name == "cuda" else torch.device("cpu")


def _loader(args, device) -> InMemoryLoader:
    import torch

    batches = make_batches(args.distinct_batches, args.batch_size, args.resolution, NUM_CLASSES, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    return InMemoryLoader(batches, args.warmup + args.steps, warmup=args.warmup, sync=sync)


def _rates(loader: InMemoryLoader, device) -> dict[str, Any]:
    """``img_s``: on a CPU per second of process CPU time (one compute thread: robust to other load on a shared
    machine), on a GPU per wall-clock second; both are recorded."""
    wall, cpu = loader.rate(), loader.rate(cpu=True)
    return {"img_s": cpu if device.type == "cpu" else wall, "img_s_wall": wall, "img_s_cpu": cpu,
            "clock": "process_cpu" if device.type == "cpu" else "wall"}


def worker_trainer(args, cfg, ds) -> dict[str, Any]:
    import pipeline.train as train

    device = _device(args.device)
    loader = _loader(args, device)
    t0 = time.perf_counter()
    summary = train.run(cfg, ds, train_loader=loader)
    import torch

    return {**_rates(loader, device), "timed_steps": loader.timed_steps, "seconds": time.perf_counter() - t0,
            "reported_img_s": (summary or {}).get("throughput_img_s"), "set_epoch_calls": loader.set_epoch_calls,
            "precision": (summary or {}).get("precision"), "threads": torch.get_num_threads()}


def worker_bare(args, cfg, ds) -> dict[str, Any]:
    import timm
    import torch

    import pipeline.models  # noqa: F401 - registers cpvt_* in timm
    from pipeline import device as devices
    from pipeline.distributed import destroy, init_distributed
    from pipeline.optim import build_optimizer, param_groups
    from pipeline.train import build_criterion

    t0 = time.perf_counter()
    choice = devices.select_device()
    # the hardware-dependent part of the dict, as pipeline.train.run does it (precision sections, overlap)
    ds, prec, _ = devices.finalize_deepspeed_config(ds, cfg, choice)
    init_distributed(choice)
    import deepspeed

    device = _device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.run.seed)
    model = timm.create_model(cfg.model.name, **cfg.model.create_kwargs(NUM_CLASSES))
    optimizer = build_optimizer(model, cfg.optim)
    params = param_groups(model, cfg.optim.weight_decay) if optimizer is None else None
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds, model_parameters=params)
    for group in engine.optimizer.param_groups:
        group["lr"] = cfg.schedule.lr.lr
    criterion = build_criterion(cfg.aug)
    input_dtype = devices.torch_dtype(prec)
    loader = _loader(args, device)
    loader.set_epoch(0, args.resolution, args.batch_size)
    engine.train()
    for x, y in loader:
        x = x.to(device, dtype=input_dtype, non_blocking=True)
        y = y.to(device, non_blocking=True)
        loss = criterion(engine(x).float(), y)
        engine.backward(loss)
        engine.step()
    out = {**_rates(loader, device), "timed_steps": loader.timed_steps, "seconds": time.perf_counter() - t0,
           "reported_img_s": None, "precision": prec, "threads": torch.get_num_threads()}
    destroy()
    return out


def run_worker(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    cfg, ds = load_cfg(Path(args.recipe), args.precision)
    fn = worker_trainer if args.worker == "trainer" else worker_bare
    try:
        out = fn(args, cfg, ds)
    except Exception as e:  # noqa: BLE001 - the parent reports it
        Path(args.worker_out).write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        raise
    Path(args.worker_out).write_text(json.dumps(out, default=str))
    return 0


# ----------------------------------------------------------------------------------------- parent
def make_eval_data(root: Path) -> Path:
    """A tiny real dataset (WebDataset) for the trainer's end-of-run evaluation and ``classes.json``."""
    from data_prep.demo_dataset import make_demo_dataset
    from data_prep.write_webdataset import write_webdataset

    src = root / "src"
    make_demo_dataset(src, num_classes=NUM_CLASSES, train_per_class=2, val_per_class=1, min_side=32, max_side=48,
                      large_images=0, bad_files=False, val_layout="folders")
    data = root / "data"
    write_webdataset(src, data, cluster="pool", workers=1, progress=False)
    return data


def worker_env(args) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(args.threads), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    if _device(args.device).type == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def worker_order(rounds: int, kinds: Sequence[str]) -> list[str]:
    """A B B A A B ... for two kinds; one kind: that kind ``rounds`` times."""
    kinds = list(kinds)
    out = []
    for r in range(rounds):
        out += kinds if r % 2 == 0 else kinds[::-1]
    return out


def _passthrough(args) -> list[str]:
    return ["--device", args.device, "--model", args.model, "--model-kwargs", args.model_kwargs, "--resolution",
            str(args.resolution), "--batch-size", str(args.batch_size), "--precision", args.precision,
            "--zero-stage", str(args.zero_stage), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--threads", str(args.threads), "--distinct-batches", str(args.distinct_batches)]


def run_parent(args) -> int:
    supported, why = (False, "--bare-only") if args.bare_only else (True, "")
    kinds = ["trainer", "bare"] if supported else ["bare"]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        tmp = Path(tmp)
        data = make_eval_data(tmp) if supported else tmp / "nodata"
        (tmp / "ds.json").write_text(json.dumps(ds_json_for(args.precision, args.zero_stage)))
        env = worker_env(args)
        for i, kind in enumerate(worker_order(args.rounds, kinds)):
            recipe = write_recipe(tmp / f"recipe_{i}.yaml", args, data, tmp / f"run_{i}", tmp / "ds.json")
            out = tmp / f"worker_{i}.json"
            cmd = [sys.executable, "-m", "benchmarks.bench_trainer", "--worker", kind, "--worker-out", str(out),
                   "--recipe", str(recipe), *_passthrough(args)]
            t0 = time.time()
            try:
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                      timeout=args.worker_timeout)
                rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
            except subprocess.TimeoutExpired as e:
                rc, tail = "timeout", str(e)[-2000:]
            res = json.loads(out.read_text()) if out.is_file() else {}
            run = {"kind": kind, "rc": rc, "wall_s": round(time.time() - t0, 1), **res}
            if rc != 0 or not res.get("img_s"):
                run["error"] = res.get("error") or _last_line(tail)
                print(f"{kind} run {i} failed (rc={rc}):\n{tail}", file=sys.stderr)
            runs.append(run)
            print(f"run {i}: {kind:7s} rc={rc} img/s={_fmt(res.get('img_s'))} "
                  f"(trainer-reported {_fmt(res.get('reported_img_s'))}) wall {run['wall_s']} s", flush=True)
    payload = summarize(runs, args, supported, why)
    name = "bench_trainer" + ("_quick" if args.quick else "")
    path = write_result(name, payload, args.results_dir, command=args.command)
    print(format_table([{"loop": k, "img_s": payload["img_s"].get(k), "runs": len([r for r in runs if r["kind"] == k])}
                        for k in ("trainer", "bare")]))
    print(f"trainer / bare: {_fmt(payload['ratio'])}" + (f"   (trainer skipped: {why})" if not supported else ""))
    print(f"wrote {path}")
    return 0 if all(r["rc"] == 0 and r.get("img_s") for r in runs) else 1


def summarize(runs: list[dict[str, Any]], args, supported: bool, why: str) -> dict[str, Any]:
    def med(kind: str, key: str = "img_s") -> float | None:
        vals = [r[key] for r in runs if r["kind"] == kind and r.get(key)]
        return statistics.median(vals) if vals else None

    trainer, bare = med("trainer"), med("bare")
    r = ratio(trainer, bare) if trainer and bare else None
    # the i-th trainer run against the i-th bare run (the order is A B B A ...): the per-round ratios' spread
    rates = {kind: [run.get("img_s") for run in runs if run["kind"] == kind] for kind in ("trainer", "bare")}
    paired = [(t, b) for t, b in zip(rates["trainer"], rates["bare"]) if t and b]
    spread = ratio_spread(paired_ratios([t for t, _ in paired], [b for _, b in paired]))
    target = 0.9 if args.device == "cuda" or (args.device == "auto" and _device("auto").type == "cuda") else 0.95
    tw, bw = med("trainer", "img_s_wall"), med("bare", "img_s_wall")
    clock = next((run["clock"] for run in runs if run.get("clock")), None)
    settings = {k: getattr(args, k) for k in ("device", "model", "model_kwargs", "resolution", "batch_size",
                                               "precision", "zero_stage", "steps", "warmup", "rounds", "threads")}
    summary = {"trainer img/s": _fmt(trainer), "bare img/s": _fmt(bare),
               "trainer/bare ratio": judged(r, target, spread),
               "clock": clock, "trainer/bare ratio (wall clock)": _fmt(ratio(tw, bw) if tw and bw else None)}
    if not supported:
        summary["trainer"] = f"skipped: {why}"
    return {"settings": settings, "runs": runs, "img_s": {"trainer": trainer, "bare": bare}, "clock": clock,
            "img_s_wall": {"trainer": tw, "bare": bw}, "ratio_wall": ratio(tw, bw) if tw and bw else None,
            "trainer_reported_img_s": med("trainer", "reported_img_s"), "ratio": r, "ratio_spread": spread,
            "target": target, "verdict": verdict(r, target, spread), "target_cpu": 0.95,
            "target_gpu": 0.9, "trainer_skipped": None if supported else why, "summary": summary}


def _fmt(v: Any) -> str:
    return "n/a" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--model", default="cpvt_ti")
    p.add_argument("--model-kwargs", default=None, help="JSON timm kwargs (default: narrow on CPU, '{}' on GPU)")
    p.add_argument("--resolution", type=int, default=None, help="default 64 on CPU, 224 on GPU")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 on CPU, 256 on GPU")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"], help="default fp32 CPU, bf16 GPU")
    p.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 100, --quick 4)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10, --quick 2)")
    p.add_argument("--rounds", type=int, default=None, help="pairs of runs (default 2: A B B A; --quick 1)")
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per run (CPU)")
    p.add_argument("--distinct-batches", type=int, default=4)
    p.add_argument("--bare-only", action="store_true", help="only the bare loop (the ceiling)")
    p.add_argument("--worker-timeout", type=float, default=600)
    p.add_argument("--worker", choices=["trainer", "bare"], help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--recipe", help=argparse.SUPPRESS)
    return p


def resolve_defaults(args) -> argparse.Namespace:
    gpu = _device(args.device).type == "cuda"
    if args.model_kwargs is None:
        args.model_kwargs = "{}" if gpu else json.dumps(CPU_MODEL_KWARGS)
    args.resolution = args.resolution or (224 if gpu else (32 if args.quick else 64))
    args.batch_size = args.batch_size or (256 if gpu else (8 if args.quick else 32))
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    args.steps = args.steps or (4 if args.quick else 100)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 10)
    args.rounds = args.rounds or (1 if args.quick else 2)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = resolve_defaults(build_parser().parse_args(argv))
    if args.worker:
        return run_worker(args)
    args.command = command_line("benchmarks.bench_trainer", argv)
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
