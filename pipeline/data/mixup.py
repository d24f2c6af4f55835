"""Batch-level augmentation: timm's RandomErasing and Mixup/CutMix (+ label smoothing into soft targets).

Both draw from Python's, NumPy's and torch's global RNGs. :func:`pipeline.rng.seeded` runs them under a seed
derived from (seed, epoch, rank, batch index) and restores the caller's RNG state afterwards, so batches are
reproducible (and a resumed epoch that skips k batches sees the same augmentation as an uninterrupted one)
without disturbing the trainer's own random streams (dropout, drop-path).
"""
from __future__ import annotations

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing

from pipeline.config import AugConfig
from pipeline.rng import seeded


def build_mixup(aug: AugConfig, num_classes: int):
    """timm ``Mixup`` for the config, or ``None`` when Mixup and CutMix are both off."""
    if not aug.mixup_active:
        return None
    return Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix,
                 cutmix_minmax=tuple(aug.cutmix_minmax) if aug.cutmix_minmax else None,
                 prob=aug.mixup_prob, switch_prob=aug.mixup_switch_prob, mode=aug.mixup_mode,
                 label_smoothing=aug.smoothing, num_classes=num_classes)


def build_random_erasing(aug: AugConfig, device: torch.device | str = "cpu"):
    if aug.reprob <= 0:
        return None
    return RandomErasing(aug.reprob, mode=aug.remode, max_count=aug.recount, device=str(device))


class BatchAugment:
    """``(normalised float images, int64 labels, seed) -> (images, labels or soft targets (B, num_classes))``."""

    def __init__(self, aug: AugConfig, num_classes: int, device: torch.device | str = "cpu"):
        self.erasing = build_random_erasing(aug, device)
        self.mixup = build_mixup(aug, num_classes)
        self.num_classes = num_classes
        self.device = device

    @property
    def soft_targets(self) -> bool:
        return self.mixup is not None

    def set_mixup_prob(self, prob: float) -> None:
        """The probability that a batch is mixed (Mixup/CutMix), e.g. ramped with training progress; the draws
        made per batch stay the same, so the seeded stream does not shift."""
        if self.mixup is not None:
            self.mixup.mix_prob = float(prob)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.erasing is None and self.mixup is None:
            return images, labels
        with seeded(seed, self.device):
            if self.erasing is not None:
                images = self.erasing(images)
            if self.mixup is not None:
                if images.shape[0] % 2:
                    raise ValueError(f"Mixup/CutMix needs an even batch, got {images.shape[0]}")
                images, labels = self.mixup(images, labels)
        return images, labels


__all__ = ["BatchAugment", "build_mixup", "build_random_erasing"]
