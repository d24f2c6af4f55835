"""Step metrics for the training loop: data-wait vs compute time, throughput (global and per rank), and output
on rank 0 as a tqdm bar on a TTY or plain ``key=value`` lines otherwise (log files, SLURM, CI)."""
from __future__ import annotations

import sys
import time
from typing import Any

import torch
from tqdm import tqdm

from pipeline.redaction import redact
from pipeline.distributed import all_reduce_


class _Window:
    """Data-wait and compute seconds, samples and steps summed over a span of steps."""

    def __init__(self) -> None:
        self.data_s = self.compute_s = 0.0
        self.samples = self.steps = 0

    def summary(self, world_size: int) -> dict[str, float]:
        total = max(self.data_s + self.compute_s, 1e-9)
        per_rank = self.samples / total
        return {"throughput/img_s_rank": per_rank, "throughput/img_s": per_rank * world_size,
                "time/data_wait_ms": 1000 * self.data_s / max(self.steps, 1),
                "time/compute_ms": 1000 * self.compute_s / max(self.steps, 1),
                "time/data_wait_frac": self.data_s / total}


class StepTimer:
    """Data wait vs compute per optimizer step: ``start()`` when the loop asks for a batch, ``wait_done()`` once it
    arrived, ``step_done(n)`` after the optimizer step. Two spans are kept from the same clock readings: the
    logging window (:meth:`window`, reset at each log) and the steady state of the run (:meth:`steady`, from
    the end of the first window, which holds the warm-up)."""

    def __init__(self) -> None:
        self._window, self._steady = _Window(), _Window()
        self._t = time.perf_counter()

    def start(self) -> None:
        self._t = time.perf_counter()

    def _lap(self) -> float:
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        return dt

    def wait_done(self) -> None:
        dt = self._lap()
        self._window.data_s += dt
        self._steady.data_s += dt

    def step_done(self, samples: int) -> None:
        dt = self._lap()
        for w in (self._window, self._steady):
            w.compute_s += dt
            w.samples += samples
            w.steps += 1

    def window(self, world_size: int, *, reset: bool = True, warmup_over: bool = False) -> dict[str, float]:
        """This rank's numbers since the last call (global throughput assumes equal per-rank batches);
        ``warmup_over``: the steady-state span starts now."""
        out = self._window.summary(world_size)
        if reset:
            self._window = _Window()
        if warmup_over:
            self._steady = _Window()
        return out

    def steady(self, world_size: int) -> dict[str, float]:
        return self._steady.summary(world_size)


class ProgressLog:
    """Rank-0 output. ``bar`` True: tqdm progress bar per epoch; False: one plain line per log call;
    None: a bar only when stdout is a TTY."""

    def __init__(self, rank: int, bar: bool | None = None, stream=None):
        self.rank = rank
        self.stream = stream or sys.stdout
        self.bar_enabled = rank == 0 and (self.stream.isatty() if bar is None else bar)
        self._bar = None

    def start_epoch(self, epoch: int, total: int, initial: int = 0, resolution: int | None = None) -> None:
        if self.rank != 0:
            return
        if self.bar_enabled:
            self.close()
            self._bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch} @{resolution}px",
                             dynamic_ncols=True, file=self.stream)
        else:
            self.line(f"epoch {epoch} start: resolution={resolution} steps={total} resume_at={initial}")

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def metrics(self, step: int, values: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        short = {k.split("/")[-1]: v for k, v in values.items()}
        text = " ".join(f"{k}={_fmt(v)}" for k, v in short.items())
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
        else:
            self.line(f"step {step} {text}")

    def line(self, text: str) -> None:
        if self.rank != 0:
            return
        text = redact(text)
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class LossMeter:
    """The training losses, kept on the device (no host read per step). Over a logging window: the sum and count
    of the finite ones, reduced over ranks and read once by :meth:`mean`. Over the current optimizer step: whether
    any micro-batch's loss was not finite, read by :meth:`step_nonfinite` only when a step was skipped."""

    def __init__(self, device) -> None:
        self._sums = torch.zeros(2, dtype=torch.float64, device=device)   # loss sum, finite count
        self._step_nonfinite = torch.zeros(1, device=device)             # 1.0 once a micro-batch's loss is not

    def start_step(self) -> None:
        self._step_nonfinite.zero_()

    def add(self, loss: torch.Tensor) -> None:
        """One micro-batch's loss (detached)."""
        finite = torch.isfinite(loss)
        self._sums += torch.stack([torch.where(finite, loss, 0.0).double(), finite.double()])
        self._step_nonfinite.copy_(torch.maximum(self._step_nonfinite, (~finite).float().reshape(1)))

    def step_nonfinite(self) -> bool:
        """Whether a loss of this step's micro-batches was not finite on any rank (one collective + host read)."""
        return bool(all_reduce_(self._step_nonfinite.clone(), "MAX").item())

    def mean(self) -> float:
        total, n = all_reduce_(self._sums.clone()).tolist()
        self._sums.zero_()
        return total / n if n else float("nan")
