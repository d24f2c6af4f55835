"""Training schedules: progressive resolution (epoch -> resolution, batch size) and the learning rate.

Resolution schedules (:class:`ResolutionScheduleConfig`, ``kind``):

* ``fixed``: ``resolution`` every epoch.
* ``linear``: FFCV's ramp: ``start_res`` up to ``start_epoch``, ``end_res`` from ``end_epoch`` on, linear
  interpolation in between rounded to a multiple of ``patch_size``.
* ``steps``: ``[[epoch, res], ...]``: from each epoch on, that resolution (first entry at epoch 0).
* ``low_then_full``: ``low_res`` for all but the last ``full_res_epochs`` epochs, then ``resolution``
  (DeiT III / FixRes style "train small, finish at full size").

``batch_sizes: [[res, batch], ...]`` optionally sets the per-rank batch size per resolution: a resolution uses
the entry of the smallest listed resolution >= it (memory-safe for resolutions in between), and ``None`` (the
data section's batch size) above all entries.

The learning rate (:class:`LRScheduleConfig`) is DeiT's: linear warmup from ``warmup_lr`` then cosine down to
``min_lr``, with the peak ``lr * global_batch / ref_batch``. It is a pure function of *progress* measured in
fractional epochs (``epoch + step / steps_in_epoch``), so it stays on the same curve when the batch size, and so
the number of steps per epoch, changes with resolution; only the peak follows the current global batch (linear
scaling rule). :class:`LRScheduler` applies it to an optimizer and exposes ``state_dict`` for checkpoints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from pipeline.config import ConfigError, check_multiple, check_positive


# ----------------------------------------------------------------------------------------- resolution
@dataclass
class ResolutionScheduleConfig:
    kind: Literal["fixed", "linear", "steps", "low_then_full"] = "fixed"
    resolution: int = 224                 # fixed, and the final resolution of low_then_full
    start_res: int = 160                  # linear
    end_res: int = 192                    # linear
    start_epoch: int = 0                  # linear: last epoch at start_res
    end_epoch: int = 0                    # linear: first epoch at end_res
    steps: list[tuple[int, int]] = field(default_factory=list)        # steps: [[epoch, res], ...]
    low_res: int = 160                    # low_then_full
    full_res_epochs: int = 0              # low_then_full: the last N epochs run at `resolution`
    patch_size: int = 16                  # every resolution is a multiple of this
    batch_sizes: list[tuple[int, int]] = field(default_factory=list)  # [[res, per-rank batch], ...]

    def validate(self) -> None:
        check_positive("patch_size", self.patch_size)
        p = self.patch_size

        def res_ok(name: str, value: int) -> None:
            check_positive(name, value)
            check_multiple(name, value, p)

        if self.kind == "fixed":
            res_ok("resolution", self.resolution)
        elif self.kind == "linear":
            res_ok("start_res", self.start_res)
            res_ok("end_res", self.end_res)
            check_positive("start_epoch", self.start_epoch, allow_zero=True)
            if self.end_epoch < self.start_epoch:
                raise ConfigError(f"end_epoch: {self.end_epoch} must be >= start_epoch ({self.start_epoch})")
        elif self.kind == "steps":
            if not self.steps:
                raise ConfigError("steps: must list [epoch, resolution] pairs for kind 'steps', e.g. "
                                  "[[0, 128], [10, 160], [20, 224]]")
            epochs = [e for e, _ in self.steps]
            if epochs[0] != 0:
                raise ConfigError(f"steps: the first entry must start at epoch 0, got epoch {epochs[0]}")
            if any(b <= a for a, b in zip(epochs, epochs[1:])):
                raise ConfigError(f"steps: epochs {epochs} must be strictly increasing")
            for i, (_, r) in enumerate(self.steps):
                res_ok(f"steps[{i}]", r)
        else:  # low_then_full
            res_ok("low_res", self.low_res)
            res_ok("resolution", self.resolution)
            check_positive("full_res_epochs", self.full_res_epochs, allow_zero=True)
        seen = set()
        for i, (r, b) in enumerate(self.batch_sizes):
            res_ok(f"batch_sizes[{i}]", r)
            check_positive(f"batch_sizes[{i}]", b)
            if r in seen:
                raise ConfigError(f"batch_sizes[{i}]: resolution {r} is listed twice")
            seen.add(r)


class ResolutionSchedule:
    """``at(epoch) -> (resolution, batch_size or None)``; epochs past the end keep the final value."""

    def __init__(self, cfg: ResolutionScheduleConfig, total_epochs: int):
        if total_epochs <= 0:
            raise ConfigError(f"epochs: {total_epochs!r} must be > 0")
        if cfg.kind == "low_then_full" and cfg.full_res_epochs > total_epochs:
            raise ConfigError(f"full_res_epochs: {cfg.full_res_epochs} must be <= epochs ({total_epochs})")
        self.cfg = cfg
        self.total_epochs = total_epochs
        self._batch_table = sorted((int(r), int(b)) for r, b in cfg.batch_sizes)

    def resolution(self, epoch: int) -> int:
        c = self.cfg
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if c.kind == "fixed":
            return c.resolution
        if c.kind == "linear":
            if epoch >= c.end_epoch:
                return c.end_res
            if epoch <= c.start_epoch:
                return c.start_res
            frac = (epoch - c.start_epoch) / (c.end_epoch - c.start_epoch)
            res = c.start_res + frac * (c.end_res - c.start_res)
            return int(round(res / c.patch_size)) * c.patch_size
        if c.kind == "steps":
            res = c.steps[0][1]
            for e, r in c.steps:
                if epoch >= e:
                    res = r
            return res
        return c.resolution if epoch >= self.total_epochs - c.full_res_epochs else c.low_res

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


# ----------------------------------------------------------------------------------------- learning rate
@dataclass
class LRScheduleConfig:
    lr: float = 5e-4                       # peak lr at the reference global batch
    ref_batch: int = 512                   # lr is scaled by global_batch / ref_batch
    batch_scaling: Literal["linear", "sqrt", "none"] = "linear"
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5

    def validate(self) -> None:
        check_positive("lr", self.lr)
        check_positive("ref_batch", self.ref_batch)
        check_positive("warmup_epochs", self.warmup_epochs, allow_zero=True)
        check_positive("warmup_lr", self.warmup_lr, allow_zero=True)
        check_positive("min_lr", self.min_lr, allow_zero=True)


def epoch_progress(epoch: int, step: int, steps_in_epoch: int) -> float:
    """Fractional epochs completed before optimizer step ``step`` (0-based) of ``epoch``."""
    if steps_in_epoch <= 0:
        raise ValueError(f"steps_in_epoch must be > 0, got {steps_in_epoch}")
    return epoch + step / steps_in_epoch


class LRSchedule:
    """Warmup + cosine as a function of fractional-epoch progress and the current global batch."""

    def __init__(self, cfg: LRScheduleConfig, total_epochs: int):
        if total_epochs <= 0:
            raise ConfigError(f"epochs: {total_epochs!r} must be > 0")
        if cfg.warmup_epochs >= total_epochs:
            raise ConfigError(f"warmup_epochs: {cfg.warmup_epochs} must be < epochs ({total_epochs})")
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


__all__ = ["LRSchedule", "LRScheduleConfig", "LRScheduler", "ResolutionSchedule", "ResolutionScheduleConfig",
           "epoch_progress"]
