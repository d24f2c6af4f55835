"""Process-group set-up from the launcher's environment: torchrun / deepspeed launcher, SLURM, or a single process.

Device, backend and DeepSpeed accelerator come from one rule, :func:`pipeline.device.select_device`;
:func:`init_distributed` applies it (``DS_ACCELERATOR``, ``LOCAL_RANK`` = the CUDA ordinal) before ``deepspeed`` is
imported, so ``deepspeed`` must not be imported earlier.

Under ``srun python pipeline/train.py`` (no torchrun, no submitit) ranks come from ``SLURM_PROCID`` /
``SLURM_NTASKS`` / ``SLURM_LOCALID``, ``MASTER_ADDR`` is the ``NodeAddr`` of the step's first node and
``MASTER_PORT`` is derived from the job id (:func:`slurm_master_addr`, :func:`slurm_master_port`; the submitit
launcher in ``launchers/dist_env.py`` uses the same functions). Exported ``MASTER_ADDR`` / ``MASTER_PORT`` win.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist

from pipeline.device import NODE_LOCAL_RANK, DeviceChoice, apply_device, select_device
from pipeline.atomic import write_atomic
from pipeline.net import free_port


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm" | "single"


# ----------------------------------------------------------------------------------------- SLURM rendezvous
# The one implementation of "where does rank 0 of a SLURM step listen": used by ``srun python pipeline/train.py``
# (``detect_env`` below) and by the submitit launcher (:mod:`launchers.dist_env`).
# [12000, 32000): below Linux's ephemeral range (net.ipv4.ip_local_port_range, 32768-60999 by default), so a port
# picked here is never one the kernel handed out to an outgoing connection on the node
PORT_BASE = 12000
PORT_SPAN = 20000


def port_for_job(job_id: str | int, step: int | None = None) -> int:
    """Deterministic rendezvous port in [PORT_BASE, PORT_BASE + PORT_SPAN) from a (possibly array) job id.

    Every task of a step computes the same port without talking to the others; two jobs (or array elements, or
    two concurrent steps of one job) sharing a node get different ports (modulo rare hash collisions)."""
    digits = [int(x) for x in re.findall(r"\d+", str(job_id))] or [0]
    key = digits[0] * 1009 + (digits[1] if len(digits) > 1 else 0) + 4001 * (step or 0)
    return PORT_BASE + key % PORT_SPAN


def expand_hostlist(nodelist: str) -> list[str]:
    """``"n[1-2],gpu03"`` -> ``["n1", "n2", "gpu03"]`` (``scontrol show hostnames``, else submitit's parser)."""
    if not nodelist:
        return []
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()
    except (OSError, subprocess.SubprocessError):
        pass
    try:  # local: submitit is optional for the trainer
        from pipeline.submitit_compat import parse_node_list
    except ImportError:  # without submitit: the first entry is all we use anyway
        head = nodelist.split(",")[0]
        if "[" in head:
            prefix, rest = head.split("[", 1)
            head = prefix + re.split(r"[-,\]]", rest)[0]
        return [head]
    return parse_node_list(nodelist)


def node_address(node: str) -> str:
    """``NodeAddr`` of a SLURM node (falls back to the node name when scontrol cannot tell).

    Node names need not resolve (several slurmd "nodes" may share a host, or names are only known to SLURM)."""
    try:
        out = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True, timeout=30)
        match = re.search(r"\bNodeAddr=(\S+)", out.stdout) if out.returncode == 0 else None
        if match:
            return match.group(1)
    except (OSError, subprocess.SubprocessError):
        pass
    return node


@functools.lru_cache(maxsize=8)
def _first_node_address(nodelist: str) -> str:
    nodes = expand_hostlist(nodelist)
    return node_address(nodes[0]) if nodes else "127.0.0.1"


def slurm_master_addr(environ: Mapping[str, str] | None = None) -> str:
    """Address of the first node of the current SLURM step (rank 0 runs there with block distribution)."""
    env = os.environ if environ is None else environ
    return _first_node_address(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "")


def slurm_master_port(environ: Mapping[str, str] | None = None) -> int:
    """Rendezvous port of the current SLURM step, from the (array) job id and the step id."""
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID", "0")
    if env.get("SLURM_ARRAY_JOB_ID"):
        job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', 0)}"
    step = env.get("SLURM_STEP_ID", "")
    # the batch/extern/interactive pseudo-steps have huge ids (0xfffffffa..): they count as step 0
    return port_for_job(job_id, int(step) if step.isdigit() and int(step) < 2**31 else 0)


class RendezvousError(RuntimeError):
    """No rendezvous port could be agreed (one line: which port, where, and ``MASTER_PORT`` as the way out)."""


def port_is_free(port: int) -> bool:
    """Whether a listener could bind ``port`` on every interface of this node now (as the TCP store will)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def step_key(environ: Mapping[str, str] | None = None) -> str:
    """What names one run of one SLURM step: (array) job id, step id and requeue count."""
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID") or "0"
    if env.get("SLURM_ARRAY_JOB_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', 0)}"
    return f"{job}.{env.get('SLURM_STEP_ID', '0')}.{env.get('SLURM_RESTART_COUNT', '0')}"


def agree_port(derived: int, *, rank: int, folder: str | os.PathLike | None, key: str,
               timeout_s: float = 300.0) -> int:
    """The rendezvous port every task of a step uses, chosen once by rank 0 on the first node: ``derived`` (the
    job id's port) when it is free there, else a free port. The choice reaches the other tasks through
    ``<folder>/rendezvous/<key>.port`` in a folder every task shares (the job's submitit folder, the run
    folder), written atomically; they wait for it up to ``timeout_s``. Without a folder every task takes
    ``derived`` and rank 0 refuses a taken one in one line."""
    if folder is None:
        if rank == 0 and not port_is_free(derived):
            raise RendezvousError(f"rendezvous port {derived} (derived from the SLURM job id) is taken on "
                                  f"{socket.gethostname()}: export MASTER_PORT=<a free port> for the job")
        return derived
    record = Path(folder) / "rendezvous" / f"{key}.port"
    if rank == 0:
        port = derived if port_is_free(derived) else free_port()
        write_atomic(record, str(port))
        return port
    deadline = time.monotonic() + timeout_s
    while not record.is_file():
        if time.monotonic() > deadline:
            raise RendezvousError(f"rank {rank} waited {timeout_s:.0f} s for rank 0's rendezvous port in {record}: "
                                  f"is rank 0 running, and is {folder} shared by every node? (or export "
                                  f"MASTER_PORT)")
        time.sleep(0.2)
    return int(record.read_text())


def detect_env() -> DistEnv:
    """Read rank/world from torchrun/deepspeed (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM (SLURM_PROCID, ...)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        # the node-local rank, also after apply_device made LOCAL_RANK the CUDA ordinal
        local_rank = int(env.get(NODE_LOCAL_RANK) or env.get("LOCAL_RANK") or 0)
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), local_rank,
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    # srun python pipeline/train.py: only inside a job *step* -- a batch script or salloc shell also has
    # SLURM_PROCID=0 and SLURM_NTASKS=N but runs a single process (it would wait for N - 1 absent ranks)
    step_tasks = 1
    if "SLURM_STEP_ID" in env:
        step_tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if "SLURM_PROCID" in env and step_tasks > 1:
        # MASTER_ADDR / MASTER_PORT win when set (e.g. exported in the batch script)
        return DistEnv(int(env["SLURM_PROCID"]), step_tasks, int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR") or slurm_master_addr(env),
                       int(env.get("MASTER_PORT") or slurm_master_port(env)), "slurm")
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or free_port(), "single")


_CHOICE: DeviceChoice | None = None   # the choice init_distributed (or use_device) applied in this process


def init_distributed(choice: DeviceChoice | None = None, timeout_s: int = 600,
                     rendezvous_dir: str | os.PathLike | None = None) -> DistEnv:
    """Export the rendezvous variables, apply the device ``choice`` (default :func:`select_device`) and initialise
    DeepSpeed's process group on ``choice.backend``; ``timeout_s`` bounds every collective (a dead peer fails the
    job after that long instead of stalling every GPU). Under ``srun python pipeline/train.py`` without an
    exported ``MASTER_PORT``, the tasks agree on a free port through ``rendezvous_dir`` (:func:`agree_port`)."""
    dist_env = detect_env()
    if dist_env.source == "slurm" and not os.environ.get("MASTER_PORT"):
        port = agree_port(dist_env.master_port, rank=dist_env.rank, folder=rendezvous_dir, key=step_key())
        dist_env = dataclasses.replace(dist_env, master_port=port)
    os.environ.update(RANK=str(dist_env.rank), WORLD_SIZE=str(dist_env.world_size),
                      LOCAL_RANK=str(dist_env.local_rank), MASTER_ADDR=dist_env.master_addr,
                      MASTER_PORT=str(dist_env.master_port))
    global _CHOICE
    _CHOICE = choice if choice is not None else select_device()
    apply_device(_CHOICE)
    import deepspeed  # after apply_device exported DS_ACCELERATOR and LOCAL_RANK

    deepspeed.init_distributed(dist_backend=_CHOICE.backend, auto_mpi_discovery=False,
                               timeout=datetime.timedelta(seconds=timeout_s))
    return dist_env


def use_device(choice: DeviceChoice) -> None:
    """Record and apply ``choice`` in a process without a process group (single-process evaluation)."""
    global _CHOICE
    _CHOICE = choice
    apply_device(choice)


def device() -> torch.device:
    """The device this process computes on: the applied choice, else :func:`pipeline.device.select_device`'s."""
    global _CHOICE
    if _CHOICE is None:
        _CHOICE = select_device()
    return _CHOICE.torch_device


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_(t: torch.Tensor, op: str = "SUM") -> torch.Tensor:
    """Reduce ``t`` over ranks in place, on its own device, without reading it (identity without a process
    group); returns ``t``."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t


def all_reduce_sum(values: list[float]) -> list[float]:
    """Elementwise sum of a short list of floats over ranks, in one float64 collective (identity without a
    process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    return all_reduce_(torch.tensor(values, dtype=torch.float64, device=device()), "SUM").tolist()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order (``[obj]`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
