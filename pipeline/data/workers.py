"""How many loader workers a rank runs: the CPUs this rank may use (its affinity, shared among the ranks a launcher
started on the node) and ``data.num_workers`` fitted to them."""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Mapping

from pipeline.config import DataConfig


def task_cpus(environ: Mapping[str, str] | None = None) -> int:
    """CPUs this rank may use: its CPU affinity (SLURM's --cpus-per-task, taskset, cgroups), divided among the
    ranks of a launcher that starts them all with the node's whole affinity (torchrun, deepspeed)."""
    env = os.environ if environ is None else environ
    cpus = len(os.sched_getaffinity(0))
    local = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or 1)   # torchrun / deepspeed's launcher
    if local > 1 and cpus >= (os.cpu_count() or cpus):   # every rank sees the whole machine: share it
        cpus //= local
    return max(1, cpus)


def fit_num_workers(data: DataConfig, cpus: int) -> tuple[DataConfig, str | None]:
    """``data`` with ``num_workers`` fitted to ``cpus`` (null: cpus - 1, at least 1; more than cpus: cpus), and
    the line to log when it was lowered. Called before FFCV/numba are imported: numba refuses more threads than
    the machine has, with a message that names no config field."""
    if data.num_workers is None:
        return replace(data, num_workers=max(1, cpus - 1)), None
    if data.num_workers > cpus:
        return replace(data, num_workers=cpus), (f"data.num_workers: {data.num_workers} lowered to {cpus}, the CPUs "
                                                 f"this rank may use (its CPU affinity)")
    return data, None
