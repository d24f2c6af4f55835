"""Random number generators, in one place: derived seeds, seeding, and the state a checkpoint saves.

* :func:`make_seed` mixes integers (seed, epoch, rank, batch index, a purpose tag) into one 63-bit seed, the same
  in every process (unlike ``hash``): loaders derive every random stream from it.
* :func:`seeded` runs a block under a seed and puts the caller's Python/NumPy/torch states back afterwards
  (batch augmentation, so a resumed epoch sees the same draws without disturbing the trainer's streams).
* :func:`seed_everything` seeds Python's, NumPy's and torch's global generators (the trainer's streams).
* :func:`rng_state` / :func:`set_rng_state`: those global states (plus CUDA's) for checkpoints.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch


def make_seed(*parts: int) -> int:
    """Mix non-negative integers into a 63-bit seed (stable across processes, unlike ``hash``)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


@contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Seed ``random``, ``numpy.random`` and torch's CPU generator (plus ``device``'s generator when it is a
    CUDA device) for the block, then restore their states. (``torch.manual_seed`` is avoided on purpose: it
    also queues a seed for every CUDA device, which costs milliseconds per call.)"""
    cpu = torch.random.default_generator
    gen = None
    if device is not None and torch.device(device).type == "cuda":
        d = torch.device(device)
        gen = torch.cuda.default_generators[d.index if d.index is not None else torch.cuda.current_device()]
    py_state, np_state, cpu_state = random.getstate(), np.random.get_state(), cpu.get_state()
    gen_state = gen.get_state() if gen is not None else None
    random.seed(seed)
    np.random.seed(seed % (2**32))
    cpu.manual_seed(seed)
    if gen is not None:
        gen.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        cpu.set_state(cpu_state)
        if gen is not None:
            gen.set_state(gen_state)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (every CUDA device's too) with ``seed``.

    Not ``timm.utils.random_seed(seed, rank)``: that adds the rank itself and hands ``seed + rank`` to
    ``np.random.seed`` unreduced, which raises for seeds >= 2**32; callers pass ``seed + rank`` here."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python/NumPy/torch CPU (and, when available, every CUDA device's) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (the CUDA states only where CUDA is available)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


__all__ = ["make_seed", "rng_state", "seed_everything", "seeded", "set_rng_state"]
