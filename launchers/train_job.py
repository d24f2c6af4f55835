"""The function every task of a submitted training job runs: rendezvous env, ``pipeline.train.main``, requeue.

:class:`TrainJob` is a :class:`submitit.helpers.Checkpointable`: its :meth:`TrainJob.checkpoint` returns a
``DelayedSubmission`` of itself that resumes (``--resume auto``), so a requeued job continues from the newest
complete checkpoint and keeps the same MLflow run (the trainer stores the run id in the checkpoint; before the
first checkpoint, the run the launcher created at submission is passed as ``MLFLOW_RUN_ID``).

Signals (SLURM sends them to every task of the job):

* ``USR2`` (``#SBATCH --signal=USR2@<signal_delay_s>``, before the time limit, or a preemption notice) and
  ``USR1``: the trainer saves a checkpoint at the next step boundary (all ranks agree) and returns
  ``exit_code == EXIT_PREEMPTED``; rank 0 then rewrites the job's submission with :meth:`checkpoint` and
  requeues it with ``scontrol requeue`` -- at most ``max_requeues`` times per run (the count lives in
  ``<run_dir>/launcher_state.json``), after that the job fails with a message saying how to resume.
* ``TERM`` (``scancel``, ``scontrol requeue`` by an admin, preemption with ``PreemptMode=REQUEUE``): the same
  checkpoint, but the job does not requeue itself -- SLURM already decided (it restarts the job if it was
  requeued; the restart counts towards ``max_requeues`` too).

A task that stops for a requeue exits with ``SystemExit`` so submitit writes no result: the submitter keeps
waiting for the requeued run (see :func:`launchers.executor.wait_for`).

A run stopped on N nodes can also be resubmitted on fewer (or more) with the same ``--run-dir`` and the same
global batch (``data.batch_size`` x ``optim.grad_accum`` x world): the trainer continues the checkpoint on the new
world size (:mod:`pipeline.resume`) and the launcher continues the earlier submission's MLflow run
(:func:`launchers.slurm_submit.previous_mlflow_run`).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from launchers.dist_env import setup_torch_dist_env
from pipeline.atomic import write_atomic
from pipeline.preemption import request_stop, stop_signal
from pipeline.submitit_compat import replace_submission

STATE_FILE = "launcher_state.json"
REQUEUE_SIGNALS = ("SIGUSR1", "SIGUSR2")


class RequeueLimitError(RuntimeError):
    pass


def read_state(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return {"requeues": 0, "events": []}
    return json.loads(path.read_text())


def write_state(run_dir: str | Path, state: dict[str, Any]) -> None:
    write_atomic(Path(run_dir) / STATE_FILE, json.dumps(state, indent=1))


def _record(run_dir: str | Path, event: str, **info: Any) -> dict[str, Any]:
    state = read_state(run_dir)
    state["events"].append({"event": event, "time": time.time(), **info})
    write_state(run_dir, state)
    return state


def with_resume_auto(argv: list[str]) -> list[str]:
    """``argv`` with any ``--resume X`` / ``checkpoint.resume=X`` replaced by ``--resume auto``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = True
            continue
        if a.startswith("--resume=") or a.startswith("checkpoint.resume="):
            continue
        out.append(a)
    return out + ["--resume", "auto"]


class TrainJob(submitit.helpers.Checkpointable):
    """``TrainJob(argv, run_dir, max_requeues)()`` runs ``pipeline.train.main(argv)`` in one task of a job.

    ``mlflow_run_id`` / ``tracking_uri``: the MLflow run the launcher created at submission and its store; the
    task exports them as ``MLFLOW_RUN_ID`` / ``MLFLOW_TRACKING_URI`` so the trainer continues that run (a
    checkpoint's run id, the same one, takes precedence on resume) instead of creating its own.
    """

    def __init__(self, argv: list[str], run_dir: str, max_requeues: int = 3, mlflow_run_id: str | None = None,
                 tracking_uri: str | None = None):
        self.argv = list(argv)
        self.run_dir = str(run_dir)
        self.max_requeues = int(max_requeues)
        self.mlflow_run_id = mlflow_run_id
        self.tracking_uri = tracking_uri

    # submitit calls this (through our own handler below) to get what the requeued job should run
    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(TrainJob(with_resume_auto(self.argv), self.run_dir,
                                                           self.max_requeues, self.mlflow_run_id,
                                                           self.tracking_uri))

    def __call__(self) -> dict[str, Any]:
        from pipeline import train

        dist = setup_torch_dist_env()
        if self.mlflow_run_id:
            os.environ["MLFLOW_RUN_ID"] = self.mlflow_run_id
        if self.tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri
        rank = int(dist["RANK"])
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if rank == 0:
            state = _record(self.run_dir, "start", job_id=_job_id(), restarts=restarts, world=dist["WORLD_SIZE"],
                            master=f"{dist['MASTER_ADDR']}:{dist['MASTER_PORT']}")
            if restarts > state["requeues"]:  # requeued by SLURM itself (admin/preemption): count it
                state["requeues"] = restarts
                write_state(self.run_dir, state)
            if state["requeues"] > self.max_requeues:
                raise RequeueLimitError(f"run {self.run_dir} was requeued {state['requeues']} times "
                                        f"(max_requeues={self.max_requeues}); resume it with a new submission")
        # submitit routed USR2 to its own checkpoint-and-requeue handler on rank 0 only; instead every rank
        # asks the trainer to checkpoint at the next step (a collective), then rank 0 requeues
        for name in (*REQUEUE_SIGNALS, "SIGTERM"):  # the trainer re-installs TERM/USR1 itself later
            signal.signal(getattr(signal, name), request_stop)
        summary = train.main(with_resume_auto(self.argv))  # if it raises, the trainer ended its MLflow run FAILED
        if summary.get("exit_code") != train.EXIT_PREEMPTED:
            return summary
        self.after_preemption(rank, summary)
        raise AssertionError("unreachable")  # after_preemption always exits or raises

    def after_preemption(self, rank: int, summary: dict[str, Any]) -> None:
        """Record the stop; rank 0 requeues the job unless the scheduler sent it (SIGTERM); then exit."""
        signum = stop_signal()
        by_scheduler = signum == signal.SIGTERM  # cancel or an external requeue: SLURM decides what follows
        if rank == 0:
            _record(self.run_dir, "stopped", job_id=_job_id(), signal=_sig_name(signum),
                    global_step=summary.get("global_step"), checkpoint=summary.get("checkpoint"))
        if rank == 0 and not by_scheduler:
            self._requeue()
        sys.stdout.flush()
        # SystemExit: submitit writes no result (the requeued run will). Other ranks exit 0 so that srun's
        # --kill-on-bad-exit does not kill rank 0 while it requeues the job.
        sys.exit(summary["exit_code"] if rank == 0 else 0)

    def _requeue(self) -> None:
        state = read_state(self.run_dir)
        if state["requeues"] >= self.max_requeues:
            raise RequeueLimitError(f"preempted/timed out at {state['events'][-1].get('checkpoint')} after "
                                    f"{state['requeues']} requeues (max_requeues={self.max_requeues}); the "
                                    f"checkpoint is saved: resubmit with --resume auto")
        env = submitit.JobEnvironment()
        if env.cluster != "slurm":
            raise RequeueLimitError(f"stopped by a signal on cluster {env.cluster!r}, which cannot requeue; "
                                    f"checkpoint saved, rerun with --resume auto")
        replace_submission(env.paths.submitted_pickle, self.checkpoint())
        state["requeues"] += 1
        write_state(self.run_dir, state)
        _record(self.run_dir, "requeue", job_id=env.job_id, requeues=state["requeues"])
        subprocess.run(["scontrol", "requeue", env.job_id], check=True, timeout=60)


def _sig_name(signum: int | None) -> str | None:
    return None if signum is None else signal.Signals(signum).name


def _job_id() -> str | None:
    try:
        return submitit.JobEnvironment().job_id
    except Exception:  # noqa: BLE001 - not inside a submitit job (direct call)
        return os.environ.get("SLURM_JOB_ID")
