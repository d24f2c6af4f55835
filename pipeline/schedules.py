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
from typing import Any, Optional

from pipeline.config import LRScheduleConfig, ResolutionScheduleConfig


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


__all__ = ["LRSchedule", "LRScheduler", "ResolutionSchedule", "epoch_progress"]
