"""Training schedules: progressive resolution (epoch -> resolution, batch size) and the learning rate.

Resolution schedules (:class:`ResolutionScheduleConfig`, ``kind``):

* ``fixed``: ``resolution`` every epoch.
* ``linear``: FFCV's ramp: ``start_res`` up to ``start_epoch``, ``end_res`` from ``end_epoch`` on, linear
  interpolation in between rounded to a multiple of ``patch_size``.
* ``steps``: ``[[epoch, res], ...]``: from each epoch on, that resolution (first entry at epoch 0).
* ``low_then_full``: ``low_res`` for all but the last ``full_res_epochs`` epochs, then ``resolution``
  (DeiT III / FixRes style "train small, finish at full size").
* ``budgeted``: EfficientTrain++'s equal-cost stages under a compute budget (:mod:`pipeline.config.budget`) at
  one global batch: each stage's per-rank batch and accumulation (:func:`step_layout`); :func:`plan_rows` /
  :func:`plan_lines` are the resolved plan the trainer prints and logs before training.

``batch_sizes: [[res, batch], ...]`` optionally sets the per-rank batch size per resolution: a resolution uses
the entry of the smallest listed resolution >= it (memory-safe for resolutions in between), and ``None`` (the
data section's batch size) above all entries.

The learning rate (:class:`LRScheduleConfig`) is DeiT's: linear warmup from ``warmup_lr`` then cosine down to
``min_lr``, with the peak ``lr * global_batch / ref_batch``. It is a pure function of *progress* measured in
fractional epochs (``epoch + step / steps_in_epoch``), so it stays on the same curve when the batch size, and so
the number of steps per epoch, changes with resolution; only the peak follows the current global batch (linear
scaling rule). :class:`LRScheduler` applies it to an optimizer and exposes ``state_dict`` for checkpoints.

Augmentation strength (``aug.strength_ramp``, :func:`aug_strength`): a fraction of the recipe's augmentation per
epoch, rising over the resolution schedule's stages or the epochs; :func:`ramped_magnitude` turns it into the
RandAugment magnitude of the epoch. A pure function of the epoch, so a resumed epoch gets the same values.
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional

from pipeline.config import LRScheduleConfig, ResolutionScheduleConfig, TrainConfig


# ----------------------------------------------------------------------------------------- resolution
class ResolutionSchedule:
    """``at(epoch) -> (resolution, batch_size or None)``; epochs past the end keep the final value."""

    def __init__(self, cfg: ResolutionScheduleConfig, total_epochs: int):
        cfg.check_epochs(total_epochs)
        self.cfg = cfg
        self.total_epochs = total_epochs
        self._batch_table = sorted((int(r), int(b)) for r, b in cfg.batch_sizes)

    def resolution(self, epoch: int) -> int:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return self.cfg.resolution_at(epoch, self.total_epochs)

    def batch_size(self, resolution: int) -> Optional[int]:
        for r, b in self._batch_table:
            if r >= resolution:
                return b
        return None

    def at(self, epoch: int) -> tuple[int, Optional[int]]:
        res = self.resolution(epoch)
        return res, self.batch_size(res)

    def table(self) -> list[tuple[int, int, Optional[int]]]:
        """``[(epoch, res, batch), ...]`` for every epoch of the run (for logging)."""
        return [(e, *self.at(e)) for e in range(self.total_epochs)]


def step_layout(cfg: TrainConfig, epoch: int) -> tuple[int, int, int]:
    """``(resolution, per-rank micro-batch, accumulation steps)`` of ``epoch`` in a config with per-rank values.
    A budgeted schedule keeps the samples per optimizer step (``data.batch_size x optim.grad_accum`` per rank)
    and accumulates ``that / micro``; the other kinds keep ``optim.grad_accum`` (a per-resolution batch there
    changes the global batch)."""
    res, batch = ResolutionSchedule(cfg.schedule.resolution, cfg.run.epochs).at(epoch)
    micro = batch or cfg.data.batch_size
    if cfg.schedule.resolution.kind == "budgeted":
        return res, micro, cfg.data.batch_size * cfg.optim.grad_accum // micro
    return res, micro, cfg.optim.grad_accum


# ----------------------------------------------------------------------------------------- augmentation strength
def aug_strength(cfg: TrainConfig, epoch: int) -> float:
    """The fraction of the recipe's augmentation strength at ``epoch`` (``aug.strength_ramp``): 1 for ``none``;
    ``epochs``: ``epoch / (epochs - 1)``; ``stages``: ``k / (n - 1)`` in the k-th of n stages (budgeted: its
    equal-cost segments; otherwise the runs of equal resolution)."""
    ramp, total = cfg.aug.strength_ramp, cfg.run.epochs
    if ramp == "none":
        return 1.0
    epoch = min(max(int(epoch), 0), total - 1)
    if ramp == "epochs":
        return 1.0 if total == 1 else epoch / (total - 1)
    res_cfg = cfg.schedule.resolution
    if res_cfg.kind == "budgeted":
        plan = res_cfg.stage_plan()
        k, n = plan.segment_at(epoch), plan.num_segments
    else:
        res = [res_cfg.resolution_at(e, total) for e in range(total)]
        starts = [e for e in range(total) if e == 0 or res[e] != res[e - 1]]
        k, n = sum(1 for e in starts if e <= epoch) - 1, len(starts)
    return 1.0 if n == 1 else k / (n - 1)


_MAGNITUDE = re.compile(r"-m(\d+)(?=-|$)")
DEFAULT_RAND_MAGNITUDE = 10   # timm's RandAugment magnitude when the spec names none


def ramped_magnitude(spec: str | None, strength: float) -> int | None:
    """The RandAugment magnitude at ``strength``: ``round(strength x m)`` of the spec's ``m`` (timm's default 10
    without one), the spec's own at strength 1; None when ``spec`` is not a RandAugment spec."""
    if not spec or not spec.startswith("rand"):
        return None
    m = _MAGNITUDE.search(spec)
    return int(round(min(max(strength, 0.0), 1.0) * (int(m.group(1)) if m else DEFAULT_RAND_MAGNITUDE)))


def with_magnitude(spec: str, magnitude: int) -> str:
    """The RandAugment spec ``spec`` with magnitude ``magnitude`` (its ``m`` section replaced or added)."""
    if _MAGNITUDE.search(spec):
        return _MAGNITUDE.sub(f"-m{int(magnitude)}", spec, count=1)
    return f"{spec}-m{int(magnitude)}"


# ----------------------------------------------------------------------------------------- the resolved plan
def plan_rows(cfg: TrainConfig, world_size: int) -> list[dict[str, Any]]:
    """A budgeted schedule's stages as resolved for ``world_size`` (``cfg`` with per-rank values): resolution,
    epochs, per-rank batch, accumulation, global batch, tokens per optimizer step (patch tokens over all ranks),
    the RandAugment magnitudes its epochs train at, its cost in epochs at the final resolution and its share of
    the plan's cost."""
    res_cfg = cfg.schedule.resolution
    plan = res_cfg.stage_plan()
    patch, rows = res_cfg.patch_size, []
    for i, st in enumerate(plan.stages):
        res, micro, accum = step_layout(cfg, st.first_epoch)
        g = micro * accum * world_size
        mags = sorted({ramped_magnitude(cfg.aug.auto_augment, aug_strength(cfg, e))
                       for e in range(st.first_epoch, st.first_epoch + st.epochs)} - {None})
        rows.append({"stage": i + 1, "resolution": res, "first_epoch": st.first_epoch, "epochs": st.epochs,
                     "segments": st.segments, "per_rank_batch": micro, "accumulation": accum, "global_batch": g,
                     "tokens_per_step": g * (res // patch) ** 2, "magnitudes": mags,
                     "cost_epochs": round(st.cost, 4), "share_of_plan": round(st.cost / plan.cost, 4)})
    return rows


def plan_lines(cfg: TrainConfig, world_size: int) -> list[str]:
    """A budgeted schedule's resolved plan as text (printed before training and by the launcher's ``--dry-run``);
    nothing for the other kinds."""
    res_cfg = cfg.schedule.resolution
    if res_cfg.kind != "budgeted":
        return []
    plan = res_cfg.stage_plan()
    lines = [f"budgeted schedule: {len(plan.stages)} stages, {plan.total_epochs} epochs, {plan.share:.3f} of the "
             f"compute of {plan.reference_epochs} epochs at {plan.resolution} px (budget {plan.budget:g}; "
             f"cost = tokens per image, (res/{res_cfg.patch_size})^2)",
             f"  {'stage':>5} {'res':>4} {'epochs':>13} {'per-rank':>8} {'accum':>5} {'global':>6} "
             f"{'tokens/step':>11} {'RandAug m':>9} {'share':>6}"]
    for r in plan_rows(cfg, world_size):
        last = r["first_epoch"] + r["epochs"] - 1
        mags = r["magnitudes"]
        m = "-" if not mags else (f"{mags[0]}" if len(mags) == 1 else f"{mags[0]}-{mags[-1]}")
        epochs = f"{r['first_epoch']}-{last} ({r['epochs']})"
        lines.append(f"  {r['stage']:>5} {r['resolution']:>4} {epochs:>13} {r['per_rank_batch']:>8} "
                     f"{r['accumulation']:>5} {r['global_batch']:>6} "
                     f"{r['tokens_per_step']:>11} {m:>9} {r['share_of_plan']:>6.1%}")
    return lines


# ----------------------------------------------------------------------------------------- learning rate
def epoch_progress(epoch: int, step: int, steps_in_epoch: int) -> float:
    """Fractional epochs completed before optimizer step ``step`` (0-based) of ``epoch``."""
    if steps_in_epoch <= 0:
        raise ValueError(f"steps_in_epoch must be > 0, got {steps_in_epoch}")
    return epoch + step / steps_in_epoch


class LRSchedule:
    """Warmup + cosine as a function of fractional-epoch progress and the current global batch."""

    def __init__(self, cfg: LRScheduleConfig, total_epochs: int):
        cfg.check_epochs(total_epochs)
        self.cfg = cfg
        self.total_epochs = total_epochs

    def peak_lr(self, global_batch: int) -> float:
        c = self.cfg
        ratio = global_batch / c.ref_batch
        scale = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[c.batch_scaling]
        return c.lr * scale

    def factor(self, progress: float) -> float:
        """Where on the curve ``progress`` is: 0 at warmup_lr/min_lr ends, 1 at the peak."""
        c = self.cfg
        if progress < c.warmup_epochs:
            return max(progress, 0.0) / c.warmup_epochs
        t = (progress - c.warmup_epochs) / (self.total_epochs - c.warmup_epochs)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    def __call__(self, progress: float, global_batch: int) -> float:
        c = self.cfg
        peak = self.peak_lr(global_batch)
        f = self.factor(progress)
        if progress < c.warmup_epochs:
            return c.warmup_lr + (peak - c.warmup_lr) * f
        return c.min_lr + (peak - c.min_lr) * f


class LRScheduler:
    """Sets ``lr`` on every param group (times the group's ``lr_scale`` if any) before each optimizer step."""

    def __init__(self, schedule: LRSchedule, optimizer: Any = None):
        self.schedule = schedule
        self.optimizer = optimizer
        self.last_lr = 0.0

    def step(self, epoch: int, step: int, steps_in_epoch: int, global_batch: int) -> float:
        self.last_lr = self.schedule(epoch_progress(epoch, step, steps_in_epoch), global_batch)
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.last_lr * group.get("lr_scale", 1.0)
        return self.last_lr

    def state_dict(self) -> dict[str, Any]:
        """The lr of the last step: the schedule is a pure function of (progress, global batch), which the trainer
        passes to :meth:`step` again after a resume."""
        return {"last_lr": self.last_lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_lr = float(state["last_lr"])   # (checkpoints before this also hold progress/samples_seen)


__all__ = ["DEFAULT_RAND_MAGNITUDE", "LRSchedule", "LRScheduler", "ResolutionSchedule", "aug_strength",
           "epoch_progress", "plan_lines", "plan_rows", "ramped_magnitude", "step_layout", "with_magnitude"]
