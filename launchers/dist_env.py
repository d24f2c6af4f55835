"""torch.distributed rendezvous variables for a task started by SLURM (srun) or submitit's local executor.

The trainer (:mod:`pipeline.distributed`) only reads the standard variables ``MASTER_ADDR``, ``MASTER_PORT``,
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; everything SLURM-specific lives here:

* ranks come from ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID`` (or submitit's local equivalents),
* ``MASTER_ADDR`` is the *address* of the job's first node — ``NodeAddr`` from ``scontrol show node``,
  because node names need not resolve (several slurmd "nodes" may share one host),
* ``MASTER_PORT`` is derived from the job id, so every task of a job (and of its requeued runs) agrees on it
  without talking to each other, and two jobs on one node rarely collide.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess

PORT_BASE = 20000
PORT_SPAN = 20000


def port_for_job(job_id: str | int) -> int:
    """Deterministic rendezvous port in [PORT_BASE, PORT_BASE + PORT_SPAN) from a (possibly array) job id."""
    digits = [int(x) for x in re.findall(r"\d+", str(job_id))] or [0]
    key = digits[0] * 1009 + (digits[1] if len(digits) > 1 else 0)
    return PORT_BASE + key % PORT_SPAN


def expand_hostlist(nodelist: str) -> list[str]:
    """``"n[1-2],gpu03"`` -> ``["n1", "n2", "gpu03"]`` (scontrol if available, else submitit's parser)."""
    if not nodelist:
        return []
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()
    except (OSError, subprocess.SubprocessError):
        pass
    from submitit.slurm.slurm import _parse_node_list

    return _parse_node_list(nodelist)


def node_address(node: str) -> str:
    """``NodeAddr`` of a SLURM node (falls back to the node name when scontrol cannot tell)."""
    try:
        out = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True, timeout=30)
        match = re.search(r"\bNodeAddr=(\S+)", out.stdout) if out.returncode == 0 else None
        if match:
            return match.group(1)
    except (OSError, subprocess.SubprocessError):
        pass
    return node


def torch_dist_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The rendezvous variables for the current task (does not modify the environment)."""
    env = os.environ if environ is None else environ
    if "SLURM_PROCID" in env and "SLURM_JOB_ID" in env and env.get("SUBMITIT_EXECUTOR", "slurm") == "slurm":
        nodes = expand_hostlist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
        master = node_address(nodes[0]) if nodes else "127.0.0.1"
        job_id = env.get("SLURM_ARRAY_JOB_ID") and f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID')}"
        return dict(
            MASTER_ADDR=master,
            MASTER_PORT=str(port_for_job(job_id or env["SLURM_JOB_ID"])),
            RANK=env["SLURM_PROCID"],
            WORLD_SIZE=env.get("SLURM_NTASKS", "1"),
            LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
        )
    if "SUBMITIT_LOCAL_JOB_ID" in env:  # submitit's local executor: all tasks on this machine
        return dict(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port_for_job(env["SUBMITIT_LOCAL_JOB_ID"])),
            RANK=env.get("SUBMITIT_LOCAL_GLOBALID", "0"),
            WORLD_SIZE=env.get("SUBMITIT_LOCAL_NTASKS", "1"),
            LOCAL_RANK=env.get("SUBMITIT_LOCAL_LOCALID", "0"),
        )
    # debug executor / plain process: a single rank with a free port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")


def setup_torch_dist_env() -> dict[str, str]:
    """Export the rendezvous variables for this task (call first thing inside a submitted function)."""
    values = torch_dist_env()
    os.environ.update(values)
    return values
