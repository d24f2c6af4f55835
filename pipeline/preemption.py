"""Preemption: SIGUSR1/SIGTERM ask the trainer to checkpoint and exit at a step boundary that all ranks agree on.

The signal handler only sets a flag. Ranks agree on it with one tiny all-reduce every ``check_every`` steps (not
every step: the collective's host read would stall the device queue), which is well inside the grace period a
scheduler gives (SLURM's ``--signal=USR1@90``); a single process reads its own flag every step for free.
"""
from __future__ import annotations

import signal
from typing import Any

import torch

from pipeline.distributed import all_reduce_

_STOP = {"requested": False, "signal": None}


def request_stop(signum: int | None = None, frame: Any = None) -> None:
    """Ask the training loop to checkpoint and exit at the next agreed step boundary (signal-handler safe)."""
    _STOP["requested"], _STOP["signal"] = True, signum


def clear_stop() -> None:
    """Forget a stop request (a new run in the same process, or a test that simulated a signal)."""
    _STOP["requested"], _STOP["signal"] = False, None


def install_stop_handlers(signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> None:
    """Route ``signals`` to :func:`request_stop` (launchers may call this themselves)."""
    for s in signals:
        signal.signal(s, request_stop)


def stop_requested() -> bool:
    return _STOP["requested"]


def stop_signal() -> int | None:
    """The signal that asked for the stop (None if it was asked without one)."""
    return _STOP["signal"]


class StopAgreement:
    """``should_stop()`` once per step on every rank: True on all ranks at the same step once any rank was
    signalled (checked every ``check_every`` steps with more than one rank)."""

    def __init__(self, world_size: int, device, check_every: int = 10):
        self.world_size, self.device, self.check_every = world_size, device, max(1, int(check_every))
        self._calls = 0

    def should_stop(self) -> bool:
        self._calls += 1
        if self.world_size == 1:
            return stop_requested()
        if self._calls % self.check_every:
            return False
        return bool(all_reduce_(torch.tensor([float(stop_requested())], device=self.device), "MAX").item())
