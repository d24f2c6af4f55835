"""Small functions submitted as jobs by the SLURM/launcher tests (pickled by value: jobs need not import tests/)."""
from __future__ import annotations

import os
import time


def double(x: int) -> int:
    return 2 * x


def fail_with(message: str) -> None:
    raise ValueError(message)


def sleep_for(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


def rendezvous_env() -> dict[str, str]:
    """What a training task would export, plus the node it ran on."""
    from launchers.dist_env import setup_torch_dist_env

    env = setup_torch_dist_env()
    return {**env, "node": os.environ.get("SLURMD_NODENAME", "")}


def all_reduce_ranks_and_port() -> tuple[float, str]:
    """:func:`all_reduce_ranks` and the ``MASTER_PORT`` the tasks rendezvoused on."""
    return all_reduce_ranks(), os.environ["MASTER_PORT"]


def all_reduce_ranks() -> float:
    """A real 2-process gloo all-reduce over the rendezvous variables the launcher exports."""
    import datetime

    import torch
    import torch.distributed as dist

    from launchers.dist_env import setup_torch_dist_env

    env = setup_torch_dist_env()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        t = torch.tensor([float(env["RANK"]) + 1.0])
        dist.all_reduce(t)
        return float(t.item())
    finally:
        dist.destroy_process_group()
