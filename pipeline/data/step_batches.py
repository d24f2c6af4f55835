"""The training loop's view of a loader: one item per optimizer step (its ``accum`` micro-batches with their
sample keys), and a look at the next step before it is taken (a checkpoint records what the next step reads)."""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

MicroBatch = tuple[Any, Any, "list[str] | None"]   # (images, targets, sample keys or None)


def step_keys(micro: list[MicroBatch]) -> list[str] | None:
    """The sample keys of one step's micro-batches; None if a micro-batch has none."""
    return None if any(m[2] is None for m in micro) else [k for _, _, ks in micro for k in ks]


class StepBatches:
    """Groups a loader's micro-batches into optimizer steps of ``accum``; :meth:`peek` fetches the next step
    without consuming it. A short tail (fewer than ``accum``) is an error: the loader promised whole steps."""

    def __init__(self, loader: Iterable, accum: int):
        with_keys = getattr(loader, "iter_with_keys", None)
        # creating the loader's iterator must not shift the trainer's RNG stream (a resume restores that stream)
        with torch.random.fork_rng(devices=[]):
            self._it: Iterator[MicroBatch] = iter(with_keys() if with_keys else ((x, y, None) for x, y in loader))
        self.accum = accum
        self._next: list[MicroBatch] | None = None

    def peek(self) -> list[MicroBatch]:
        if self._next is None:
            self._next = [m for _, m in zip(range(self.accum), self._it)]
        return self._next

    def __iter__(self) -> StepBatches:
        return self

    def __next__(self) -> list[MicroBatch]:
        step, self._next = self.peek(), None
        if not step:
            raise StopIteration
        if len(step) < self.accum:
            raise RuntimeError(f"the loader ended inside an optimizer step ({len(step)} of {self.accum} "
                               f"micro-batches)")
        return step
