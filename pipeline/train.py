"""Train a CPVT model with DeepSpeed (ZeRO 1/2/3, bf16/fp16) on WebDataset or FFCV shards.

    deepspeed pipeline/train.py --deepspeed_config deepspeed_configs/zero2_bf16.json \
        --recipe pipeline/recipes/cpvt_ti.yaml --model cpvt_ti --data DATA [section.field=value ...]
    torchrun --nproc_per_node 8 pipeline/train.py ...        # or srun python pipeline/train.py ... (SLURM vars)

The whole config (recipe YAML <- CLI overrides) and the DeepSpeed batch arithmetic are validated before any data
is read or a process group exists. ``--resume auto`` continues from the newest *complete* checkpoint under
``<run_dir>/checkpoints`` and the same MLflow run. SIGUSR1/SIGTERM: save a checkpoint at the next step boundary
(all ranks agree) and exit with :data:`EXIT_PREEMPTED` so a launcher can requeue.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `deepspeed pipeline/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ConfigError  # noqa: E402
from pipeline.recipe import TrainConfig, load_train_config, precision, read_num_classes  # noqa: E402

EXIT_PREEMPTED = 75   # checkpoint saved after SIGUSR1/SIGTERM; requeue me (EX_TEMPFAIL)
EXIT_NONFINITE = 65   # too many non-finite losses in a row
EXIT_CONFIG = 2       # one-line ConfigError, nothing was started

_STOP = {"requested": False, "signal": None}


# ----------------------------------------------------------------------------------------- preemption hook
def request_stop(signum: int | None = None, frame: Any = None) -> None:
    """Ask the training loop to checkpoint and exit at the next step boundary (signal-handler safe)."""
    _STOP["requested"], _STOP["signal"] = True, signum


def install_stop_handlers(signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> None:
    """Route ``signals`` to :func:`request_stop` (launchers may call this themselves)."""
    for s in signals:
        signal.signal(s, request_stop)


def stop_requested() -> bool:
    return _STOP["requested"]


class NonFiniteLossError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=None, help="recipe YAML (path or name under pipeline/recipes)")
    p.add_argument("--model", default=None, help="model.name override (cpvt_ti, cpvt_s, ...)")
    p.add_argument("--data", default=None, help="data.root override: the data_prep output folder")
    p.add_argument("--deepspeed_config", "--deepspeed-config", default=None, help="DeepSpeed JSON")
    p.add_argument("--run-dir", "--run_dir", default=None, help="run.run_dir override")
    p.add_argument("--resume", default=None, help="'auto', 'none' or a checkpoint path")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.field=value (e.g. optim.weight_decay=0.05)")
    args = p.parse_args(argv)
    flags = {"model.name": args.model, "data.root": args.data, "run.deepspeed_config": args.deepspeed_config,
             "run.run_dir": args.run_dir, "checkpoint.resume": args.resume}
    return args.recipe, [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Validate everything, then train; returns the final metrics (rank 0: the full dict)."""
    from pipeline.distributed import detect_env

    recipe, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    world_size = detect_env().world_size
    cfg, ds_config = load_train_config(recipe, overrides, world_size)
    read_num_classes(cfg)  # classes.json must exist: fail now, not after the process group is up
    return run(cfg, ds_config)


# ----------------------------------------------------------------------------------------- training
def run(cfg: TrainConfig, ds_config: dict[str, Any] | None = None) -> dict[str, Any]:
    from pipeline import tracking
    from pipeline.distributed import detect_env, init_distributed

    if ds_config is None:
        from pipeline.recipe import resolve_deepspeed_config

        ds_config = resolve_deepspeed_config(cfg, detect_env().world_size)
    num_classes = read_num_classes(cfg)
    # timm (and the cpvt_* registry) before the process group exists, as in pipeline/evaluate.py: torch modules
    # that timm imports lazily (torch.distributed._shard, ...) take ``group=dist.group.WORLD`` as a default
    # argument, so importing them afterwards pins the group and gloo's threads can outlive destroy() and abort
    # the process at exit
    import timm  # noqa: F401

    import pipeline.models  # noqa: F401

    env = init_distributed()
    install_stop_handlers()
    import deepspeed  # noqa: F401 - after init_distributed picked the accelerator
    try:
        return _train(cfg, ds_config, env, num_classes)
    except (Exception, KeyboardInterrupt) as e:
        tracking.end_run_after_error(e)  # FAILED / KILLED, not FINISHED by MLflow's atexit hook
        raise
    finally:
        from pipeline.distributed import destroy

        destroy()


def _train(cfg: TrainConfig, ds_config: dict[str, Any], env, num_classes: int) -> dict[str, Any]:
    import deepspeed
    import timm
    import torch
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    import pipeline.models  # noqa: F401 - registers cpvt_* in timm
    from pipeline import checkpointing, evaluate as evaluation, tracking
    from pipeline.config import to_dict
    from pipeline.data.loader import build_train_loader
    from pipeline.distributed import all_reduce_max, all_reduce_sum, device as get_device
    from pipeline.logging_utils import ProgressLog, StepTimer
    from pipeline.optim import build_optimizer, param_groups
    from pipeline.schedules import LRSchedule, LRScheduler, ResolutionSchedule

    rank, world = env.rank, env.world_size
    run_dir = cfg.run_dir
    ckpt_dir = run_dir / "checkpoints"
    log = ProgressLog(rank, cfg.run.progress_bar)
    device = get_device()
    prec = precision(ds_config)
    input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[prec]
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "train_config.yaml").write_text(cfg.to_yaml())

    # ---- model, optimizer, DeepSpeed engine (same init on every rank)
    torch.manual_seed(cfg.run.seed)
    model = timm.create_model(cfg.model.name, **cfg.model.create_kwargs(num_classes))
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, cfg.optim)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        model_parameters=param_groups(model, cfg.optim.weight_decay) if optimizer is None else None)
    ema = None
    if cfg.run.ema:
        from timm.utils import ModelEmaV3

        # fp32 EMA: a bf16/fp16 copy cannot hold (1 - decay) * (w - ema) updates (timm's bf16 fallback rounds them
        # stochastically from a private RNG that a checkpoint would not restore, so resume would not be exact)
        ema = ModelEmaV3(engine.module, decay=cfg.run.ema_decay, dtype=torch.float32)
    res_schedule = ResolutionSchedule(cfg.schedule.resolution, cfg.run.epochs)
    lr_scheduler = LRScheduler(LRSchedule(cfg.schedule.lr, cfg.run.epochs), engine.optimizer)
    if cfg.aug.mixup_active:
        criterion = SoftTargetCrossEntropy()
    elif cfg.aug.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(cfg.aug.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    accum = cfg.optim.grad_accum

    seed_everything(cfg.run.seed + rank)  # per-rank streams for drop-path etc. (a resume restores them)

    # ---- resume (model/optimizer shards, RNG, loop position, MLflow run id)
    start_epoch, start_step, global_step, run_id, best = 0, 0, 0, None, None
    resume_path = checkpointing.resolve_resume(cfg.checkpoint.resume, ckpt_dir)
    if resume_path is not None:
        state = checkpointing.load(engine, resume_path, rank=rank)
        start_epoch, start_step, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        run_id, best = state.get("mlflow_run_id"), state.get("best_top1")
        lr_scheduler.load_state_dict(state["lr_schedule"])
        if ema is not None and "ema" in state:
            ema.module.load_state_dict(state["ema"])
        log.line(f"resumed from {resume_path} at epoch {start_epoch} step {start_step} (global {global_step})")

    tracker = tracking.make_tracker(cfg, rank=rank, run_id=run_id)
    if resume_path is None:
        tracker.log_params({**to_dict(cfg), "world_size": world, "precision": prec, "num_params": n_params,
                            "num_classes": num_classes, "deepspeed": ds_config})
        tracker.log_text(cfg.to_yaml(), "config/train_config.yaml")
        tracker.log_dict(ds_config, "config/deepspeed_config.json")

    loader = build_train_loader(cfg.data, cfg.aug, num_classes=num_classes, rank=rank, world_size=world,
                                seed=cfg.run.seed)
    log.line(f"model {cfg.model.name} ({n_params / 1e6:.2f}M params) world={world} precision={prec} "
             f"zero={engine.zero_optimization_stage()} run_dir={run_dir}")

    def client_state(epoch: int, step_in_epoch: int) -> dict[str, Any]:
        out = {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
               "lr_schedule": lr_scheduler.state_dict(), "mlflow_run_id": tracker.run_id, "best_top1": best,
               "loader": {"epoch": epoch, "batches_done": step_in_epoch * accum},
               "resolution": res_schedule.at(epoch)[0]}
        if ema is not None:
            out["ema"] = ema.module.state_dict()
        return out

    def save(epoch: int, step_in_epoch: int, metric: float | None = None) -> None:
        path = checkpointing.save(engine, ckpt_dir, global_step, client_state(epoch, step_in_epoch), rank=rank,
                                  config_yaml=cfg.to_yaml(), keep_last=cfg.checkpoint.keep_last, metric=metric,
                                  keep_best=cfg.checkpoint.keep_best)
        log.line(f"checkpoint {path}")

    def run_eval(res: int, epoch: int, final: bool) -> dict[int, dict[str, float]]:
        engine.eval()
        results = evaluation.evaluate(engine, cfg.data, resolutions=(res, *cfg.eval.resolutions), rank=rank,
                                      world_size=world, crop_pct=cfg.aug.crop_pct, device=device,
                                      input_dtype=input_dtype, max_batches=cfg.eval.max_batches, aug_cfg=cfg.aug)
        if ema is not None:  # the (fp32) EMA weights at the training resolution
            ema_res = evaluation.evaluate(ema.module.eval(), cfg.data, resolutions=(res,), rank=rank,
                                          world_size=world, crop_pct=cfg.aug.crop_pct, device=device,
                                          input_dtype=torch.float32, max_batches=cfg.eval.max_batches,
                                          aug_cfg=cfg.aug)
            tracker.log_metrics({"eval_ema/top1": ema_res[res]["top1"]}, step=global_step)
            log.line(f"EMA top-1 at {res}px: {ema_res[res]['top1']:.2f}")
        engine.train()
        tracker.log_metrics({f"eval/{k}_{r}px": v[k] for r, v in results.items() for k in ("top1", "top5", "loss")}
                            | {"eval/top1": results[res]["top1"], "epoch": epoch}, step=global_step)
        log.line(("final " if final else f"epoch {epoch} ") + "eval:\n" + evaluation.format_table(results, res))
        return results

    # ---- the loop
    timer, nonfinite_run, nonfinite_total, loss_sum, loss_n = StepTimer(), 0, 0, 0.0, 0
    results: dict[int, dict[str, float]] = {}
    exit_code, res = 0, res_schedule.at(start_epoch)[0]
    max_steps = cfg.run.max_steps
    t_start = time.time()
    engine.train()
    for epoch in range(start_epoch, cfg.run.epochs):
        res, batch = res_schedule.at(epoch)
        batch = batch or cfg.data.batch_size
        skip = start_step if epoch == start_epoch else 0
        loader.set_epoch(epoch, res, batch_size=batch, skip_batches=skip * accum)
        steps_in_epoch = len(loader) // accum
        global_batch = batch * accum * world
        log.start_epoch(epoch, steps_in_epoch, skip, res)
        step_in_epoch, skipped_micro, consumed = skip, 0, 0
        with torch.random.fork_rng(devices=[]):  # creating the iterator must not shift the trainer's RNG stream
            batches = iter(loader)
        timer.start()
        for images, targets in batches:
            if step_in_epoch >= steps_in_epoch:
                break
            consumed += 1
            timer.wait_done()
            images = images.to(device, dtype=input_dtype, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            loss = criterion(engine(images).float(), targets)
            # all ranks agree on skipping (ZeRO backward/step are collective) and on stopping
            flags = all_reduce_max([0.0 if math.isfinite(loss.item()) else 1.0, float(stop_requested())])
            if flags[0]:   # no backward, no optimizer step; the batch still counts as consumed (see below)
                nonfinite_run, nonfinite_total = nonfinite_run + 1, nonfinite_total + 1
                log.line(f"non-finite loss at step {global_step}: skipped ({nonfinite_run} in a row)")
                tracker.log_metrics({"train/nonfinite_skipped": nonfinite_total}, step=global_step)
                skipped_micro += 1
                if skipped_micro % accum == 0:   # a whole step's worth of data: the epoch position moves on
                    step_in_epoch += 1
                if nonfinite_run >= cfg.run.nonfinite_patience:
                    exit_code = EXIT_NONFINITE
                    break
                if flags[1]:
                    save(epoch, step_in_epoch)
                    exit_code = EXIT_PREEMPTED
                    break
                timer.start()
                continue
            nonfinite_run = 0
            if engine.is_gradient_accumulation_boundary():
                lr_scheduler.step(epoch, step_in_epoch, steps_in_epoch, global_batch)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            if not boundary:
                continue
            global_step, step_in_epoch = global_step + 1, step_in_epoch + 1
            if ema is not None:
                ema.update(engine.module, step=global_step)
            timer.step_done(batch * accum)
            log.update()

            if global_step % cfg.run.log_every == 0:
                tot_loss, tot_n = all_reduce_sum([loss_sum, loss_n])
                grad_norm = engine.get_global_grad_norm()
                metrics = {"train/loss": tot_loss / max(tot_n, 1), "train/lr": lr_scheduler.last_lr,
                           "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                           "train/resolution": res, "train/batch_global": global_batch, "train/epoch": epoch,
                           "train/nonfinite_skipped": nonfinite_total, **timer.summary(world)}
                metrics["throughput/img_s"] = all_reduce_sum([metrics["throughput/img_s_rank"]])[0]
                tracker.log_metrics(metrics, step=global_step)
                log.metrics(global_step, metrics)
                timer.reset()
                loss_sum, loss_n = 0.0, 0
            if flags[1]:
                save(epoch, step_in_epoch)
                exit_code = EXIT_PREEMPTED
                break
            if max_steps is not None and global_step >= max_steps:
                break
            if cfg.checkpoint.every_steps and global_step % cfg.checkpoint.every_steps == 0 \
                    and step_in_epoch < steps_in_epoch:
                save(epoch, step_in_epoch)
            timer.start()
        log.close()
        if exit_code:
            break
        done = max_steps is not None and global_step >= max_steps
        if consumed >= (steps_in_epoch - skip) * accum:
            # the epoch's data is done (with accum > 1, skipped non-finite micro-batches leave a window short)
            step_in_epoch = steps_in_epoch
        elif step_in_epoch < steps_in_epoch and not done:
            raise RuntimeError(f"loader ended after {consumed} of {(steps_in_epoch - skip) * accum} batches in "
                               f"epoch {epoch}")
        last = epoch == cfg.run.epochs - 1 or done
        metric = None
        if last or (cfg.eval.every_epochs and (epoch + 1) % cfg.eval.every_epochs == 0):
            results = run_eval(res, epoch, final=last)
            metric = results[res]["top1"]
            best = metric if best is None else max(best, metric)
        full_epoch = step_in_epoch >= steps_in_epoch
        save(epoch + 1 if full_epoch else epoch, 0 if full_epoch else step_in_epoch, metric)
        tracker.log_metrics({"epoch/index": epoch, "epoch/time_s": time.time() - t_start}, step=global_step)
        if done:
            break

    summary: dict[str, Any] = {
        "exit_code": exit_code, "global_step": global_step, "train_resolution": res, "world_size": world,
        "nonfinite_skipped": nonfinite_total, "wall_time_s": time.time() - t_start, "best_top1": best,
        "eval": {str(r): v for r, v in results.items()}, "mlflow_run_id": tracker.run_id,
        "checkpoint": str(checkpointing.find_latest(ckpt_dir) or ""), "run_dir": str(run_dir)}
    if rank == 0 and results:
        png = tracking.resolution_plot(results, run_dir / "resolution_vs_accuracy.png", train_res=res,
                                       title=f"{cfg.model.name}: top-1 vs test resolution")
        tracker.log_artifact(png)
    if rank == 0:
        tracking.write_json(summary, run_dir / "final_metrics.json")
        tracker.log_artifact(run_dir / "final_metrics.json")
    tracker.finish("FINISHED" if exit_code == 0 else ("KILLED" if exit_code == EXIT_PREEMPTED else "FAILED"))
    if exit_code == EXIT_NONFINITE:
        hint = "lower schedule.lr.lr or check the data" + (", or use bf16 instead of fp16" if prec == "fp16" else "")
        raise NonFiniteLossError(f"stopped: {cfg.run.nonfinite_patience} non-finite losses in a row at step "
                                 f"{global_step} ({hint})")
    return summary


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cli() -> int:
    try:
        summary = main()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    return int(summary.get("exit_code", 0))


if __name__ == "__main__":
    sys.exit(cli())
