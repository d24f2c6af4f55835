"""Submit a CPVT training run to SLURM (or run the same path locally) with submitit.

    python launchers/slurm_submit.py --nodes 4 --gpus-per-node 8 --model cpvt_b --data /data/imagenet_prep \\
        --recipe cpvt_b --partition p --account a --time 72:00:00 [section.field=value ...]
    python launchers/slurm_submit.py ... --dry-run          # resolved sbatch parameters + training config
    python launchers/slurm_submit.py ... --cluster local    # same tasks as subprocesses on this machine

One task per GPU (``--gpus-per-node``; on CPU nodes ``--tasks-per-node``). Each task exports the
torch.distributed rendezvous variables from SLURM (:mod:`launchers.dist_env`) and runs
``pipeline.train.main`` with ``--resume auto`` (:mod:`launchers.train_job`): on the time-limit/preemption signal
the run checkpoints and requeues itself, at most ``--max-requeues`` times, continuing the same MLflow run.
That run is created at submission (in the store the job writes to) and its id printed with the job id; the job
continues it. ``--dry-run`` creates nothing.

Everything that can be checked is checked before submission, each failure one line (exit code 2): node/task
counts, the SLURM time format, the model name (timm registry), the data folder, the whole training config and
its DeepSpeed batch arithmetic (``--global-batch`` must divide by world size x accumulation), and that the time
limit leaves room for at least one checkpoint interval (``checkpoint.every_steps`` steps, else one epoch, times
``--step-time-s`` or an estimate from the paper's V100 throughput when GPUs are requested).
"""
from __future__ import annotations

import argparse
import json
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

from pipeline.config import ConfigError, check_choice, check_positive  # noqa: E402

from launchers.executor import CLUSTERS  # noqa: E402

# Images/s of one 16 GB V100 at 224 px (CPVT paper, Table 5): the fallback step-time estimate.
V100_IMG_S = {"cpvt_ti": 2500.7, "cpvt_ti_gap": 2520.1, "cpvt_s": 930.5, "cpvt_s_gap": 942.3,
              "cpvt_b": 285.5, "cpvt_b_gap": 285.5}
DEFAULT_RUN_DIR = "runs/default"


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
    mlflow_run_id: str | None = None  # set by submit(): the run created for this job


# ----------------------------------------------------------------------------------------------- parsing
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("resources")
    g.add_argument("--cluster", default="slurm", help=f"one of {list(CLUSTERS)}")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=None, help="one task per GPU")
    g.add_argument("--tasks-per-node", type=int, default=None, help="tasks per node without GPUs (default 1)")
    g.add_argument("--cpus-per-task", type=int, default=None)
    g.add_argument("--mem", type=float, default=None, help="memory per node in GB")
    g.add_argument("--partition", default=None)
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None)
    g.add_argument("--time", default="24:00:00", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS")
    g.add_argument("--signal-delay-s", type=int, default=120,
                   help="USR2 this many seconds before the time limit: checkpoint + requeue")
    g.add_argument("--max-requeues", type=int, default=3, help="requeues per run (time limit or preemption)")
    g.add_argument("--job-name", default=None)
    g.add_argument("--folder", default=None, help="submitit logs/pickles (default <run_dir>/submitit)")
    g.add_argument("--step-time-s", type=float, default=None,
                   help="seconds per optimizer step, for the time-limit check (default: estimate on GPUs)")
    t = p.add_argument_group("training (passed to pipeline/train.py)")
    t.add_argument("--recipe", default=None)
    t.add_argument("--model", default=None)
    t.add_argument("--data", default=None)
    t.add_argument("--deepspeed-config", "--deepspeed_config", default=None)
    t.add_argument("--run-dir", default=None, help="default: runs/<model>-<time> (must be unique per run)")
    t.add_argument("--global-batch", type=int, default=None,
                   help="global batch; data.batch_size = global / (world x optim.grad_accum)")
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
    import timm

    import pipeline.models  # noqa: F401 - registers cpvt_* in timm

    if not timm.is_model(name):
        known = sorted(m for m in timm.list_models() if m.startswith("cpvt"))
        raise ConfigError(f"--model: {name!r} is not one of {known}")


def _check_data(cfg) -> None:
    root = cfg.data.root
    if not root:
        raise ConfigError("--data: must be set (the data_prep output folder, e.g. runs/demo/data)")
    path = Path(root)
    if not path.is_dir():
        raise ConfigError(f"--data: {root} does not exist")
    fmt_dir = path / cfg.data.format
    if not fmt_dir.is_dir():
        raise ConfigError(f"--data: {root} has no {cfg.data.format}/ folder (data.format={cfg.data.format}; "
                          f"write it with `python -m data_prep {cfg.data.format} ...`)")


def _train_samples(cfg) -> int | None:
    info = Path(cfg.data.root) / "wds" / "_info.json"
    try:
        return int(json.loads(info.read_text())["splits"]["train"]["num_samples"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def _check_time(cfg, args, timeout_min: int, world: int, checks: list[str]) -> None:
    """The time limit must leave room for one checkpoint interval before the requeue signal."""
    available_s = timeout_min * 60 - args.signal_delay_s
    if available_s <= 0:
        raise ConfigError(f"--signal-delay-s: {args.signal_delay_s} must be shorter than --time "
                          f"({_fmt_min(timeout_min)})")
    micro, accum = cfg.data.batch_size, cfg.optim.grad_accum
    if cfg.checkpoint.every_steps:
        steps, what = cfg.checkpoint.every_steps, f"checkpoint.every_steps={cfg.checkpoint.every_steps}"
    else:
        n = _train_samples(cfg)
        if n is None:
            checks.append("time limit vs checkpoint interval: not checked (train size unknown)")
            return
        steps = max(1, n // (micro * accum * world))
        what = f"one epoch = {steps} steps (checkpoint.every_steps=0)"
    step_s, source = args.step_time_s, "--step-time-s"
    if step_s is None and args.gpus_per_node and cfg.model.name in V100_IMG_S:
        res = cfg.schedule.resolution.resolution if hasattr(cfg.schedule.resolution, "resolution") else 224
        img_s = V100_IMG_S[cfg.model.name] * (224 / max(int(res or 224), 1)) ** 2
        step_s, source = micro * accum / img_s, "estimate from V100 throughput"
    if step_s is None:
        checks.append("time limit vs checkpoint interval: not checked (no GPUs; pass --step-time-s)")
        return
    interval_s = steps * step_s
    line = (f"{what} x {step_s:.3g} s/step ({source}) = {interval_s / 60:.1f} min; "
            f"time before the requeue signal = {available_s / 60:.1f} min")
    if interval_s > available_s:
        raise ConfigError(f"--time: {_fmt_min(timeout_min)} is shorter than one checkpoint interval ({line}); "
                          f"raise --time or lower checkpoint.every_steps")
    checks.append(f"one checkpoint interval ~ {line}")


def plan(argv: list[str] | None = None) -> Plan:
    """Parse and validate the command line; raises a one-line ConfigError on any problem."""
    return plan_from_args(build_parser().parse_args(argv))


def plan_from_args(args: argparse.Namespace) -> Plan:
    from pipeline.recipe import load_train_config, read_num_classes
    from pipeline.tracking import default_uri

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
    timeout_min = parse_time_min(args.time)
    tasks_per_node = args.gpus_per_node or args.tasks_per_node or 1
    world = args.nodes * tasks_per_node
    if args.model is not None:
        _check_model(args.model)

    flags = {"--recipe": args.recipe, "--model": args.model, "--data": args.data,
             "--deepspeed_config": args.deepspeed_config}
    train_argv = [x for k, v in flags.items() if v is not None for x in (k, str(v))]
    overrides = list(args.overrides)
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override: {o!r} must look like section.field=value")

    def load(extra: list[str]):
        return load_train_config(args.recipe, _flag_overrides(args) + overrides + extra, world)

    cfg, _ = load([])
    if args.global_batch is not None:
        check_positive("--global-batch", args.global_batch)
        per = world * cfg.optim.grad_accum
        if args.global_batch % per:
            raise ConfigError(f"--global-batch: {args.global_batch} is not divisible by world size {world} x "
                              f"optim.grad_accum {cfg.optim.grad_accum} = {per}")
        overrides.append(f"data.batch_size={args.global_batch // per}")
    run_dir = args.run_dir or (cfg.run.run_dir if cfg.run.run_dir != DEFAULT_RUN_DIR else
                               f"runs/{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = Path(run_dir).resolve()
    cfg, ds = load([f"run.run_dir={run_dir}"])
    _check_model(cfg.model.name)
    _check_data(cfg)
    read_num_classes(cfg)
    checks: list[str] = [f"world size {world} = {args.nodes} nodes x {tasks_per_node} tasks; global batch "
                         f"{ds['train_batch_size']} = {ds['train_micro_batch_size_per_gpu']} x "
                         f"{ds['gradient_accumulation_steps']} x {world}"]
    _check_time(cfg, args, timeout_min, world, checks)

    train_argv += ["--run-dir", str(run_dir), *overrides]
    folder = Path(args.folder).resolve() if args.folder else run_dir / "submitit"
    params = dict(nodes=args.nodes, tasks_per_node=tasks_per_node, gpus_per_node=args.gpus_per_node or None,
                  cpus_per_task=args.cpus_per_task, mem_gb=args.mem, partition=args.partition,
                  account=args.account, qos=args.qos, constraint=args.constraint, timeout_min=timeout_min,
                  signal_delay_s=args.signal_delay_s, job_name=args.job_name or f"cpvt-{cfg.model.name}",
                  max_num_timeout=args.max_requeues)
    if args.cluster == "slurm":
        params.update(additional_parameters={"requeue": True}, srun_args=["--kill-on-bad-exit=1"])
    return Plan(cluster=args.cluster, executor_params=params, train_argv=train_argv, run_dir=run_dir,
                folder=folder, world_size=world, max_requeues=args.max_requeues, config_yaml=cfg.to_yaml(),
                deepspeed=ds, tracking_uri=default_uri(run_dir, cfg.tracking.uri) if cfg.tracking.enabled else
                "(tracking disabled)", experiment=cfg.tracking.experiment, checks=checks,
                run_name=(cfg.tracking.run_name or run_dir.name) if cfg.tracking.enabled else None)


def _flag_overrides(args) -> list[str]:
    """The trainer turns its flags into these overrides; the launcher validates the same way."""
    flags = {"model.name": args.model, "data.root": args.data, "run.deepspeed_config": args.deepspeed_config}
    return [f"{k}={v}" for k, v in flags.items() if v is not None]


# ----------------------------------------------------------------------------------------------- actions
def describe(p: Plan) -> str:
    from launchers.executor import make_executor, sbatch_preview

    lines = [f"cluster: {p.cluster}", f"run dir: {p.run_dir}", f"submitit folder: {p.folder}",
             f"world size: {p.world_size}", f"max requeues: {p.max_requeues}",
             f"MLflow: {p.tracking_uri} (experiment {p.experiment!r}; the run is created at submission)",
             "checks:"]
    lines += [f"  {c}" for c in p.checks]
    lines.append("executor parameters: " + json.dumps(p.executor_params, sort_keys=True))
    if p.cluster == "slurm" and shutil.which("sbatch"):
        with tempfile.TemporaryDirectory() as tmp:  # a dry run writes nothing
            header = [ln.replace(tmp, str(p.folder)) for ln in
                      sbatch_preview(make_executor(tmp, "slurm", **p.executor_params)).splitlines()
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
    from mlflow.tracking import MlflowClient

    client = MlflowClient(p.tracking_uri)
    exp = client.get_experiment_by_name(p.experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(p.experiment)
    run_id = client.create_run(exp_id, run_name=p.run_name, tags={"launcher.cluster": p.cluster}).info.run_id
    client.update_run(run_id, status="SCHEDULED")  # queued; the trainer marks it RUNNING when it starts
    return run_id


def end_mlflow_run(p: Plan, status: str) -> None:
    """Mark the submitted run ended (the job failed or was never submitted) unless the trainer already did."""
    if p.mlflow_run_id is None:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(p.tracking_uri)
    if client.get_run(p.mlflow_run_id).info.status in ("RUNNING", "SCHEDULED"):
        client.set_terminated(p.mlflow_run_id, status=status)


def previous_mlflow_run(p: Plan) -> str | None:
    """The MLflow run of an earlier submission of this run dir (same store) that left a complete checkpoint: a
    resubmission (e.g. on fewer nodes after a preemption) continues it instead of creating another run."""
    from pipeline.checkpointing import find_latest

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
    from launchers.executor import make_executor
    from launchers.train_job import TrainJob

    p.run_dir.mkdir(parents=True, exist_ok=True)
    executor = make_executor(p.folder, p.cluster, **p.executor_params)
    p.mlflow_run_id = previous_mlflow_run(p)
    if p.mlflow_run_id is not None:
        from mlflow.tracking import MlflowClient

        MlflowClient(p.tracking_uri).update_run(p.mlflow_run_id, status="SCHEDULED")
    else:
        p.mlflow_run_id = create_mlflow_run(p)
    task = TrainJob(p.train_argv, str(p.run_dir), p.max_requeues, mlflow_run_id=p.mlflow_run_id,
                    tracking_uri=p.tracking_uri if p.mlflow_run_id else None)
    try:
        job = executor.submit(task)
    except BaseException:
        end_mlflow_run(p, "FAILED")
        raise
    if p.mlflow_run_id is not None:
        from mlflow.tracking import MlflowClient

        MlflowClient(p.tracking_uri).set_tag(p.mlflow_run_id, "launcher.job_id", job.job_id)
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
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(describe(p))
        return 0
    job = submit(p)
    print(f"submitted job {job.job_id} on {p.cluster} ({p.world_size} tasks)")
    first = job.task(0).paths
    print(f"logs (rank 0): {first.stdout}\n               {first.stderr}")
    if job.num_tasks > 1:
        print(f"logs (rank k): {str(first.stdout).replace('_0_log', '_<k>_log')}")
    print(f"run dir: {p.run_dir}")
    if p.mlflow_run_id is not None:
        print(f"MLflow: {p.tracking_uri} experiment {p.experiment!r} run {p.mlflow_run_id}")
    else:
        print("MLflow: tracking disabled")
    if not args.wait:
        return 0
    from launchers.executor import JobFailedError, wait_for

    try:
        results = wait_for(job)
    except JobFailedError as e:
        print(f"job {job.job_id} failed:\n{e.text}", file=sys.stderr)
        end_mlflow_run(p, "FAILED")
        return 1
    summary = results[0] if isinstance(results, list) else results
    print(f"finished: global_step={summary.get('global_step')} MLflow run {summary.get('mlflow_run_id')}")
    print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
