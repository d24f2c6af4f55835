"""Step metrics for the training loop: data-wait vs compute time, throughput (global and per rank), and output
on rank 0 as a tqdm bar on a TTY or plain ``key=value`` lines otherwise (log files, SLURM, CI)."""
from __future__ import annotations

import sys
import time
from typing import Any


class StepTimer:
    """``wait_done()`` after the batch arrived, ``step_done(n)`` after the optimizer step; averages per window."""

    def __init__(self) -> None:
        self.reset()
        self._t = time.perf_counter()

    def reset(self) -> None:
        self.data_s = 0.0
        self.compute_s = 0.0
        self.samples = 0
        self.steps = 0

    def start(self) -> None:
        self._t = time.perf_counter()

    def wait_done(self) -> None:
        now = time.perf_counter()
        self.data_s += now - self._t
        self._t = now

    def step_done(self, samples: int) -> None:
        now = time.perf_counter()
        self.compute_s += now - self._t
        self._t = now
        self.samples += samples
        self.steps += 1

    def summary(self, world_size: int) -> dict[str, float]:
        """Per-rank numbers of this rank; the global throughput assumes equal per-rank batches."""
        total = max(self.data_s + self.compute_s, 1e-9)
        per_rank = self.samples / total
        return {"throughput/img_s_rank": per_rank, "throughput/img_s": per_rank * world_size,
                "time/data_wait_ms": 1000 * self.data_s / max(self.steps, 1),
                "time/compute_ms": 1000 * self.compute_s / max(self.steps, 1),
                "time/data_wait_frac": self.data_s / total}


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
            from tqdm import tqdm

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
    """Sums of the finite training losses kept on the device (no host sync per step); :meth:`mean` reduces them
    over ranks in one collective and reads them once, at logging time."""

    def __init__(self, device) -> None:
        import torch

        self._sums = torch.zeros(2, dtype=torch.float64, device=device)   # loss sum, finite count

    def add(self, loss) -> None:
        import torch

        finite = torch.isfinite(loss)
        self._sums += torch.stack([torch.where(finite, loss, 0.0).double(), finite.double()])

    def mean(self) -> float:
        from pipeline.distributed import all_reduce_

        total, n = all_reduce_(self._sums.clone()).tolist()
        self._sums.zero_()
        return total / n if n else float("nan")
