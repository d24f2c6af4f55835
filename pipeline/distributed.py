"""Process-group set-up from the launcher's environment: torchrun / deepspeed launcher, SLURM, or a single process.

``deepspeed`` must not be imported before :func:`prepare_accelerator_env` has run: on machines without CUDA it
selects DeepSpeed's CPU accelerator (gloo backend) through ``DS_ACCELERATOR``.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def prepare_accelerator_env() -> str:
    """Pick DeepSpeed's accelerator before it is imported; returns ``"cuda"`` or ``"cpu"``."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return "cpu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or ""
    if not nodelist:
        return "127.0.0.1"
    try:  # scontrol expands "node[01-04]" properly when available
        import subprocess

        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        head = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def detect_env() -> DistEnv:
    """Read rank/world from torchrun/deepspeed (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM (SLURM_PROCID, ...)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR") or _slurm_master_addr(), int(env.get("MASTER_PORT", 29500)), "slurm")
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or _free_port(), "single")


def init_distributed(timeout_s: int = 1800) -> DistEnv:
    """Export the standard variables and initialise DeepSpeed's process group (nccl on GPU, gloo on CPU)."""
    dist_env = detect_env()
    os.environ.update(RANK=str(dist_env.rank), WORLD_SIZE=str(dist_env.world_size),
                      LOCAL_RANK=str(dist_env.local_rank), MASTER_ADDR=dist_env.master_addr,
                      MASTER_PORT=str(dist_env.master_port))
    device = prepare_accelerator_env()
    import deepspeed  # after DS_ACCELERATOR is set
    import torch

    if device == "cuda":
        torch.cuda.set_device(dist_env.local_rank % torch.cuda.device_count())
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", auto_mpi_discovery=False,
                               timeout=datetime.timedelta(seconds=timeout_s))
    return dist_env


def device() -> "torch.device":  # noqa: F821 - string annotation keeps torch import lazy
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _all_reduce(values: "list[float]", op: str) -> "list[float]":
    """Reduce a short list of floats over ranks in one float64 collective (identity without a process group)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t.tolist()


def all_reduce_max(values: "list[float]") -> "list[float]":
    """Elementwise max over ranks, one collective (so every rank agrees on skip/stop/save decisions)."""
    return _all_reduce(values, "MAX")


def all_reduce_sum(values: "list[float]") -> "list[float]":
    """Elementwise sum over ranks, one collective."""
    return _all_reduce(values, "SUM")


def destroy() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
