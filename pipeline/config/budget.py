"""The epochs of a budgeted progressive-resolution schedule (``schedule.resolution.kind: budgeted``): equal-cost
segments from low to full resolution under a compute budget, the EfficientTrain++ rule.

The schedule lists one resolution per *segment* (``resolutions``, low to high; a resolution listed k times gets k
segments, as EfficientTrain++'s DeiT schedule ``96 x2, 160 x4, 192 x2, 224 x2`` does). The budget is a fraction of
the compute of the fixed-resolution run (``reference_epochs`` epochs at ``resolution``), and every segment costs
the same share of it, so a segment at ``r`` trains ``(resolution / r)^2`` times as many epochs as one at full
resolution. Consecutive segments of one resolution form a *stage* (one resolution, one batch layout).

Cost model: tokens per image, ``(r / patch)^2``, times images: the cost of one epoch at ``r`` is
``(r / resolution)^2`` reference epochs (the same epoch length at every resolution: the global batch is constant).
This is EfficientTrain++'s rule. It leaves out attention's N^2 term, N / (6d + N) of a block's FLOPs (N tokens,
width d): at 224 px 15 % for CPVT-Ti, 8 % for CPVT-S, 4 % for CPVT-B, less at low resolution; so the shares below
slightly under-count the full-resolution stages' cost relative to the low ones.

Epochs are whole numbers: each stage's epochs are rounded so that the cumulative cost stays closest to the ideal
cumulative cost (error carried forward, every stage at least one epoch), and the plan states the share of the
reference's compute actually spent (:attr:`StagePlan.share`) beside the budget asked for. Pure arithmetic on
integers and floats: the config's validation and the trainer compute the same plan.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """Consecutive segments at one resolution: epochs ``[first_epoch, first_epoch + epochs)``, segments
    ``[first_segment, first_segment + segments)``, costing ``cost`` reference epochs."""
    resolution: int
    first_epoch: int
    epochs: int
    first_segment: int
    segments: int
    cost: float


@dataclass(frozen=True)
class StagePlan:
    stages: tuple[Stage, ...]
    resolution: int            # the reference (fixed-resolution) run's resolution, the final one
    reference_epochs: int      # the reference run's epochs
    budget: float              # the share of the reference's compute asked for
    num_segments: int

    @property
    def total_epochs(self) -> int:
        return sum(s.epochs for s in self.stages)

    @property
    def cost(self) -> float:
        """Compute of the plan in epochs at the reference resolution."""
        return sum(s.cost for s in self.stages)

    @property
    def share(self) -> float:
        """The share of the reference run's compute the plan spends (the budget after rounding)."""
        return self.cost / self.reference_epochs

    def stage_at(self, epoch: int) -> Stage:
        """The stage training ``epoch`` (0-based; epochs past the end: the last stage)."""
        for s in self.stages:
            if epoch < s.first_epoch + s.epochs:
                return s
        return self.stages[-1]

    def segment_at(self, epoch: int) -> int:
        """The segment (0-based, of :attr:`num_segments`) training ``epoch``: a stage's epochs are split between
        its segments as evenly as whole epochs allow, earlier segments first."""
        s = self.stage_at(min(max(epoch, 0), self.total_epochs - 1))
        offset = min(epoch - s.first_epoch, s.epochs - 1)
        return s.first_segment + (offset * s.segments) // s.epochs


def epoch_cost(res: int, final: int) -> float:
    """Cost of one epoch at ``res`` in epochs at ``final``: the ratio of tokens per image, (res/p)^2 / (final/p)^2."""
    return (res / final) ** 2


def plan_stages(resolutions: list[int] | tuple[int, ...], resolution: int, reference_epochs: int,
                budget: float) -> StagePlan:
    """The stages of a budgeted schedule (see the module docstring). Inputs are assumed valid (the schema checks
    them: resolutions non-decreasing, each <= ``resolution``; ``reference_epochs`` > 0; 0 < ``budget``)."""
    n = len(resolutions)
    per_segment = budget * reference_epochs / n      # reference epochs each segment costs
    runs: list[tuple[int, int, int]] = []            # (resolution, first segment, segments)
    for i, r in enumerate(resolutions):
        if runs and runs[-1][0] == r:
            runs[-1] = (r, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((int(r), i, 1))
    stages, epoch, ideal, spent = [], 0, 0.0, 0.0
    for r, first_segment, segments in runs:
        unit = epoch_cost(r, resolution)
        ideal += segments * per_segment
        epochs = max(1, round((ideal - spent) / unit))
        stages.append(Stage(r, epoch, epochs, first_segment, segments, epochs * unit))
        epoch += epochs
        spent += epochs * unit
    return StagePlan(tuple(stages), int(resolution), int(reference_epochs), float(budget), n)


__all__ = ["Stage", "StagePlan", "epoch_cost", "plan_stages"]
