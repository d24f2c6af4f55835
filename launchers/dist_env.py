"""torch.distributed rendezvous variables for a task started by SLURM (srun) or submitit's local executor.

The trainer (:mod:`pipeline.distributed`) only reads the standard variables ``MASTER_ADDR``, ``MASTER_PORT``,
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; this module exports them inside a submitted task:

* ranks come from ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID`` (or submitit's local equivalents),
* ``MASTER_ADDR`` is the *address* of the step's first node — ``NodeAddr`` from ``scontrol show node``,
  because node names need not resolve (several slurmd "nodes" may share one host),
* ``MASTER_PORT`` is the port derived from the job id when it is free on the first node, else a free one:
  rank 0 decides and the other tasks read its choice from the job's submitit folder, which every node shares
  (:func:`pipeline.distributed.agree_port`), so a port another job or service holds never ends a job.

The address/port functions live in :mod:`pipeline.distributed` (``srun python pipeline/train.py`` uses them
too); unlike that path, exported ``MASTER_ADDR`` / ``MASTER_PORT`` are ignored here, since a submitted job
inherits the submitting shell's environment.
"""
from __future__ import annotations

import os
from pathlib import Path

import submitit

# one implementation, shared with ``srun python pipeline/train.py`` (pipeline.distributed.detect_env)
from pipeline.distributed import agree_port, port_for_job, slurm_master_addr, slurm_master_port, step_key
from pipeline.net import free_port


def torch_dist_env(environ: dict[str, str] | None = None, folder: str | Path | None = None) -> dict[str, str]:
    """The rendezvous variables for the current task (does not modify the environment); ``folder``: where the
    tasks agree on the port (a folder all nodes share; None: the derived port, refused in one line if taken)."""
    env = os.environ if environ is None else environ
    if "SLURM_PROCID" in env and "SLURM_JOB_ID" in env and env.get("SUBMITIT_EXECUTOR", "slurm") == "slurm":
        port = agree_port(slurm_master_port(env), rank=int(env["SLURM_PROCID"]), folder=folder, key=step_key(env))
        return dict(
            MASTER_ADDR=slurm_master_addr(env),
            MASTER_PORT=str(port),
            RANK=env["SLURM_PROCID"],
            WORLD_SIZE=env.get("SLURM_NTASKS", "1"),
            LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
        )
    if "SUBMITIT_LOCAL_JOB_ID" in env:  # submitit's local executor: all tasks on this machine
        port = agree_port(port_for_job(env["SUBMITIT_LOCAL_JOB_ID"]), rank=int(env.get("SUBMITIT_LOCAL_GLOBALID", 0)),
                          folder=folder, key=step_key(env))
        return dict(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=env.get("SUBMITIT_LOCAL_GLOBALID", "0"),
            WORLD_SIZE=env.get("SUBMITIT_LOCAL_NTASKS", "1"),
            LOCAL_RANK=env.get("SUBMITIT_LOCAL_LOCALID", "0"),
        )
    # debug executor / plain process: a single rank with a free port
    return dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")


def setup_torch_dist_env() -> dict[str, str]:
    """Export the rendezvous variables for this task (call first thing inside a submitted function); the tasks
    agree on the port through the job's submitit folder."""
    try:
        folder = submitit.JobEnvironment().paths.folder
    except (RuntimeError, KeyError):   # not in a submitit job, or in its debug executor (in-process, one rank)
        folder = None
    values = torch_dist_env(folder=folder)
    os.environ.update(values)
    return values
