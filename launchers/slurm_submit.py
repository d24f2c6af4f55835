"""Submit a CPVT training run to SLURM (or run the same path locally) with submitit.

    python launchers/slurm_submit.py --nodes 4 --model cpvt_b      # with a site file (pipeline/config/site.py)
    python launchers/slurm_submit.py --nodes 4 --gpus-per-node 8 --model cpvt_b --data /data/imagenet_prep \\
        --partition p --account a --time 72:00:00 [section.field=value ...]
    python launchers/slurm_submit.py ... --dry-run          # resolved values and where each came from
    python launchers/slurm_submit.py ... --cluster local    # same tasks as subprocesses on this machine

``--model X`` without ``--recipe`` trains the paper's recipe for X (``pipeline/recipes/X.yaml``, or a site recipe
folder's). Resources come from the command line, else the site file, else SLURM itself for the partition (GPUs
per node from ``sinfo -o %G`` or scontrol's ``Gres=gpu:N``, CPUs per task = the node's CPUs / tasks per node);
one task per GPU on GPU partitions (``--tasks-per-node`` on CPU partitions, default 1). The recipe's global batch
is the same on any number of nodes: the per-rank batch and the accumulation follow the world size.

Each task exports the torch.distributed rendezvous variables from SLURM (:mod:`launchers.dist_env`) and runs
``pipeline.train.main`` with ``--resume auto`` (:mod:`launchers.train_job`): on the time-limit/preemption signal
the run checkpoints and requeues itself, at most ``--max-requeues`` times, continuing the same MLflow run.
That run is created at submission (in the store the job writes to) and its id printed with the job id; the job
continues it. ``--dry-run`` creates nothing.

Everything that can be checked is checked before submission, each failure one line (exit code 2): node/task
counts, the SLURM time format, the model name (timm registry), the data folder, the whole training config and
its batch arithmetic (the world size must form the recipe's global batch), and that the time limit leaves room
for one checkpoint interval. When the time limit is shorter than an epoch at the estimated step time (a per-GPU
throughput table, :data:`GPU_IMG_S`, or ``--step-time-s``), the job checkpoints every N steps
(``checkpoint.every_steps``, shown in the plan).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python launchers/slurm_submit.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import tracking  # noqa: E402
from pipeline.config import (ConfigError, Setting, batch_plan, check_choice, check_positive, find_recipe,  # noqa: E402
                             load_site, load_train_config, pick, recipe_for_model, train_defaults)
from pipeline.data.shard_index import check_index, read_num_classes, read_wds_info  # noqa: E402
from pipeline.data.workers import fit_num_workers  # noqa: E402
from pipeline.schedules import plan_lines  # noqa: E402
from pipeline.schedules import ResolutionSchedule  # noqa: E402
from pipeline.redaction import redact  # noqa: E402
from pipeline.storage import is_url  # noqa: E402
from pipeline.submitit_compat import sbatch_header  # noqa: E402

from launchers.executor import CLUSTERS, JobFailedError, make_executor, wait_for  # noqa: E402
from launchers.partition import query_partition  # noqa: E402

# Training images/s of one GPU at 224 px per model, for the step-time estimate. Only the paper's 16 GB V100
# numbers (CPVT Table 5; its GAP-B value is CPVT-B's) are known; another GPU type's row comes from
# `make gpu-check` (benchmarks/results/gpu_check.json: cpvt_ti measured on that GPU, the other models scaled by
# the paper's V100 ratios, see measured_img_s). A GPU type without numbers uses the V100 row, the slowest, and
# the plan says so.
GPU_IMG_S: dict[str, dict[str, float]] = {
    "V100": {"cpvt_ti": 2500.7, "cpvt_ti_gap": 2520.1, "cpvt_s": 930.5, "cpvt_s_gap": 942.3,
             "cpvt_b": 285.5, "cpvt_b_gap": 285.5},
}
GPU_CHECK_JSON = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "gpu_check.json"
DEFAULT_RUN_DIR = "runs/default"
CHECKPOINTS_PER_JOB = 4   # a derived step interval saves about this many times per time limit


@dataclass
class Plan:
    """Everything resolved from the command line: what ``--dry-run`` prints and what gets submitted."""

    cluster: str
    executor_params: dict[str, Any]
    train_argv: list[str]
    run_dir: Path
    folder: Path
    world_size: int
    max_requeues: int
    config_yaml: str
    deepspeed: dict[str, Any]
    tracking_uri: str
    experiment: str
    checks: list[str] = field(default_factory=list)
    run_name: str | None = None  # MLflow run name; None: tracking disabled
    settings: dict[str, Setting] = field(default_factory=dict)  # resolved values and their sources
    model: str | None = None     # run tags set at submission
    recipe: str | None = None
    mlflow_run_id: str | None = None  # set by submit(): the run created for this job
    data_secret: str | None = None    # the data root with its credentials (argv has it masked); memory only


# ----------------------------------------------------------------------------------------------- parsing
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("resources")
    g.add_argument("--cluster", default="slurm", help=f"one of {list(CLUSTERS)}")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=None,
                   help="one task per GPU (default: the site file, else SLURM's partition description)")
    g.add_argument("--tasks-per-node", type=int, default=None, help="tasks per node without GPUs (default 1)")
    g.add_argument("--cpus-per-task", type=int, default=None)
    g.add_argument("--mem", type=float, default=None, help="memory per node in GB")
    g.add_argument("--partition", default=None)
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None)
    g.add_argument("--time", default=None, help="time limit: minutes, HH:MM:SS or D-HH:MM:SS (default: the site "
                                                "file's, else 24:00:00)")
    g.add_argument("--signal-delay-s", type=int, default=120,
                   help="USR2 this many seconds before the time limit: checkpoint + requeue")
    g.add_argument("--max-requeues", type=int, default=3, help="requeues per run (time limit or preemption)")
    g.add_argument("--job-name", default=None)
    g.add_argument("--folder", default=None, help="submitit logs/pickles (default <run_dir>/submitit)")
    g.add_argument("--step-time-s", type=float, default=None,
                   help="seconds per optimizer step, for the time-limit check (default: estimate on GPUs)")
    t = p.add_argument_group("training (passed to pipeline/train.py)")
    t.add_argument("--recipe", default=None)
    t.add_argument("--model", default=None, help="model; without --recipe also its recipe, recipes/<model>.yaml")
    t.add_argument("--data", default=None)
    t.add_argument("--deepspeed-config", "--deepspeed_config", default=None)
    t.add_argument("--run-dir", default=None,
                   help="default: <runs_root or runs>/<model>-<time> (must be unique per run)")
    t.add_argument("--global-batch", type=int, default=None,
                   help="data.global_batch_size override (per-rank batch and accumulation follow the world size)")
    a = p.add_argument_group("actions")
    a.add_argument("--dry-run", action="store_true", help="print the plan, submit nothing")
    a.add_argument("--wait", action="store_true", help="wait for the job and print its final metrics")
    p.add_argument("overrides", nargs="*", help="training config overrides: section.field=value")
    return p


def parse_time_min(text: str) -> int:
    """SLURM time formats (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) -> whole minutes (>= 1)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not m:
        raise ConfigError(f"--time: {text!r} is not a SLURM time (minutes, HH:MM:SS or D-HH:MM:SS)")
    days, a, b, c = m.groups()
    if days is not None:
        secs = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:
        secs = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:
        secs = int(a) * 60 + int(b)
    else:
        secs = int(a) * 60
    minutes = -(-secs // 60)
    if minutes < 1:
        raise ConfigError(f"--time: {text!r} must be at least one minute")
    return minutes


def _fmt_min(minutes: float) -> str:
    return f"{int(minutes // 60)}:{int(minutes % 60):02d}:{int(round(minutes * 60 % 60)):02d}"


# ----------------------------------------------------------------------------------------------- validation
def _check_model(name: str) -> None:
    import timm  # local: timm and torchvision take ~1.5 s to import; --help and the flag checks come first

    import pipeline.models  # noqa: F401 - local, as timm: registers cpvt_* in timm

    if not timm.is_model(name):
        known = sorted(m for m in timm.list_models() if m.startswith("cpvt"))
        raise ConfigError(f"--model: {name!r} is not one of {known}")


def _check_data(cfg) -> None:
    root = cfg.data.root
    if not root:
        raise ConfigError("--data: must be set (the data_prep output folder, e.g. runs/demo/data)")
    if is_url(root):   # s3:// or http(s)://: read_num_classes and the loader check it through pipeline.storage
        return
    path = Path(root)
    if not path.is_dir():
        raise ConfigError(f"--data: {root} does not exist")
    fmt_dir = path / cfg.data.format
    if not fmt_dir.is_dir():
        raise ConfigError(f"--data: {root} has no {cfg.data.format}/ folder (data.format={cfg.data.format}; "
                          f"write it with `python -m data_prep {cfg.data.format} ...`)")


def _train_samples(cfg) -> int | None:
    try:
        return int(read_wds_info(cfg.data.root)["splits"]["train"]["num_samples"])
    except (ConfigError, KeyError, ValueError, TypeError):
        return None


def known_gpu_type(text: str | None) -> str | None:
    """"NVIDIA A100-SXM4-80GB", "a100", "h100_80gb" -> the table's row name (None: not a known type)."""
    for name in ("H200", "H100", "A100", "V100"):
        if text and name.lower() in text.lower():
            return name
    return None


def measured_img_s(path: Path = GPU_CHECK_JSON) -> dict[str, dict[str, float]]:
    """Rows for the throughput table from ``make gpu-check`` (its JSON, if present): the cpvt_ti training
    throughput it measured at 224 px on one GPU of its type (FFCV, else WebDataset, else the bare engine), the
    other models scaled by the paper's V100 ratios."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    gpu = known_gpu_type((doc.get("environment") or {}).get("gpu"))
    att = doc.get("attribution") or {}
    img_s = next((att.get(k) for k in ("ffcv_img_s", "wds_img_s", "bare_engine_img_s")
                  if isinstance(att.get(k), (int, float)) and att.get(k) > 0), None)
    if doc.get("profile") != "gpu" or gpu is None or img_s is None:
        return {}
    v100 = GPU_IMG_S["V100"]
    return {gpu: {m: img_s * v / v100["cpvt_ti"] for m, v in v100.items()}}


def estimate_step_s(model: str, micro: int, accum: int, resolution: int, gpu_type: str | None
                    ) -> tuple[float, str] | None:
    """(seconds per optimizer step on one GPU, what the number rests on), None for a model outside the table."""
    table = {k: dict(v) for k, v in GPU_IMG_S.items()}
    for k, v in measured_img_s().items():
        table.setdefault(k, {}).update(v)
    row, note = gpu_type, f"{gpu_type} throughput"
    if not table.get(row, {}).get(model):
        row, note = "V100", (f"no {gpu_type} numbers yet (make gpu-check adds them): the paper's V100 throughput"
                             if gpu_type else "GPU type unknown: the paper's V100 throughput (the slowest listed)")
    elif row != "V100":
        note = f"{row} throughput measured by make gpu-check"
    else:
        note = "the paper's V100 throughput"
    img_s = table[row].get(model)
    if not img_s:
        return None
    img_s *= (224 / max(resolution, 1)) ** 2   # same work per token: scales with the pixel count
    return micro * accum / img_s, note


def _check_time(cfg, args, timeout_min: int, world: int, gpus: int, gpu_type: str | None, checks: list[str]
                ) -> int | None:
    """The time limit must leave room for one checkpoint interval before the requeue signal; when it is shorter
    than an epoch (and ``checkpoint.every_steps`` is 0), returns the step interval to checkpoint at."""
    available_s = timeout_min * 60 - args.signal_delay_s
    if available_s <= 0:
        raise ConfigError(f"--signal-delay-s: {args.signal_delay_s} must be shorter than --time "
                          f"({_fmt_min(timeout_min)})")
    micro, accum = cfg.data.batch_size, cfg.optim.grad_accum
    step_s, source = args.step_time_s, "--step-time-s"
    if step_s is None and gpus:
        res = max(r for _, r, _ in ResolutionSchedule(cfg.schedule.resolution, cfg.run.epochs).table())
        est = estimate_step_s(cfg.model.name, micro, accum, res, gpu_type)
        if est is not None:
            step_s, source = est[0], f"estimate at {res} px: {est[1]}"
    n = _train_samples(cfg)
    epoch_steps = max(1, n // (micro * accum * world)) if n is not None else None
    derived = None
    if cfg.checkpoint.every_steps:
        steps, what = cfg.checkpoint.every_steps, f"checkpoint.every_steps={cfg.checkpoint.every_steps}"
    elif epoch_steps is None:
        checks.append("time limit vs checkpoint interval: not checked (train size unknown)")
        return None
    else:
        steps, what = epoch_steps, f"one epoch = {epoch_steps} steps (checkpoint.every_steps=0)"
    if step_s is None:
        checks.append("time limit vs checkpoint interval: not checked (no GPUs; pass --step-time-s)")
        return None
    if not cfg.checkpoint.every_steps and steps * step_s > available_s:
        derived = max(1, int(available_s / CHECKPOINTS_PER_JOB / step_s))
        checks.append(f"checkpoint.every_steps={derived} (derived: {what} x {step_s:.3g} s/step ({source}) = "
                      f"{steps * step_s / 60:.1f} min is longer than the {available_s / 60:.1f} min before the "
                      f"requeue signal; a checkpoint about every {derived * step_s / 60:.1f} min)")
        steps, what = derived, f"checkpoint.every_steps={derived}"
    interval_s = steps * step_s
    line = (f"{what} x {step_s:.3g} s/step ({source}) = {interval_s / 60:.1f} min; "
            f"time before the requeue signal = {available_s / 60:.1f} min")
    if interval_s > available_s:
        raise ConfigError(f"--time: {_fmt_min(timeout_min)} is shorter than one checkpoint interval ({line}); "
                          f"raise --time or lower checkpoint.every_steps")
    checks.append(f"one checkpoint interval ~ {line}")
    return derived


def plan(argv: list[str] | None = None) -> Plan:
    """Parse and validate the command line; raises a one-line ConfigError on any problem."""
    return plan_from_args(build_parser().parse_args(argv))


def resolve_resources(args: argparse.Namespace, site, site_file) -> dict[str, Setting]:
    """Every resource value with its source: flag > site file > SLURM (sinfo, scontrol) > default."""
    out = {name: pick(name, getattr(args, flag), site, site_file) for name, flag in
           (("partition", "partition"), ("account", "account"), ("qos", "qos"), ("constraint", "constraint"),
            ("mem_gb", "mem"))}
    out["time"] = pick("time", args.time, site, site_file, "24:00:00")
    gpus = pick("gpus_per_node", args.gpus_per_node, site, site_file)
    cpus = pick("cpus_per_task", args.cpus_per_task, site, site_file)
    gpu_type = pick("gpu_type", None, site, site_file)
    info = None
    if args.cluster == "slurm" and (gpus.value is None or cpus.value is None or gpu_type.value is None):
        info = query_partition(out["partition"].value)
    if gpus.value is None:
        gpus = (Setting(info.gpus_per_node, info.gpu_source) if info and info.gpus_per_node is not None else
                Setting(0, "default (no GPUs)" if args.cluster != "slurm" else
                        f"default (no GPUs): {'; '.join(info.notes) or 'SLURM lists none'}"))
    if gpu_type.value is None:
        found = info.gpu_type if info else None
        gpu_type = (Setting(found, info.gpu_source) if found else
                    Setting(known_gpu_type(out["constraint"].value), "--constraint" if out["constraint"].value else
                            "unknown"))
    out["gpus_per_node"], out["gpu_type"] = gpus, gpu_type
    tasks = gpus.value or args.tasks_per_node or 1
    out["tasks_per_node"] = Setting(tasks, "one task per GPU" if gpus.value else
                                    ("flag" if args.tasks_per_node else "default (CPU partition)"))
    if cpus.value is None and info and info.cpus_per_node:
        cpus = Setting(max(1, info.cpus_per_node // tasks),
                       f"{info.cpu_source}: {info.cpus_per_node} CPUs per node / {tasks} tasks")
    out["cpus_per_task"] = cpus
    return out


def plan_from_args(args: argparse.Namespace) -> Plan:
    """The plan for parsed flags; raises a one-line ConfigError on the first problem (flags, resources, recipe,
    overrides, training config, time limit, in this order)."""
    _check_resource_flags(args)
    site, site_file = load_site()
    res = resolve_resources(args, site, site_file)
    timeout_min = parse_time_min(res["time"].value)
    world = args.nodes * res["tasks_per_node"].value
    if args.model is not None:
        _check_model(args.model)

    _resolve_recipe_and_data(args, site, site_file, res)
    data_root = res["data_root"].value
    # a URL's credentials travel in the job's environment (CPVT_DATA_ROOT), never in its pickled argv or logs
    flags = {"--recipe": res["recipe"].value, "--model": args.model,
             "--data": redact(str(data_root)) if data_root is not None else None,
             "--deepspeed_config": args.deepspeed_config}
    train_argv = [x for k, v in flags.items() if v is not None for x in (k, str(v))]
    overrides = _training_overrides(args, site, site_file, res)
    cfg, _ = _load_config(args, res, overrides, world)
    run_dir = _resolve_run_dir(args, cfg, site, site_file, res)
    cfg, ds = _load_config(args, res, overrides, world, run_dir)
    checks, derived = _config_checks(cfg, args, res, world, timeout_min)
    if derived is not None:
        overrides.append(f"checkpoint.every_steps={derived}")
        cfg, ds = _load_config(args, res, overrides, world, run_dir)

    train_argv += ["--run-dir", str(run_dir), *overrides]
    folder = Path(args.folder).resolve() if args.folder else run_dir / "submitit"
    return Plan(cluster=args.cluster, executor_params=_executor_params(args, res, timeout_min, cfg.model.name),
                train_argv=train_argv, run_dir=run_dir, folder=folder, world_size=world,
                data_secret=str(data_root) if data_root is not None and redact(str(data_root)) != data_root else None,
                max_requeues=args.max_requeues, config_yaml=cfg.to_yaml(), deepspeed=ds,
                tracking_uri=tracking.default_uri(cfg.tracking.uri) if cfg.tracking.enabled else "(tracking disabled)",
                experiment=cfg.tracking.experiment, checks=checks,
                run_name=(cfg.tracking.run_name or run_dir.name) if cfg.tracking.enabled else None,
                settings={"site file": Setting(site_file, "$CPVT_SITE or ~/.config/cpvt/site.yaml"), **res},
                model=cfg.model.name, recipe=cfg.tracking.recipe)


def _check_resource_flags(args: argparse.Namespace) -> None:
    """The resource and requeue flags on their own: known cluster, positive counts, one task per GPU."""
    check_choice("--cluster", args.cluster, CLUSTERS)
    check_positive("--nodes", args.nodes)
    if args.gpus_per_node is not None:
        check_positive("--gpus-per-node", args.gpus_per_node, allow_zero=True)
    if args.tasks_per_node is not None:
        check_positive("--tasks-per-node", args.tasks_per_node)
    if args.gpus_per_node and args.tasks_per_node and args.tasks_per_node != args.gpus_per_node:
        raise ConfigError(f"--tasks-per-node: {args.tasks_per_node} must equal --gpus-per-node "
                          f"{args.gpus_per_node} (one task per GPU)")
    if args.cpus_per_task is not None:
        check_positive("--cpus-per-task", args.cpus_per_task)
    if args.mem is not None:
        check_positive("--mem", args.mem)
    check_positive("--max-requeues", args.max_requeues, allow_zero=True)
    check_positive("--signal-delay-s", args.signal_delay_s, allow_zero=True)
    if args.step_time_s is not None:
        check_positive("--step-time-s", args.step_time_s)


def _resolve_recipe_and_data(args: argparse.Namespace, site, site_file, res: dict[str, Setting]) -> None:
    """Adds ``res["recipe"]`` (--recipe, else the model's paper recipe, else none) and ``res["data_root"]``
    (--data, else the site file's, else the recipe's)."""
    recipe = Setting(str(find_recipe(args.recipe, site.recipe_dirs)), "--recipe") if args.recipe else None
    if recipe is None and (found := recipe_for_model(args.model, site.recipe_dirs, site_file)) is not None:
        recipe = Setting(str(found[0]), found[1])
    res["recipe"] = recipe or Setting(None, "none (dataclass defaults)")
    res["data_root"] = (Setting(args.data, "flag") if args.data else
                        Setting(site.data_root, f"site file {site_file}") if site.data_root else
                        Setting(None, "recipe"))


def _training_overrides(args: argparse.Namespace, site, site_file, res: dict[str, Setting]) -> list[str]:
    """The trainer's section.field=value overrides: the command line's, --global-batch's and the site file's
    tracking URI (the job need not read the site file); adds ``res["mlflow_uri"]``."""
    overrides = list(args.overrides)
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override: {o!r} must look like section.field=value")
    if args.global_batch is not None:
        check_positive("--global-batch", args.global_batch)
        overrides.append(f"data.global_batch_size={args.global_batch}")
    defaults, _ = train_defaults(site, site_file, run_dir=False)
    if "tracking" in defaults and not any(o.startswith("tracking.uri=") for o in overrides):
        overrides.append(f"tracking.uri={defaults['tracking']['uri']}")   # the job need not read the site file
    res["mlflow_uri"] = Setting(site.mlflow_uri, f"site file {site_file}") if "tracking" in defaults else \
        Setting(os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI") \
        if os.environ.get("MLFLOW_TRACKING_URI") else Setting(None, "default store")
    return overrides


def _load_config(args: argparse.Namespace, res: dict[str, Setting], overrides: list[str], world: int,
                 run_dir: Path | None = None):
    """(TrainConfig, DeepSpeed config) as the job will load them, validated for ``world`` ranks."""
    extra = [] if run_dir is None else [f"run.run_dir={run_dir}"]
    return load_train_config(res["recipe"].value, _flag_overrides(args, res["data_root"].value) + overrides + extra,
                             world)


def _resolve_run_dir(args: argparse.Namespace, cfg, site, site_file, res: dict[str, Setting]) -> Path:
    """--run-dir, else the config's run.run_dir when set, else <runs_root>/<model>-<time>; adds
    ``res["runs_root"]``."""
    runs_root = Setting(site.runs_root, f"site file {site_file}") if site.runs_root else Setting("runs", "default")
    res["runs_root"] = runs_root
    run_dir = args.run_dir or (cfg.run.run_dir if cfg.run.run_dir != DEFAULT_RUN_DIR else
                               f"{runs_root.value}/{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return Path(run_dir).resolve()


def _config_checks(cfg, args: argparse.Namespace, res: dict[str, Setting], world: int, timeout_min: int
                   ) -> tuple[list[str], int | None]:
    """The resolved config against the data and the resources: (the plan's check lines, the derived
    checkpoint.every_steps or None)."""
    _check_model(cfg.model.name)
    _check_data(cfg)
    read_num_classes(cfg)
    check_index(cfg)   # the index parses and every shard has the size it records: before the job queues
    checks: list[str] = [f"world size {world} = {args.nodes} nodes x {res['tasks_per_node'].value} tasks; "
                         f"{batch_plan(cfg, world).line()}"
                         + (" (data.global_batch_size)" if cfg.data.global_batch_size else
                            " (data.batch_size per rank: the global batch grows with the world size)")]
    checks += plan_lines(cfg, world)   # a budgeted resolution schedule's stages
    cpus = res["cpus_per_task"].value
    if cpus:
        fitted, line = fit_num_workers(cfg.data, cpus)
        checks.append(line or f"loader workers: {fitted.num_workers} per rank ({cpus} CPUs per task)")
    derived = _check_time(cfg, args, timeout_min, world, res["gpus_per_node"].value, res["gpu_type"].value, checks)
    return checks, derived


def _executor_params(args: argparse.Namespace, res: dict[str, Setting], timeout_min: int, model: str
                     ) -> dict[str, Any]:
    """The submitit executor's parameters (SLURM: requeue on, the whole step killed when one task fails)."""
    params = dict(nodes=args.nodes, tasks_per_node=res["tasks_per_node"].value,
                  gpus_per_node=res["gpus_per_node"].value or None, cpus_per_task=res["cpus_per_task"].value,
                  mem_gb=res["mem_gb"].value, partition=res["partition"].value,
                  account=res["account"].value, qos=res["qos"].value, constraint=res["constraint"].value,
                  timeout_min=timeout_min, signal_delay_s=args.signal_delay_s,
                  job_name=args.job_name or f"cpvt-{model}", max_num_timeout=args.max_requeues)
    if args.cluster == "slurm":
        params.update(additional_parameters={"requeue": True}, srun_args=["--kill-on-bad-exit=1"])
    return params


def _flag_overrides(args, data_root: str | None = None) -> list[str]:
    """The trainer turns its flags into these overrides; the launcher validates the same way."""
    flags = {"model.name": args.model, "data.root": data_root if data_root is not None else args.data,
             "run.deepspeed_config": args.deepspeed_config}
    return [f"{k}={v}" for k, v in flags.items() if v is not None]


# ----------------------------------------------------------------------------------------------- actions
def describe(p: Plan) -> str:
    lines = [f"cluster: {p.cluster}", f"run dir: {p.run_dir}", f"submitit folder: {p.folder}",
             f"world size: {p.world_size}", f"max requeues: {p.max_requeues}",
             f"MLflow: {p.tracking_uri} (experiment {p.experiment!r}; the run is created at submission)",
             "settings (value  [source]):", *[f"  {k}: {v}" for k, v in p.settings.items()],
             "checks:"]
    lines += [f"  {c}" for c in p.checks]
    lines.append("executor parameters: " + json.dumps(p.executor_params, sort_keys=True))
    if p.cluster == "slurm" and shutil.which("sbatch"):
        with tempfile.TemporaryDirectory() as tmp:  # a dry run writes nothing
            header = [ln.replace(tmp, str(p.folder)) for ln in
                      sbatch_header(make_executor(tmp, "slurm", **p.executor_params)).splitlines()
                      if ln.startswith("#SBATCH")]
        lines += ["sbatch parameters:", *[f"  {ln}" for ln in header]]
    lines += ["task command: launchers.train_job.TrainJob -> pipeline.train.main(" +
              " ".join(p.train_argv + ["--resume", "auto"]) + ")",
              "training config:", *[f"  {ln}" for ln in p.config_yaml.splitlines()],
              "deepspeed config:", *[f"  {ln}" for ln in json.dumps(p.deepspeed, indent=1).splitlines()]]
    return "\n".join(lines)


def create_mlflow_run(p: Plan) -> str | None:
    """Create the job's MLflow run now, on the submitting host, in the store the job will write to."""
    if p.run_name is None:
        return None
    client = tracking.client_for(p.tracking_uri)
    exp_id = tracking.experiment_id(client, p.experiment)
    # what the runs table shows while the job is queued; the trainer adds device, precision, git, job id
    tags = {"launcher.cluster": p.cluster, "world_size": str(p.world_size),
            "zero_stage": str(p.deepspeed.get("zero_optimization", {}).get("stage", 0)),
            "run_dir": str(p.run_dir)}
    tags |= {k: v for k, v in (("model", p.model), ("recipe", p.recipe)) if v}
    run_id = client.create_run(exp_id, run_name=p.run_name, tags=tags).info.run_id
    client.update_run(run_id, status="SCHEDULED")  # queued; the trainer marks it RUNNING when it starts
    return run_id


def end_mlflow_run(p: Plan, status: str) -> None:
    """Mark the submitted run ended (the job failed or was never submitted) unless the trainer already did."""
    if p.mlflow_run_id is None:
        return
    client = tracking.client_for(p.tracking_uri)
    if client.get_run(p.mlflow_run_id).info.status in ("RUNNING", "SCHEDULED"):
        client.set_terminated(p.mlflow_run_id, status=status)


def previous_mlflow_run(p: Plan) -> str | None:
    """The MLflow run of an earlier submission of this run dir (same store) that left a complete checkpoint: a
    resubmission (e.g. on fewer nodes after a preemption) continues it instead of creating another run."""
    from pipeline.checkpointing import find_latest  # local: imports torch (~1 s); --help stays instant

    record = p.run_dir / "submissions.jsonl"
    if p.run_name is None or not record.is_file() or find_latest(p.run_dir / "checkpoints") is None:
        return None
    runs = [r.get("mlflow_run_id") for r in map(json.loads, record.read_text().splitlines())
            if r.get("tracking_uri") == p.tracking_uri]
    return next((r for r in reversed(runs) if r), None)


def submit(p: Plan):
    """Create the MLflow run (``p.mlflow_run_id``), submit the plan; returns the submitit job (one task per rank).

    The job continues that run (``TrainJob`` passes its id as ``MLFLOW_RUN_ID``), requeued runs too; a
    resubmission of a run dir that holds a checkpoint continues the earlier submission's run."""
    # local: launchers.train_job imports torch (through pipeline.distributed); --help stays instant
    from launchers.train_job import TrainJob

    p.run_dir.mkdir(parents=True, exist_ok=True)
    executor = make_executor(p.folder, p.cluster, **p.executor_params)
    p.mlflow_run_id = previous_mlflow_run(p)
    if p.mlflow_run_id is not None:
        tracking.client_for(p.tracking_uri).update_run(p.mlflow_run_id, status="SCHEDULED")
    else:
        p.mlflow_run_id = create_mlflow_run(p)
    task = TrainJob(p.train_argv, str(p.run_dir), p.max_requeues, mlflow_run_id=p.mlflow_run_id,
                    tracking_uri=p.tracking_uri if p.mlflow_run_id else None)
    if p.data_secret is not None:   # sbatch and the local executor pass the submitter's environment on
        os.environ["CPVT_DATA_ROOT"] = p.data_secret
    try:
        job = executor.submit(task)
    except BaseException:
        end_mlflow_run(p, "FAILED")
        raise
    if p.mlflow_run_id is not None:
        tracking.client_for(p.tracking_uri).set_tag(p.mlflow_run_id, "launcher.job_id", job.job_id)
    record = {"job_id": job.job_id, "cluster": p.cluster, "folder": str(p.folder), "time": time.time(),
              "train_argv": p.train_argv, "executor_params": p.executor_params,
              "tracking_uri": p.tracking_uri, "experiment": p.experiment, "mlflow_run_id": p.mlflow_run_id}
    with open(p.run_dir / "submissions.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return job


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        p = plan_from_args(args)
    except ConfigError as e:
        print(redact(f"error: {e}"), file=sys.stderr)
        return 2
    if args.dry_run:
        print(redact(describe(p)))
        return 0
    job = submit(p)
    print(f"submitted job {job.job_id} on {p.cluster} ({p.world_size} tasks)")
    first = job.task(0).paths
    print(f"logs (rank 0): {first.stdout}\n               {first.stderr}")
    if job.num_tasks > 1:
        print(f"logs (rank k): {str(first.stdout).replace('_0_log', '_<k>_log')}")
    print(f"run dir: {p.run_dir}")
    if p.mlflow_run_id is not None:
        print(redact(f"MLflow: {p.tracking_uri} experiment {p.experiment!r} run {p.mlflow_run_id}"))
    else:
        print("MLflow: tracking disabled")
    if not args.wait:
        return 0
    try:
        results = wait_for(job)
    except JobFailedError as e:
        print(redact(f"job {job.job_id} failed:\n{e.text}"), file=sys.stderr)
        end_mlflow_run(p, "FAILED")
        return 1
    summary = results[0] if isinstance(results, list) else results
    print(f"finished: global_step={summary.get('global_step')} MLflow run {summary.get('mlflow_run_id')}")
    print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
