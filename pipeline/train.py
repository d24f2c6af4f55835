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
global batch (:mod:`pipeline.resume`; checked before anything starts, self-checked before the first step).
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
import enum
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `deepspeed pipeline/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# timm and the cpvt_* registry load here, before any process group exists: torch modules that timm imports lazily
# take ``group=dist.group.WORLD`` as a default argument, and importing them afterwards pins the group (gloo's
# threads then outlive destroy() and abort the process at exit)
import timm  # noqa: E402
import torch  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy  # noqa: E402
from timm.utils import ModelEmaV3  # noqa: E402

import pipeline.models  # noqa: E402,F401  (registers cpvt_* with timm)
from pipeline import checkpointing, deepspeed_compat, storage, tracking  # noqa: E402
from pipeline import device as devices  # noqa: E402
from pipeline.checkpointing import Checkpointer  # noqa: E402
from pipeline.config import (ConfigError, TrainConfig, batch_plan, flatten, load_site, load_train_config,  # noqa: E402
                             recipe_for_model, resolve_deepspeed_config, to_dict, train_defaults)
from pipeline.data.aspect_buckets import train_bucket_shapes  # noqa: E402
from pipeline.data.loader import build_train_loader  # noqa: E402
from pipeline.data.shard_index import check_index, read_num_classes  # noqa: E402
from pipeline.data.step_batches import StepBatches  # noqa: E402
from pipeline.data.tar_samples import ShardReadError, TarFormatError, worker_message  # noqa: E402
from pipeline.data.workers import fit_num_workers, task_cpus  # noqa: E402
from pipeline.distributed import RendezvousError, all_reduce_sum, destroy, detect_env, init_distributed  # noqa: E402
from pipeline.evaluate import Evaluator, ResolutionChoice, format_table  # noqa: E402
from pipeline.logging_utils import LossMeter, ProgressLog, StepTimer  # noqa: E402
from pipeline.optim import build_optimizer, param_groups  # noqa: E402
from pipeline.preemption import StopAgreement, install_stop_handlers  # noqa: E402
from pipeline.redaction import is_redacted, redact  # noqa: E402
from pipeline.resume import ResumePlan, Resumer, layout_meta, plan_resume  # noqa: E402
from pipeline.rng import seed_everything  # noqa: E402
from pipeline.schedules import (LRSchedule, LRScheduler, ResolutionSchedule, aug_strength, plan_lines,  # noqa: E402
                                 plan_rows, step_layout)

EXIT_PREEMPTED = 75   # checkpoint saved after SIGUSR1/SIGTERM; requeue me (EX_TEMPFAIL)
EXIT_NONFINITE = 65   # too many non-finite losses in a row
EXIT_CONFIG = 2       # one-line ConfigError / DeviceError, nothing was started
EXIT_CHECKPOINT = 66  # the checkpoint to resume could not be read (EX_NOINPUT)
EXIT_RENDEZVOUS = 69  # the ranks could not agree on a rendezvous port (EX_UNAVAILABLE)
EXIT_SHARD = 74       # a training or val shard could not be read after the start (EX_IOERR); resume after fixing it
EXIT_DISK_FULL = 73   # the file system filled up during a checkpoint save (EX_CANTCREAT); the previous one is intact


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
        used = flatten(to_dict(cfg))
        return self.notes + [text for key, value, text in self.site_notes if str(used.get(key)) == value]


def parse_args(argv: list[str], environ: dict[str, str] | None = None) -> CommandLine:
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
    args = p.parse_intermixed_args(argv)   # overrides may stand before and after the flags
    site, site_file = load_site(environ)
    defaults, site_notes = train_defaults(site, site_file, environ)
    notes: list[str] = []
    recipe = args.recipe
    if recipe is None and (found := recipe_for_model(args.model, site.recipe_dirs, site_file)) is not None:
        recipe, why = str(found[0]), found[1]
        notes.insert(0, f"recipe {recipe} ({why}; --recipe picks another)")
    flags = {"model.name": args.model, "data.root": data_root(args.data, os.environ if environ is None else environ),
             "run.deepspeed_config": args.deepspeed_config, "run.run_dir": args.run_dir,
             "checkpoint.resume": args.resume}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)
    return CommandLine(recipe, overrides, defaults, site.recipe_dirs, notes, site_notes)


def data_root(flag: str | None, environ) -> str | None:
    """``--data``; where it is a URL whose credentials were masked when it was stored, ``CPVT_DATA_ROOT`` (the
    same URL with them) stands in for it, kept in memory only."""
    real = environ.get("CPVT_DATA_ROOT")
    if flag and real and is_redacted(flag) and redact(real) == flag:
        return real
    return flag


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Validate everything (config, data folder, resume checkpoint, loader workers, device, precision), then
    train; returns the final summary."""
    cmd = parse_args(sys.argv[1:] if argv is None else argv)
    env = detect_env()
    cfg, ds_config = load_train_config(cmd.recipe, cmd.overrides, env.world_size, defaults=cmd.defaults,
                                       recipe_dirs=cmd.recipe_dirs)
    read_num_classes(cfg)  # classes.json must exist: fail now, not after the process group is up
    check_index(cfg)       # and the WebDataset index must parse and list the splits
    data, workers_line = fit_num_workers(cfg.data, task_cpus())   # before ffcv/numba are imported
    cfg.data = data
    if env.rank == 0:
        for line in [*cmd.lines(cfg), workers_line, f"batch: {batch_plan(cfg, env.world_size).line()}",
                     *plan_lines(cfg, env.world_size)]:
            if line:
                print(redact(f"config: {line}"), flush=True)
    return run(cfg, ds_config)


def run(cfg: TrainConfig, ds_config: dict[str, Any] | None = None, *, train_loader=None) -> dict[str, Any]:
    """Train ``cfg``. ``train_loader``: any object with the TrainLoader contract (benchmarks feed in-memory
    batches); by default the recipe's WebDataset/FFCV loader."""
    launch = detect_env()
    if ds_config is None:
        ds_config = resolve_deepspeed_config(cfg, launch.world_size)
    num_classes = read_num_classes(cfg)
    choice = devices.select_device()
    ds_config, prec, prec_line = devices.finalize_deepspeed_config(ds_config, cfg, choice)
    # the checkpoint (intact, and its layout vs this start's: global batch, canonical streams) is chosen or
    # refused before anything starts
    resume_plan = plan_resume(cfg, launch.world_size, log=print if launch.rank == 0 else lambda line: None)
    env = init_distributed(choice, timeout_s=cfg.run.dist_timeout_s, rendezvous_dir=cfg.run_dir)
    install_stop_handlers()
    try:
        if env.rank == 0:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            (cfg.run_dir / "train_config.yaml").write_text(cfg.to_yaml())
        trainer = Trainer(cfg, ds_config, env, num_classes, choice, prec, train_loader=train_loader,
                          resume_plan=resume_plan)
        trainer.log.line(f"device {choice.reason}; {prec_line}")
        try:
            reason, wall_s = trainer.fit()
        except (TarFormatError, storage.StorageError) as e:
            raise ShardReadError(shard_fault_line(e, cfg, trainer.state.global_step)) from None
        return finish(trainer, reason, wall_s)
    except (Exception, KeyboardInterrupt) as e:
        tracking.end_run_after_error(e)  # FAILED / KILLED, not FINISHED by MLflow's atexit hook
        raise
    finally:
        destroy()


# ----------------------------------------------------------------------------------------- the parts
class StopReason(enum.Enum):
    """Why the loop ended before its last epoch, with the process exit code."""
    MAX_STEPS = "max_steps"      # run.max_steps reached
    PREEMPTED = "preempted"      # SIGUSR1/SIGTERM: checkpoint saved, requeue
    NONFINITE = "nonfinite"      # run.nonfinite_patience non-finite steps in a row

    @property
    def exit_code(self) -> int:
        return {StopReason.MAX_STEPS: 0, StopReason.PREEMPTED: EXIT_PREEMPTED,
                StopReason.NONFINITE: EXIT_NONFINITE}[self]


@dataclass
class TrainState:
    """Where the loop is; saved in every checkpoint. ``step_in_epoch`` counts data steps (a skipped step consumed
    its batches too), ``global_step`` counts optimizer steps that were applied. The checkpoint's ``COMPLETE``
    record also states the position as a global sample index (:func:`pipeline.resume.layout_meta`)."""
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
class Epoch:
    """One epoch being trained: the resolution schedule's resolution, the optimizer steps, the global batch, and
    the loader's steps (peekable: a mid-epoch checkpoint records what the next step reads)."""
    index: int
    resolution: int
    steps: int
    global_batch: int
    batches: StepBatches


@dataclass
class StepResult:
    applied: bool          # DeepSpeed applied the optimizer step
    nonfinite: bool        # skipped because a loss or a gradient was not finite (not an fp16 loss-scale overflow)


def build_criterion(aug):
    """The recipe's loss: soft-target CE with Mixup/CutMix, else label-smoothed CE, else plain CE."""
    if aug.mixup_active:
        return SoftTargetCrossEntropy()
    return LabelSmoothingCrossEntropy(aug.smoothing) if aug.smoothing > 0 else torch.nn.CrossEntropyLoss()


def build_engine(cfg: TrainConfig, ds_config: dict[str, Any], num_classes: int):
    """(DeepSpeed engine, fp32 EMA or None, parameter count): the same initial weights on every rank."""
    import deepspeed  # local: only after init_distributed chose the accelerator (DS_ACCELERATOR, LOCAL_RANK)

    torch.manual_seed(cfg.run.seed)
    model = timm.create_model(cfg.model.name, **cfg.model.create_kwargs(num_classes))
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, cfg.optim)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        model_parameters=param_groups(model, cfg.optim.weight_decay) if optimizer is None else None)
    if cfg.run.compile:
        engine.compile()   # torch.compile: recompiles for a new resolution, then marks the dims dynamic
    # fp32 EMA: a bf16/fp16 copy cannot hold (1 - decay) * (w - ema) updates exactly
    ema = ModelEmaV3(engine.module, decay=cfg.run.ema_decay, dtype=torch.float32) if cfg.run.ema else None
    return engine, ema, num_params


def start_tracking(cfg: TrainConfig, state: TrainState, *, resumed: bool, rank: int, world_size: int,
                   precision: str, zero_stage: int, device_kind: str, ds_config: dict[str, Any], num_params: int,
                   num_classes: int):
    """The MLflow tracker, continuing the checkpoint's run after a resume; tags at every start (a requeued job has
    a new SLURM job id, a resume may run on other GPUs or code), params and config once per run."""
    tracker = tracking.make_tracker(cfg, rank=rank, world_size=world_size, run_id=state.mlflow_run_id)
    state.mlflow_run_id = tracker.run_id
    if rank == 0 and tracker.run_id:
        tracker.set_tags(tracking.run_tags(cfg, precision=precision, world_size=world_size, zero_stage=zero_stage,
                                           device_kind=device_kind))
    if not resumed:
        tracker.log_dataset(cfg.data.root, cfg.data.format)
        tracker.log_params({**to_dict(cfg), "world_size": world_size, "precision": precision,
                            "num_params": num_params, "num_classes": num_classes, "deepspeed": ds_config})
        tracker.log_text(cfg.to_yaml(), "config/train_config.yaml")
        tracker.log_dict(ds_config, "config/deepspeed_config.json")
        if cfg.schedule.resolution.kind == "budgeted":   # the resolved plan: a table and its headline numbers
            plan = cfg.schedule.resolution.stage_plan()
            tracker.log_dict(plan_rows(cfg, world_size), "config/progressive_plan.json")
            tracker.log_text("\n".join(plan_lines(cfg, world_size)) + "\n", "config/progressive_plan.txt")
            tracker.log_params({"plan.budget_share": round(plan.share, 4), "plan.epochs": plan.total_epochs,
                                "plan.stages": " ".join(f"{s.resolution}x{s.epochs}" for s in plan.stages)})
    return tracker


class Trainer:
    """Builds the parts once; :meth:`fit` runs the epochs. Each part owns its cadence: the checkpointer
    (:meth:`Checkpointer.due`), the evaluator (``eval.every_epochs``), the metrics (``run.log_every``), the stop
    agreement (``run.stop_check_steps``); the resumer owns everything about continuing a checkpoint."""

    def __init__(self, cfg: TrainConfig, ds_config: dict[str, Any], env, num_classes: int, choice, precision: str,
                 train_loader=None, resume_plan: ResumePlan | None = None):
        self.cfg, self.precision = cfg, precision
        self.rank, self.world, self.device = env.rank, env.world_size, choice.torch_device
        self.input_dtype = devices.torch_dtype(precision)
        self.log = ProgressLog(self.rank, cfg.run.progress_bar)
        self.resumer = Resumer(resume_plan, cfg, rank=self.rank, world_size=self.world, log=self.log.line)
        self.ds_config = self.resumer.deepspeed_config(ds_config)
        self.engine, self.ema, num_params = build_engine(cfg, self.ds_config, num_classes)
        self.res_schedule = ResolutionSchedule(cfg.schedule.resolution, cfg.run.epochs)
        self.lr_scheduler = LRScheduler(LRSchedule(cfg.schedule.lr, cfg.run.epochs), self.engine.optimizer)
        self.criterion = build_criterion(cfg.aug)
        seed_everything(cfg.run.seed + self.rank)  # per-rank streams for drop-path etc. (a resume restores them)
        self.state = TrainState()
        parts = {"train_state": self.state, "lr_schedule": self.lr_scheduler}
        if self.ema is not None:
            parts["ema"] = self.ema.module
        self.checkpointer = Checkpointer(self.engine, cfg.run_dir / "checkpoints", cfg.checkpoint, rank=self.rank,
                                         config_yaml=cfg.to_yaml(), components=parts, log=self.log.line)
        resumed = self.resumer.load(self.checkpointer, self.state) is not None
        self.tracker = start_tracking(cfg, self.state, resumed=resumed, rank=self.rank, world_size=self.world,
                                      precision=precision, zero_stage=self.engine.zero_optimization_stage(),
                                      device_kind=self.device.type, ds_config=self.ds_config,
                                      num_params=num_params, num_classes=num_classes)
        self.loader = train_loader or build_train_loader(
            cfg.data, cfg.aug, num_classes=num_classes, rank=self.rank, world_size=self.world, seed=cfg.run.seed,
            device=self.device)
        self.evaluator = Evaluator(cfg, rank=self.rank, world_size=self.world, device=self.device,
                                   input_dtype=self.input_dtype)
        self.stop = StopAgreement(self.world, self.device, cfg.run.stop_check_steps)
        self.losses, self.timer = LossMeter(self.device), StepTimer()
        self.overflow_skipped, self.nonfinite_run = 0, 0
        self.last_resolution: int | None = None   # of the last epoch trained (the summary's)
        self.results: dict[int, dict[str, float]] = {}
        self.test_res: ResolutionChoice | None = None   # chosen on minival after the final evaluation
        self.log.line(f"model {cfg.model.name} ({num_params / 1e6:.2f}M params) world={self.world} "
                      f"precision={precision} zero={self.engine.zero_optimization_stage()} run_dir={cfg.run_dir}")

    # ------------------------------------------------------------------ the run
    def fit(self) -> tuple[StopReason | None, float]:
        """Train the remaining epochs; returns why the loop stopped early (None: all epochs done) and the seconds."""
        t_start, reason = time.perf_counter(), None
        self.engine.train()
        for index in range(self.state.epoch, self.cfg.run.epochs):
            t_epoch = time.perf_counter()
            epoch = self.start_epoch(index)
            reason = self.train_epoch(epoch)
            self.end_epoch(epoch, reason)
            if reason in (None, StopReason.MAX_STEPS):
                self.tracker.log_metrics({"epoch/index": index, "epoch/time_s": time.perf_counter() - t_epoch},
                                         step=self.state.global_step)
            if reason is not None:
                break
        return reason, time.perf_counter() - t_start

    def start_epoch(self, index: int) -> Epoch:
        """Point the loader and the engine at epoch ``index`` (resolution, per-rank batch, accumulation, augmentation
        strength, the resume position); log what it trains."""
        res, batch, accum = step_layout(self.cfg, index)
        if (batch, accum) != (self.engine.train_micro_batch_size_per_gpu(), self.engine.gradient_accumulation_steps()):
            # DeepSpeed scales each micro-batch's loss by 1/accumulation: its batch settings follow the schedule
            self.engine.set_train_micro_batch_size(batch)
            self.engine.set_train_batch_size(batch * accum * self.world)
        self.loader.set_epoch(index, res, batch_size=batch, skip_batches=self.state.step_in_epoch * accum,
                              accum=accum, aug_strength=aug_strength(self.cfg, index))
        epoch = Epoch(index, res, len(self.loader) // accum, batch * accum * self.world,
                      StepBatches(self.loader, accum))
        self.last_resolution = res
        self.log.start_epoch(index, epoch.steps, self.state.step_in_epoch, res)
        if self.cfg.aug.aspect_buckets:
            shapes = train_bucket_shapes(res, self.cfg.aug.aspect_multiple, tuple(self.cfg.aug.ratio))
            self.log.line(f"aspect buckets at {res} px (H x W), one per step: "
                          + ", ".join(f"{h}x{w}" for h, w in shapes))
        return epoch

    def train_epoch(self, epoch: Epoch) -> StopReason | None:
        s, reason = self.state, None
        self.timer.start()
        while reason is None and s.step_in_epoch < epoch.steps:
            micro = next(epoch.batches, None)
            if micro is None:
                raise RuntimeError(f"loader ended at step {s.step_in_epoch} of {epoch.steps} in epoch {epoch.index}")
            self.resumer.before_step(micro, epoch=epoch.index, step_in_epoch=s.step_in_epoch,
                                     global_step=s.global_step)
            self.timer.wait_done()
            self.lr_scheduler.step(epoch.index, s.step_in_epoch, epoch.steps, epoch.global_batch)
            result = self.train_step([(x, y) for x, y, _ in micro])
            s.step_in_epoch += 1
            self.after_step(result, epoch)
            reason = self.stop_reason()
            if reason is None and s.step_in_epoch < epoch.steps:
                self.save_if_due(epoch, boundary=False)
            self.timer.start()
        self.log.close()
        return reason

    def end_epoch(self, epoch: Epoch, reason: StopReason | None) -> None:
        """After the epoch's loop: evaluate when due, move the position past a finished epoch, save when due."""
        s, metric = self.state, None
        if reason in (None, StopReason.MAX_STEPS):
            last = reason is StopReason.MAX_STEPS or epoch.index == self.cfg.run.epochs - 1
            if self.evaluator.should_eval(epoch.index, last):
                self.results = self.evaluate(epoch.resolution, epoch.index, final=last)
                metric = self.results[epoch.resolution]["top1"]
                if last:
                    self.choose_test_res(epoch.resolution)
                s.best_top1 = metric if s.best_top1 is None else max(s.best_top1, metric)
            if s.step_in_epoch >= epoch.steps:   # the epoch's data is done: resume at the next epoch
                s.epoch, s.step_in_epoch = epoch.index + 1, 0
        self.save_if_due(epoch, boundary=True, failed=reason is StopReason.NONFINITE, metric=metric)

    def save_if_due(self, epoch: Epoch, *, boundary: bool, failed: bool = False, metric: float | None = None) -> None:
        """The one place that saves (collective). The checkpointer decides; a checkpoint inside the epoch also
        records the digest of the sample keys its next step reads (the resume self-check compares it)."""
        s = self.state
        if not self.checkpointer.due(s.global_step, boundary=boundary, failed=failed):
            return
        inside = s.epoch == epoch.index and s.step_in_epoch < epoch.steps
        meta = layout_meta(self.cfg, world_size=self.world, epoch=s.epoch, step_in_epoch=s.step_in_epoch,
                           global_step=s.global_step, zero_stage=self.engine.zero_optimization_stage())
        meta["next_keys_sha256"] = self.resumer.next_step_digest(epoch.batches.peek()) if inside else None
        self.checkpointer.save(s.global_step, metric=metric, meta=meta)

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, micro_batches: list) -> StepResult:
        """Forward/backward over ``accum`` micro-batches and one optimizer step; no host synchronisation except
        the one DeepSpeed makes for its overflow check, and one more only when a step was skipped."""
        self.losses.start_step()
        last = len(micro_batches) - 1
        for i, (images, targets) in enumerate(micro_batches):
            # the step's last micro-batch is the boundary, whatever DeepSpeed's own micro-step count says (it is
            # not a multiple of a new stage's accumulation, and a resumed engine counts from 0)
            self.engine.set_gradient_accumulation_boundary(i == last)
            images = images.to(self.device, dtype=self.input_dtype, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            loss = self.criterion(self.engine(images).float(), targets)
            self.losses.add(loss.detach())
            self.engine.backward(loss)
            self.engine.step()
        if self.engine.was_step_applied():
            return StepResult(applied=True, nonfinite=False)
        # skipped: an fp16 loss-scale overflow with every micro-batch's loss finite on every rank is routine;
        # anything else is non-finite
        return StepResult(applied=False, nonfinite=self.precision != "fp16" or self.losses.step_nonfinite())

    def after_step(self, result: StepResult, epoch: Epoch) -> None:
        s = self.state
        if result.applied:
            s.global_step += 1
            self.nonfinite_run = 0
            if self.ema is not None:
                self.ema.update(self.engine.module, step=s.global_step)
            self.timer.step_done(epoch.global_batch // self.world)
            self.log.update()
            if s.global_step % self.cfg.run.log_every == 0:
                self.log_train_metrics(epoch)
        elif result.nonfinite:
            s.nonfinite_total += 1
            self.nonfinite_run += 1
            self.log.line(f"non-finite loss at step {s.global_step}: skipped ({self.nonfinite_run} in a row)")
            self.tracker.log_metrics({"train/nonfinite_skipped": s.nonfinite_total}, step=s.global_step)
        else:
            self.overflow_skipped += 1

    def log_train_metrics(self, epoch: Epoch) -> None:
        s = self.state
        grad_norm = self.engine.get_global_grad_norm()
        window = self.timer.window(self.world, warmup_over=s.global_step == self.cfg.run.log_every)
        metrics = {"train/loss": self.losses.mean(), "train/lr": self.lr_scheduler.last_lr,
                   "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                   "train/resolution": epoch.resolution, "train/batch_global": epoch.global_batch,
                   "train/epoch": epoch.index, "train/nonfinite_skipped": s.nonfinite_total, **window}
        if self.precision == "fp16":
            metrics |= {"train/loss_scale": deepspeed_compat.loss_scale(self.engine),
                        "train/overflow_skipped": all_reduce_sum([self.overflow_skipped])[0] / self.world}
        metrics["throughput/img_s"] = all_reduce_sum([metrics["throughput/img_s_rank"]])[0]
        self.tracker.log_metrics(metrics, step=s.global_step)
        self.log.metrics(s.global_step, metrics)

    def stop_reason(self) -> StopReason | None:
        """The one exit check after every step."""
        if self.nonfinite_run >= self.cfg.run.nonfinite_patience:
            return StopReason.NONFINITE
        if self.stop.should_stop():
            return StopReason.PREEMPTED
        max_steps = self.cfg.run.max_steps
        return StopReason.MAX_STEPS if max_steps is not None and self.state.global_step >= max_steps else None

    def evaluate(self, res: int, epoch: int, final: bool) -> dict[int, dict[str, float]]:
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

    def choose_test_res(self, res: int) -> None:
        """After the final evaluation: the test resolution chosen on minival and val's top-1 there (one line,
        ``test_res/*`` metrics, the summary's ``test_res``); ``eval.choose_test_res``."""
        self.engine.eval()
        self.test_res = self.evaluator.choose_test_res(self.engine, res, self.results, self.log.line)
        self.engine.train()
        if self.test_res is not None:
            self.tracker.log_metrics(self.test_res.metrics(), step=self.state.global_step)

    def summary(self, reason: StopReason | None, wall_s: float) -> dict[str, Any]:
        """The run's final numbers (``final_metrics.json``); also logged under ``final/*``, one value per run
        under names that are the same in every run (MLflow's compare view lines them up)."""
        s = self.state
        steady = self.timer.steady(self.world)
        summary: dict[str, Any] = {
            "exit_code": reason.exit_code if reason else 0, "global_step": s.global_step,
            "train_resolution": self.last_resolution, "world_size": self.world,
            "precision": self.precision, "nonfinite_skipped": s.nonfinite_total, "wall_time_s": wall_s,
            "throughput_img_s": steady["throughput/img_s"], "data_wait_share": steady["time/data_wait_frac"],
            "best_top1": s.best_top1, "eval": {str(r): v for r, v in self.results.items()},
            "test_res": self.test_res.summary() if self.test_res else None,
            "mlflow_run_id": self.tracker.run_id, "run_dir": str(self.cfg.run_dir),
            "checkpoint": str(checkpointing.find_latest(self.cfg.run_dir / "checkpoints") or "")}
        if self.precision == "fp16":
            summary |= {"loss_scale": deepspeed_compat.loss_scale(self.engine),
                        "skipped_steps": deepspeed_compat.skipped_steps(self.engine)}
        final = {"final/throughput_img_s": summary["throughput_img_s"],
                 "final/data_wait_share": summary["data_wait_share"], "final/best_top1": s.best_top1,
                 "final/wall_time_s": wall_s}
        final |= {f"final/{k}_{r}px": v[k] for r, v in self.results.items() for k in ("top1", "top5")}
        self.tracker.log_metrics(final, step=s.global_step)
        return summary


def finish(trainer: Trainer, reason: StopReason | None, wall_s: float) -> dict[str, Any]:
    """Rank 0 writes ``final_metrics.json`` and the top-1 vs test-resolution plot (both also MLflow artifacts);
    the MLflow run ends FINISHED, KILLED (preempted) or FAILED; too many non-finite steps raise."""
    cfg, tracker = trainer.cfg, trainer.tracker
    summary = trainer.summary(reason, wall_s)
    if trainer.rank == 0 and trainer.results:
        # local: matplotlib is loaded once, on rank 0, after training; the trainer's import chain stays free of it
        from pipeline.analysis.resolution import plot_resolution_curves

        png = cfg.run_dir / "resolution_vs_accuracy.png"
        plot_resolution_curves({"this run": trainer.results}, png, train_res=summary["train_resolution"],
                               title=f"{cfg.model.name}: top-1 vs test resolution")
        tracker.log_artifact(png)
    if trainer.rank == 0:
        tracking.write_json(summary, cfg.run_dir / "final_metrics.json")
        tracker.log_artifact(cfg.run_dir / "final_metrics.json")
    tracker.finish({0: "FINISHED", EXIT_PREEMPTED: "KILLED"}.get(summary["exit_code"], "FAILED"))
    if reason is StopReason.NONFINITE:
        hint = "lower schedule.lr.lr or check the data" + (", or use bf16 instead of fp16"
                                                           if trainer.precision == "fp16" else "")
        raise NonFiniteLossError(f"stopped: {cfg.run.nonfinite_patience} non-finite losses in a row at step "
                                 f"{trainer.state.global_step} ({hint})")
    return summary


def shard_fault_line(error: BaseException, cfg: TrainConfig, step: int) -> str:
    """What a shard that failed mid-run says: the shard and cause, what to check, where to resume from."""
    latest = checkpointing.find_latest(cfg.run_dir / "checkpoints")
    resume = (f"resume from the last complete checkpoint {latest} with --resume auto" if latest else
              "start again (no checkpoint was saved yet)")
    return (f"a shard could not be read at step {step}: {worker_message(error)}. Check the shards with "
            f"`python -m data_prep verify {cfg.data.root}`, rewrite the damaged ones, then {resume}")


# the faults a user or a cluster can cause: one line on stderr (this prefix) and a documented exit code
FAULTS: tuple[tuple[type[BaseException], str, int], ...] = (
    (ConfigError, "config error", EXIT_CONFIG),
    (devices.DeviceError, "error", EXIT_CONFIG),
    (NonFiniteLossError, "error", EXIT_NONFINITE),
    (checkpointing.DamagedCheckpointError, "error", EXIT_CHECKPOINT),
    (checkpointing.DiskFullError, "error", EXIT_DISK_FULL),
    (RendezvousError, "error", EXIT_RENDEZVOUS),
    (ShardReadError, "error", EXIT_SHARD),
)


def cli() -> int:
    try:
        summary = main()
    except tuple(kind for kind, _, _ in FAULTS) as e:
        prefix, code = next((prefix, code) for kind, prefix, code in FAULTS if isinstance(e, kind))
        print(redact(f"{prefix}: {e}"), file=sys.stderr)
        return code
    return int(summary.get("exit_code", 0))


if __name__ == "__main__":
    sys.exit(cli())
