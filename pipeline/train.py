"""Train a CPVT model with DeepSpeed (ZeRO 1/2/3; bf16, fp16 or fp32) on WebDataset or FFCV shards.

    deepspeed pipeline/train.py --deepspeed_config deepspeed_configs/zero2.json --model cpvt_ti
    deepspeed pipeline/train.py --deepspeed_config deepspeed_configs/zero2.json \
        --recipe pipeline/recipes/cpvt_ti.yaml --model cpvt_ti --data DATA [section.field=value ...]
    torchrun --nproc_per_node 8 pipeline/train.py ...        # or srun python pipeline/train.py ... (SLURM vars)

``--model X`` without ``--recipe`` trains the paper's recipe for X (``pipeline/recipes/X.yaml``); the data root,
runs root and MLflow store may come from the site file (:mod:`pipeline.config.site`). The recipe's global batch
is formed on any world size: the per-rank batch and the accumulation steps are derived (:mod:`pipeline.config`).

The whole config (recipe YAML <- CLI overrides), the DeepSpeed batch arithmetic, the device and the precision are
validated before any data is read or a process group exists. ``--resume auto`` continues from the newest
*complete* checkpoint under ``<run_dir>/checkpoints`` and the same MLflow run, on any world size with the same
global batch (:mod:`pipeline.resume_check`; checked before anything starts, self-checked before the first step).
SIGUSR1/SIGTERM: save a checkpoint at a step boundary all ranks agree on and exit with :data:`EXIT_PREEMPTED` so
a launcher can requeue.

The loop: :class:`Trainer` builds the parts once (engine, EMA, schedules, loader, evaluator, checkpointer,
tracker); each part owns its cadence and state. :meth:`Trainer.train_step` runs one optimizer step and never
waits on the host: losses are summed on the device and read when logging; a step whose gradients are not finite
is skipped by DeepSpeed itself (its overflow check, global over ranks), and the trainer only reads the flag
DeepSpeed already brought to the host.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

if __package__ in (None, ""):  # `deepspeed pipeline/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ConfigError, TrainConfig, load_train_config  # noqa: E402
from pipeline.preemption import install_stop_handlers, request_stop, stop_signal  # noqa: E402,F401
from pipeline.data.shard_index import read_num_classes  # noqa: E402

EXIT_PREEMPTED = 75   # checkpoint saved after SIGUSR1/SIGTERM; requeue me (EX_TEMPFAIL)
EXIT_NONFINITE = 65   # too many non-finite losses in a row
EXIT_CONFIG = 2       # one-line ConfigError / DeviceError, nothing was started
EXIT_CODES = {None: 0, "max_steps": 0, "stop": EXIT_PREEMPTED, "nonfinite": EXIT_NONFINITE}


class NonFiniteLossError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------- CLI
@dataclass
class CommandLine:
    """What the command line (and the site file) asks for: the recipe, the overrides, the site defaults that sit
    below the recipe, and one note per choice made on the user's behalf (logged before training)."""
    recipe: str | None
    overrides: list[str]
    defaults: dict[str, Any]
    recipe_dirs: list[str]
    notes: list[str]
    site_notes: list[tuple[str, str, str]]   # (field, site value, note): logged where the value was used

    def lines(self, cfg: TrainConfig) -> list[str]:
        """The notes for what ``cfg`` really took from the recipe choice and the site file."""
        from pipeline.config import flatten, to_dict

        used = flatten(to_dict(cfg))
        return self.notes + [text for key, value, text in self.site_notes if str(used.get(key)) == value]


def parse_args(argv: list[str], environ: dict[str, str] | None = None) -> CommandLine:
    from pipeline.config import load_site, recipe_for_model, train_defaults

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=None, help="recipe YAML (path or name under pipeline/recipes)")
    p.add_argument("--model", default=None, help="model.name override (cpvt_ti, cpvt_s, ...); without --recipe "
                                                 "also the paper's recipe for it, pipeline/recipes/<model>.yaml")
    p.add_argument("--data", default=None, help="data.root override: the data_prep output folder")
    p.add_argument("--deepspeed_config", "--deepspeed-config", default=None, help="DeepSpeed JSON")
    p.add_argument("--run-dir", "--run_dir", default=None, help="run.run_dir override")
    p.add_argument("--resume", default=None, help="'auto', 'none' or a checkpoint path")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.field=value (e.g. optim.weight_decay=0.05)")
    args = p.parse_args(argv)
    site, site_file = load_site(environ)
    defaults, site_notes = train_defaults(site, site_file, environ)
    notes: list[str] = []
    recipe = args.recipe
    if recipe is None and (found := recipe_for_model(args.model, site.recipe_dirs, site_file)) is not None:
        recipe, why = str(found[0]), found[1]
        notes.insert(0, f"recipe {recipe} ({why}; --recipe picks another)")
    flags = {"model.name": args.model, "data.root": args.data, "run.deepspeed_config": args.deepspeed_config,
             "run.run_dir": args.run_dir, "checkpoint.resume": args.resume}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)
    return CommandLine(recipe, overrides, defaults, site.recipe_dirs, notes, site_notes)


def check_resume(cfg: TrainConfig) -> None:
    """``checkpoint.resume``: a path must be a complete checkpoint (found now, not after the process group)."""
    from pipeline.checkpointing import resolve_resume

    try:
        resolve_resume(cfg.checkpoint.resume, cfg.run_dir / "checkpoints")
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Validate everything (config, data folder, resume checkpoint, loader workers, device, precision), then
    train; returns the final summary."""
    from pipeline.data.workers import fit_num_workers, task_cpus
    from pipeline.distributed import detect_env

    cmd = parse_args(sys.argv[1:] if argv is None else argv)
    env = detect_env()
    cfg, ds_config = load_train_config(cmd.recipe, cmd.overrides, env.world_size, defaults=cmd.defaults,
                                       recipe_dirs=cmd.recipe_dirs)
    read_num_classes(cfg)  # classes.json must exist: fail now, not after the process group is up
    check_resume(cfg)
    data, workers_line = fit_num_workers(cfg.data, task_cpus())   # before ffcv/numba are imported
    cfg.data = data
    if env.rank == 0:
        from pipeline.config import batch_plan

        for line in [*cmd.lines(cfg), workers_line, f"batch: {batch_plan(cfg, env.world_size).line()}"]:
            if line:
                print(f"config: {line}", flush=True)
    return run(cfg, ds_config)


def run(cfg: TrainConfig, ds_config: dict[str, Any] | None = None, *, train_loader=None) -> dict[str, Any]:
    """Train ``cfg``. ``train_loader``: any object with the TrainLoader contract (benchmarks feed in-memory
    batches); by default the recipe's WebDataset/FFCV loader."""
    from pipeline import device as devices, tracking
    from pipeline.distributed import destroy, detect_env, init_distributed
    from pipeline.config import resolve_deepspeed_config

    if ds_config is None:
        ds_config = resolve_deepspeed_config(cfg, detect_env().world_size)
    num_classes = read_num_classes(cfg)
    choice = devices.select_device()
    ds_config, prec, prec_line = devices.finalize_deepspeed_config(ds_config, cfg, choice)
    # timm (and the cpvt_* registry) before the process group exists: torch modules that timm imports lazily take
    # ``group=dist.group.WORLD`` as a default argument, and importing them afterwards pins the group (gloo's
    # threads then outlive destroy() and abort the process at exit)
    import timm  # noqa: F401

    import pipeline.models  # noqa: F401

    from pipeline.resume_check import plan_resume

    # the checkpoint's layout vs this start's (global batch, canonical streams): refused before anything starts
    resume_plan = plan_resume(cfg, detect_env().world_size)
    env = init_distributed(choice, timeout_s=cfg.run.dist_timeout_s)
    install_stop_handlers()
    try:
        trainer = Trainer(cfg, ds_config, env, num_classes, choice, prec, train_loader=train_loader,
                          resume_plan=resume_plan)
        trainer.log.line(f"device {choice.reason}; {prec_line}")
        return trainer.fit()
    except (Exception, KeyboardInterrupt) as e:
        tracking.end_run_after_error(e)  # FAILED / KILLED, not FINISHED by MLflow's atexit hook
        raise
    finally:
        destroy()


# ----------------------------------------------------------------------------------------- the parts
_UNPLANNED = object()   # Trainer(resume_plan=...) not given


@dataclass
class TrainState:
    """Where the loop is; saved in every checkpoint. ``step_in_epoch`` counts data steps (a skipped step consumed
    its batches too), ``global_step`` counts optimizer steps that were applied. The checkpoint's ``COMPLETE``
    record also states the position as a global sample index (:func:`pipeline.resume_check.layout_meta`)."""
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_top1: float | None = None
    nonfinite_total: int = 0
    mlflow_run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


@dataclass
class StepResult:
    applied: bool          # DeepSpeed applied the optimizer step
    nonfinite: bool        # skipped because a loss or a gradient was not finite (not an fp16 loss-scale overflow)


def build_criterion(aug):
    """The recipe's loss: soft-target CE with Mixup/CutMix, else label-smoothed CE, else plain CE."""
    import torch
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if aug.mixup_active:
        return SoftTargetCrossEntropy()
    return LabelSmoothingCrossEntropy(aug.smoothing) if aug.smoothing > 0 else torch.nn.CrossEntropyLoss()


def _micro_batches(batches: Iterator, n: int) -> Iterator[list]:
    """Groups of ``n`` micro-batches (one optimizer step each); a short tail is yielded as is."""
    group: list = []
    for item in batches:
        group.append(item)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


def _step_keys(micro: list) -> list[str] | None:
    """The sample keys of one step's ``(x, y, keys)`` micro-batches; None if a micro-batch has none."""
    return None if any(m[2] is None for m in micro) else [k for _, _, ks in micro for k in ks]


class Trainer:
    """Builds the parts once; :meth:`fit` runs the epochs. Each part owns its cadence: the checkpointer
    (``checkpoint.every_steps`` and epoch ends), the evaluator (``eval.every_epochs``), the metrics
    (``run.log_every``), the stop agreement (``run.stop_check_steps``)."""

    def __init__(self, cfg: TrainConfig, ds_config: dict[str, Any], env, num_classes: int, choice, precision: str,
                 train_loader=None, resume_plan=_UNPLANNED):
        from pipeline import device as devices
        from pipeline.checkpointing import Checkpointer
        from pipeline.data.loader import build_train_loader
        from pipeline.evaluate import Evaluator
        from pipeline.logging_utils import LossMeter, ProgressLog, StepTimer
        from pipeline.preemption import StopAgreement
        from pipeline.rng import seed_everything
        from pipeline.schedules import LRSchedule, LRScheduler, ResolutionSchedule

        self.cfg, self.ds_config, self.precision = cfg, ds_config, precision
        self.rank, self.world, self.device = env.rank, env.world_size, choice.torch_device
        self.input_dtype = devices.torch_dtype(precision)
        self.accum = cfg.optim.grad_accum
        self.log = ProgressLog(self.rank, cfg.run.progress_bar)
        if self.rank == 0:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            (cfg.run_dir / "train_config.yaml").write_text(cfg.to_yaml())

        from pipeline.resume_check import plan_resume

        # run() plans before the process group exists (None: start fresh); another caller gets it planned here
        self.resume_plan = plan_resume(cfg, self.world) if resume_plan is _UNPLANNED else resume_plan
        if self.resume_plan is not None and self.resume_plan.universal:   # ZeRO partitions of another world size
            self.ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
        self._self_check, self._next_keys, self._pending = None, None, []
        self.engine, self.ema, self.num_params = self._build_engine(num_classes)
        self.res_schedule = ResolutionSchedule(cfg.schedule.resolution, cfg.run.epochs)
        self.lr_scheduler = LRScheduler(LRSchedule(cfg.schedule.lr, cfg.run.epochs), self.engine.optimizer)
        self.criterion = build_criterion(cfg.aug)
        seed_everything(cfg.run.seed + self.rank)  # per-rank streams for drop-path etc. (a resume restores them)
        self.state = TrainState()
        parts = {"train_state": self.state, "lr_schedule": self.lr_scheduler}
        if self.ema is not None:
            parts["ema"] = self.ema.module
        self.checkpointer = Checkpointer(self.engine, cfg.run_dir / "checkpoints", cfg.checkpoint, rank=self.rank,
                                         config_yaml=cfg.to_yaml(), components=parts, log=self.log.line,
                                         meta=self._layout_meta)
        self.keys_log = None
        if cfg.checkpoint.record_keys:
            (cfg.run_dir / "keys").mkdir(parents=True, exist_ok=True)
        self.tracker = self._resume_and_track(num_classes)
        self.loader = train_loader or build_train_loader(
            cfg.data, cfg.aug, num_classes=num_classes, rank=self.rank, world_size=self.world, seed=cfg.run.seed,
            device=self.device)
        self.evaluator = Evaluator(cfg, rank=self.rank, world_size=self.world, device=self.device,
                                   input_dtype=self.input_dtype)
        self.stop = StopAgreement(self.world, self.device, cfg.run.stop_check_steps)
        self.losses, self.timer, self.run_timer = LossMeter(self.device), StepTimer(), StepTimer()
        self.overflow_skipped, self._nonfinite_run, self.last_res, self._steps = 0, 0, None, 0
        self.results: dict[int, dict[str, float]] = {}
        self.log.line(f"model {cfg.model.name} ({self.num_params / 1e6:.2f}M params) world={self.world} "
                      f"precision={precision} zero={self.engine.zero_optimization_stage()} run_dir={cfg.run_dir}")

    def _build_engine(self, num_classes: int):
        """(DeepSpeed engine, fp32 EMA or None, parameter count): the same initial weights on every rank."""
        import deepspeed
        import timm
        import torch

        from pipeline.optim import build_optimizer, param_groups

        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)
        model = timm.create_model(cfg.model.name, **cfg.model.create_kwargs(num_classes))
        num_params = sum(p.numel() for p in model.parameters())
        optimizer = build_optimizer(model, cfg.optim)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config,
            model_parameters=param_groups(model, cfg.optim.weight_decay) if optimizer is None else None)
        if cfg.run.compile:
            engine.compile()   # torch.compile: recompiles for a new resolution, then marks the dims dynamic
        ema = None
        if cfg.run.ema:
            from timm.utils import ModelEmaV3

            # fp32 EMA: a bf16/fp16 copy cannot hold (1 - decay) * (w - ema) updates exactly
            ema = ModelEmaV3(engine.module, decay=cfg.run.ema_decay, dtype=torch.float32)
        return engine, ema, num_params

    def _resume_and_track(self, num_classes: int):
        """Resume from ``checkpoint.resume`` if there is one; the MLflow tracker continues the checkpoint's run."""
        from pipeline import tracking
        from pipeline.config import to_dict

        cfg, s = self.cfg, self.state
        resumed = self._resume()
        if resumed is not None:
            self.log.line(f"resumed from {resumed} at epoch {s.epoch} step {s.step_in_epoch} (global {s.global_step})")
        tracker = tracking.make_tracker(cfg, rank=self.rank, world_size=self.world, run_id=s.mlflow_run_id)
        s.mlflow_run_id = tracker.run_id
        # tags every time (a requeued job has a new SLURM job id, a resume may run on other GPUs or code)
        if self.rank == 0 and tracker.run_id:
            tracker.set_tags(tracking.run_tags(cfg, precision=self.precision, world_size=self.world,
                                               zero_stage=self.engine.zero_optimization_stage(),
                                               device_kind=self.device.type))
        if resumed is None:
            tracker.log_dataset(cfg.data.root, cfg.data.format)
            tracker.log_params({**to_dict(cfg), "world_size": self.world, "precision": self.precision,
                                "num_params": self.num_params, "num_classes": num_classes,
                                "deepspeed": self.ds_config})
            tracker.log_text(cfg.to_yaml(), "config/train_config.yaml")
            tracker.log_dict(self.ds_config, "config/deepspeed_config.json")
        return tracker

    def _resume(self):
        """Load the planned checkpoint: directly on its own world size, through DeepSpeed's universal checkpoint
        (made once, by rank 0) on another one, where each rank's RNG restarts from (seed, rank, global step)
        since per-rank streams cannot be carried over. Arms the self-check; returns the folder or None."""
        from pipeline import checkpointing
        from pipeline.distributed import barrier
        from pipeline.resume_check import SelfCheck
        from pipeline.rng import make_seed, rng_state, seed_everything

        plan = self.resume_plan
        if plan is None:
            return None
        if plan.universal:
            if self.rank == 0:
                checkpointing.universal_for(plan.path, log=self.log.line)
            barrier()
        path = self.checkpointer.resume(plan.path, restore_rng=not plan.elastic)
        if plan.elastic:
            seed_everything(make_seed(self.cfg.run.seed, self.rank, self.state.global_step, self.world))
            self.log.line(f"continuing a {plan.world_size}-rank checkpoint on {self.world} ranks at global sample "
                          f"{plan.meta['samples_in_epoch']} of epoch {plan.meta['epoch']}"
                          + (" (ZeRO state re-partitioned from DeepSpeed's universal checkpoint)"
                             if plan.universal else ""))
        self._self_check = SelfCheck(plan.meta, path.name, world_size=self.world, rng_state=rng_state())
        return path

    def _layout_meta(self) -> dict[str, Any]:
        """What a checkpoint's ``COMPLETE`` records besides the step: the layout and the self-check digest."""
        from pipeline.resume_check import layout_meta

        s = self.state
        meta = layout_meta(self.cfg, world_size=self.world, epoch=s.epoch, step_in_epoch=s.step_in_epoch,
                           global_step=s.global_step, zero_stage=self.engine.zero_optimization_stage())
        meta["next_keys_sha256"], self._next_keys = self._next_keys, None
        return meta

    def _peek_next_step(self, batches: Iterator) -> None:
        """Fetch the next step's micro-batches now (the step uses them next) and digest their keys over all ranks,
        for the checkpoint about to be saved."""
        from pipeline.resume_check import gather_keys, keys_digest

        self._pending = next(batches, [])
        keys = gather_keys(_step_keys(self._pending) if self._pending else None, self.world)
        self._next_keys = keys_digest(keys) if keys else None

    def _verify_resume(self, micro: list) -> None:
        """The first step after a resume: does it read the samples, with the RNG state, the checkpoint recorded?"""
        import torch

        from pipeline.rng import rng_state

        with torch.random.fork_rng(devices=[]):
            checked = self._self_check.verify(_step_keys(micro), rng_state())
        self._self_check = None
        self.log.line("resume self-check passed: " + (", ".join(checked) or "nothing recorded to check"))

    def _record_keys(self, epoch: int, micro: list) -> None:
        import json

        if self.keys_log is None:
            self.keys_log = open(self.cfg.run_dir / "keys" / f"rank{self.rank}.jsonl", "a")
            self._keys_start = self.state.global_step
        self.keys_log.write(json.dumps({"start": self._keys_start, "epoch": epoch, "step": self.state.step_in_epoch,
                                        "world": self.world, "keys": [k for _, _, ks in micro for k in ks or []]})
                            + "\n")
        self.keys_log.flush()

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, micro_batches: list) -> StepResult:
        """Forward/backward over ``accum`` micro-batches and one optimizer step; no host synchronisation except
        the one DeepSpeed makes for its overflow check, and one more only when a step was skipped."""
        for images, targets in micro_batches:
            images = images.to(self.device, dtype=self.input_dtype, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            loss = self.criterion(self.engine(images).float(), targets)
            self.losses.add(loss.detach())
            self.engine.backward(loss)
            self.engine.step()
        if self.engine.was_step_applied():
            return StepResult(applied=True, nonfinite=False)
        # skipped: fp16 loss-scale overflow (finite losses on every rank) is routine; anything else is non-finite
        return StepResult(applied=False, nonfinite=self.precision != "fp16" or self._any_nonfinite_loss(loss))

    def _any_nonfinite_loss(self, loss) -> bool:
        import torch

        from pipeline.distributed import all_reduce_

        return bool(all_reduce_((~torch.isfinite(loss.detach())).float().reshape(1), "MAX").item())

    def after_step(self, result: StepResult, epoch: int, res: int, global_batch: int) -> None:
        s = self.state
        if result.applied:
            s.global_step += 1
            self._nonfinite_run = 0
            if self.ema is not None:
                self.ema.update(self.engine.module, step=s.global_step)
            self.timer.step_done(global_batch // self.world)
            self.run_timer.step_done(global_batch // self.world)
            self.log.update()
            if s.global_step % self.cfg.run.log_every == 0:
                self.log_train_metrics(epoch, res, global_batch)
        elif result.nonfinite:
            s.nonfinite_total += 1
            self._nonfinite_run += 1
            self.log.line(f"non-finite loss at step {s.global_step}: skipped ({self._nonfinite_run} in a row)")
            self.tracker.log_metrics({"train/nonfinite_skipped": s.nonfinite_total}, step=s.global_step)
        else:
            self.overflow_skipped += 1

    def log_train_metrics(self, epoch: int, res: int, global_batch: int) -> None:
        from pipeline import deepspeed_compat
        from pipeline.distributed import all_reduce_sum

        s = self.state
        grad_norm = self.engine.get_global_grad_norm()
        metrics = {"train/loss": self.losses.mean(), "train/lr": self.lr_scheduler.last_lr,
                   "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                   "train/resolution": res, "train/batch_global": global_batch, "train/epoch": epoch,
                   "train/nonfinite_skipped": s.nonfinite_total, **self.timer.summary(self.world)}
        if self.precision == "fp16":
            metrics |= {"train/loss_scale": deepspeed_compat.loss_scale(self.engine),
                        "train/overflow_skipped": all_reduce_sum([self.overflow_skipped])[0] / self.world}
        metrics["throughput/img_s"] = all_reduce_sum([metrics["throughput/img_s_rank"]])[0]
        self.tracker.log_metrics(metrics, step=s.global_step)
        self.log.metrics(s.global_step, metrics)
        self.timer.reset()
        if s.global_step == self.cfg.run.log_every:   # steady state starts after the first window (warm-up)
            self.run_timer.reset()

    def stop_reason(self) -> str | None:
        """The one exit check after every step: "nonfinite", "stop" (preemption), "max_steps" or None."""
        if self._nonfinite_run >= self.cfg.run.nonfinite_patience:
            return "nonfinite"
        if self.stop.should_stop():
            return "stop"
        max_steps = self.cfg.run.max_steps
        return "max_steps" if max_steps is not None and self.state.global_step >= max_steps else None

    # ------------------------------------------------------------------ epochs
    def train_epoch(self, epoch: int) -> str | None:
        import torch

        s = self.state
        res, batch = self.res_schedule.at(epoch)
        batch = batch or self.cfg.data.batch_size
        self.loader.set_epoch(epoch, res, batch_size=batch, skip_batches=s.step_in_epoch * self.accum,
                              accum=self.accum)
        steps, global_batch = len(self.loader) // self.accum, batch * self.accum * self.world
        self.last_res, self._steps = res, steps
        self.log.start_epoch(epoch, steps, s.step_in_epoch, res)
        if self.cfg.aug.aspect_buckets:
            from pipeline.data.aspect_buckets import train_bucket_shapes

            shapes = train_bucket_shapes(res, self.cfg.aug.aspect_multiple, tuple(self.cfg.aug.ratio))
            self.log.line(f"aspect buckets at {res} px (H x W), one per step: "
                          + ", ".join(f"{h}x{w}" for h, w in shapes))
        with_keys = getattr(self.loader, "iter_with_keys", None)
        with torch.random.fork_rng(devices=[]):  # creating the iterator must not shift the trainer's RNG stream
            batches = _micro_batches(with_keys() if with_keys else ((x, y, None) for x, y in self.loader),
                                     self.accum)
        self._pending = []
        reason = None
        self.timer.start()
        self.run_timer.start()
        while reason is None and s.step_in_epoch < steps:
            micro, self._pending = self._pending or next(batches, []), []
            if len(micro) < self.accum:
                raise RuntimeError(f"loader ended at step {s.step_in_epoch} of {steps} in epoch {epoch}")
            if self._self_check is not None:
                self._verify_resume(micro)
            if self.cfg.checkpoint.record_keys:
                self._record_keys(epoch, micro)
            self.timer.wait_done()
            self.run_timer.wait_done()
            self.lr_scheduler.step(epoch, s.step_in_epoch, steps, global_batch)
            result = self.train_step([(x, y) for x, y, _ in micro])
            s.step_in_epoch += 1
            self.after_step(result, epoch, res, global_batch)
            reason = self.stop_reason()
            mid_epoch = s.step_in_epoch < steps
            if reason is None and self.checkpointer.due(s.global_step, at_epoch_end=not mid_epoch):
                self._peek_next_step(batches)
                self.checkpointer.save(s.global_step)
            elif reason == "stop" and mid_epoch:
                self._peek_next_step(batches)   # for the preemption checkpoint fit() saves next
            self.timer.start()
            self.run_timer.start()
        self.log.close()
        return reason

    def end_epoch(self, epoch: int, last: bool, t_start: float) -> None:
        res = self.res_schedule.at(epoch)[0]
        metric = None
        if self.evaluator.should_eval(epoch, last):
            self.results = self.evaluate(res, epoch, final=last)
            metric = self.results[res]["top1"]
            self.state.best_top1 = metric if self.state.best_top1 is None else max(self.state.best_top1, metric)
        if self.state.step_in_epoch >= self._steps:   # the epoch's data is done: resume at the next epoch
            self.state.epoch, self.state.step_in_epoch = epoch + 1, 0
        self.checkpointer.save(self.state.global_step, metric)
        self.tracker.log_metrics({"epoch/index": epoch, "epoch/time_s": time.time() - t_start},
                                 step=self.state.global_step)

    def evaluate(self, res: int, epoch: int, final: bool) -> dict[int, dict[str, float]]:
        import torch

        from pipeline.evaluate import format_table

        step = self.state.global_step
        self.engine.eval()
        results = self.evaluator(self.engine, (res, *self.cfg.eval.resolutions))
        if self.ema is not None:  # the (fp32) EMA weights at the training resolution
            top1 = self.evaluator(self.ema.module.eval(), (res,), input_dtype=torch.float32)[res]["top1"]
            self.tracker.log_metrics({"eval_ema/top1": top1}, step=step)
            self.log.line(f"EMA top-1 at {res}px: {top1:.2f}")
        self.engine.train()
        self.tracker.log_metrics({f"eval/{k}_{r}px": v[k] for r, v in results.items() for k in ("top1", "top5", "loss")}
                                 | {"eval/top1": results[res]["top1"], "epoch": epoch}, step=step)
        self.log.line(("final " if final else f"epoch {epoch} ") + "eval:\n" + format_table(results, res))
        return results

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any]:
        t_start, reason = time.time(), None
        self.engine.train()
        for epoch in range(self.state.epoch, self.cfg.run.epochs):
            reason = self.train_epoch(epoch)
            if reason == "stop":
                self.checkpointer.save(self.state.global_step)
            if reason in ("stop", "nonfinite"):
                break
            self.end_epoch(epoch, last=reason == "max_steps" or epoch == self.cfg.run.epochs - 1, t_start=t_start)
            if reason == "max_steps":
                break
        return self.finish(reason, time.time() - t_start)

    def finish(self, reason: str | None, wall_s: float) -> dict[str, Any]:
        from pipeline import checkpointing, deepspeed_compat, tracking

        cfg, s, exit_code = self.cfg, self.state, EXIT_CODES[reason]
        res = self.last_res
        steady = self.run_timer.summary(self.world)
        summary: dict[str, Any] = {
            "exit_code": exit_code, "global_step": s.global_step, "train_resolution": res, "world_size": self.world,
            "precision": self.precision, "nonfinite_skipped": s.nonfinite_total, "wall_time_s": wall_s,
            "throughput_img_s": steady["throughput/img_s"], "data_wait_share": steady["time/data_wait_frac"],
            "best_top1": s.best_top1, "eval": {str(r): v for r, v in self.results.items()},
            "mlflow_run_id": self.tracker.run_id, "run_dir": str(cfg.run_dir),
            "checkpoint": str(checkpointing.find_latest(cfg.run_dir / "checkpoints") or "")}
        if self.precision == "fp16":
            summary |= {"loss_scale": deepspeed_compat.loss_scale(self.engine),
                        "skipped_steps": deepspeed_compat.skipped_steps(self.engine)}
        # one value per run under names that are the same in every run (MLflow's compare view lines them up)
        final = {"final/throughput_img_s": summary["throughput_img_s"],
                 "final/data_wait_share": summary["data_wait_share"], "final/best_top1": s.best_top1,
                 "final/wall_time_s": wall_s}
        final |= {f"final/{k}_{r}px": v[k] for r, v in self.results.items() for k in ("top1", "top5")}
        self.tracker.log_metrics(final, step=s.global_step)
        if self.rank == 0 and self.results:
            from pipeline.analysis.resolution import plot_resolution_curves

            png = cfg.run_dir / "resolution_vs_accuracy.png"
            plot_resolution_curves({"this run": self.results}, png, train_res=res,
                                   title=f"{cfg.model.name}: top-1 vs test resolution")
            self.tracker.log_artifact(png)
        if self.rank == 0:
            tracking.write_json(summary, cfg.run_dir / "final_metrics.json")
            self.tracker.log_artifact(cfg.run_dir / "final_metrics.json")
        self.tracker.finish({0: "FINISHED", EXIT_PREEMPTED: "KILLED"}.get(exit_code, "FAILED"))
        if reason == "nonfinite":
            hint = "lower schedule.lr.lr or check the data" + (", or use bf16 instead of fp16"
                                                               if self.precision == "fp16" else "")
            raise NonFiniteLossError(f"stopped: {cfg.run.nonfinite_patience} non-finite losses in a row at step "
                                     f"{s.global_step} ({hint})")
        return summary


def cli() -> int:
    from pipeline.device import DeviceError

    try:
        summary = main()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except DeviceError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    return int(summary.get("exit_code", 0))


if __name__ == "__main__":
    sys.exit(cli())
