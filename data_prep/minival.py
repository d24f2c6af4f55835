"""Carve a held-out ``minival`` split from ``train``: deterministic, class-stratified, disjoint from train.

The trainer chooses the test resolution on minival and only then reads val there (never choosing on val), the
held-out split big_vision and DeiT III take from ImageNet's train (1-2 %). The writers
(:mod:`data_prep.write_webdataset`, :mod:`data_prep.write_ffcv`) call :func:`carve` on the discovered train
samples and write the two parts as the splits ``train`` and ``minival``; no image is in both.

The rule (:func:`carve_keys`), for ``fraction`` f and ``seed`` s:

* candidates are the labelled train samples (an unlabelled file stays in train, where it is skipped);
* size: ``k = round(f * n)`` of the ``n`` candidates; each class gets ``floor(f * n_c)``, and the classes with
  the largest remainders ``f * n_c - floor(f * n_c)`` one more until ``k`` is reached (largest-remainder
  apportionment: every class holds the floor or the ceiling of its share; equal remainders are ordered by a hash
  of (s, class));
* within a class the samples with the smallest ``sha256(f"{s}:{key}")`` are taken;
* when ``k`` is below the number of classes the carve is empty: a minival without an image of every class cannot
  rank test resolutions (the 1 % default then leaves a dataset of under ~100 images per class whole).

It depends on (keys, labels, f, s) only: not on the file order, the train shuffle seed, the worker count or the
job that computes it, so a rerun, a resumed run or a SLURM array job (FFCV's split jobs discover train
themselves) carves the same set.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import defaultdict
from fractions import Fraction
from typing import Any, Sequence

from .layout import Sample, SplitSource

MINIVAL = "minival"
SOURCE = "train"            # the split minival is carved from
DEFAULT_FRACTION = 0.01     # `python -m data_prep` default: 1 % of ImageNet's train is ~12.8k images
MAX_FRACTION = 0.5


def _rank(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def class_quotas(counts: dict[int, int], fraction: float, seed: int = 0) -> dict[int, int]:
    """{class: how many of its ``counts[class]`` samples go to minival} (the largest-remainder rule above)."""
    f = Fraction(fraction).limit_denominator(1 << 20)
    total = math.floor(f * sum(counts.values()) + Fraction(1, 2))
    if total < len(counts):   # not one image per class: no minival
        return {c: 0 for c in counts}
    shares = {c: f * n for c, n in counts.items()}
    quotas = {c: math.floor(s) for c, s in shares.items()}
    order = sorted(counts, key=lambda c: (-(shares[c] - quotas[c]), _rank(seed, f"class {c}")))
    for c in order[:max(0, total - sum(quotas.values()))]:
        quotas[c] += 1
    return quotas


def carve_keys(samples: Sequence[Sample], fraction: float, seed: int) -> set[str]:
    """The keys of the samples that go to minival (see the module docstring for the rule)."""
    if not 0.0 <= fraction <= MAX_FRACTION:
        raise ValueError(f"minival_fraction: {fraction!r} must be in [0, {MAX_FRACTION}]")
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        if s.label is not None:
            by_class[s.label].append(s)
    quotas = class_quotas({c: len(v) for c, v in by_class.items()}, fraction, seed)
    keys: set[str] = set()
    for c, members in by_class.items():
        members = sorted(members, key=lambda s: (_rank(seed, s.key), s.key))
        keys.update(s.key for s in members[:quotas[c]])
    return keys


@dataclasses.dataclass(frozen=True)
class Carve:
    """One carve of minival from train: the settings, and the two parts as splits to write."""

    fraction: float
    seed: int
    train: SplitSource
    minival: SplitSource | None    # None: the carve is empty (fraction 0, or too few images for one)

    def record(self) -> dict[str, Any]:
        """What the index entries and manifests of both splits record about the carve."""
        return {"from": SOURCE, "split": MINIVAL, "fraction": self.fraction, "seed": self.seed,
                "num_found": len(self.minival.samples) if self.minival else 0,   # 0: fewer than one per class
                "rule": "stratified by class (largest remainder), smallest sha256(f'{seed}:{key}') per class"}


def carve(train: SplitSource, fraction: float, seed: int) -> Carve:
    """Split the discovered ``train`` into (train without minival, minival); train keeps its order (the shuffle),
    minival is sorted by path like val."""
    keys = carve_keys(train.samples, fraction, seed)
    rest = dataclasses.replace(train, samples=[s for s in train.samples if s.key not in keys])
    if not keys:
        return Carve(fraction, seed, rest, None)
    held = sorted((s for s in train.samples if s.key in keys), key=lambda s: s.path)
    return Carve(fraction, seed, rest, dataclasses.replace(train, split=MINIVAL, samples=held))


__all__ = ["Carve", "DEFAULT_FRACTION", "MAX_FRACTION", "MINIVAL", "SOURCE", "carve", "carve_keys",
           "class_quotas"]
