"""One place that builds submitit executors and waits for their jobs — without ``sacct``.

``make_executor(folder, cluster, **params)`` wraps :class:`submitit.AutoExecutor` for ``"slurm"``, ``"local"``
(subprocesses on this machine) and ``"debug"`` (in-process) with one set of parameter names.

``wait_for(jobs)`` returns the jobs' results or raises :class:`JobFailedError` carrying the job's error text.
submitit itself asks ``sacct`` for job states; clusters without an accounting daemon have none, and a job
cancelled there would leave ``job.result()`` waiting forever. Here the state comes from ``scontrol show job``
(the controller keeps finished jobs for ``MinJobAge`` seconds) and a job that is no longer running and left
no result pickle is reported as failed/cancelled after a short grace period for slow shared file systems.
A job whose tasks are being killed (COMPLETING) without a requeue counts as ended: slurm may wait
``KillWait`` seconds on processes that ignore SIGTERM (submitit's tasks do), the caller need not.

Data-prep job arrays (``executor.map_array``) and the training launcher use the same code.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import submitit

from pipeline.config import ConfigError, check_choice, check_positive
from pipeline.submitit_compat import UncompletedJobError, load_result

Cluster = Literal["slurm", "local", "debug"]
CLUSTERS = ("slurm", "local", "debug")

# squeue states after which a job will produce nothing more (its result pickle exists or never will).
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
    "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "GONE",
})
# Seconds a terminal job may take for its result pickle to show up (NFS attribute caches, task teardown).
RESULT_GRACE_S = 10.0
# A cancelled job writes no result: report it after this shorter grace.
CANCELLED_GRACE_S = 2.0


class JobFailedError(RuntimeError):
    """A job ended without a result: it raised, was cancelled, timed out or its node failed."""

    def __init__(self, job_id: str, state: str, text: str):
        self.job_id, self.state, self.text = job_id, state, text
        super().__init__(f"job {job_id} ended in state {state}:\n{text}")


# ----------------------------------------------------------------------------------------------- executor
def make_executor(
    folder: str | Path,
    cluster: Cluster = "slurm",
    *,
    nodes: int = 1,
    tasks_per_node: int = 1,
    gpus_per_node: int | None = None,
    cpus_per_task: int | None = None,
    mem_gb: float | None = None,
    partition: str | None = None,
    account: str | None = None,
    qos: str | None = None,
    constraint: str | None = None,
    timeout_min: int = 60,
    signal_delay_s: int = 90,
    array_parallelism: int = 256,
    job_name: str = "cpvt",
    max_num_timeout: int = 3,
    additional_parameters: Mapping[str, Any] | None = None,
    srun_args: Sequence[str] | None = None,
    setup: Sequence[str] | None = None,
    stderr_to_stdout: bool = False,
) -> submitit.AutoExecutor:
    """A configured :class:`submitit.AutoExecutor`.

    ``cluster="local"`` has a single node: ``nodes * tasks_per_node`` tasks run on this machine.
    ``additional_parameters`` are extra ``#SBATCH --key=value`` lines (e.g. ``{"requeue": True}``).
    """
    _check_executor_args(cluster, nodes, tasks_per_node, timeout_min, array_parallelism)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=max_num_timeout)
    if cluster == "local":
        tasks_per_node, nodes = nodes * tasks_per_node, 1
    generic = _generic_parameters(job_name, timeout_min, nodes, tasks_per_node, stderr_to_stdout,
                                  gpus_per_node, cpus_per_task, mem_gb)
    specific: dict[str, Any] = {}
    if cluster == "slurm":
        specific = _slurm_parameters(partition=partition, account=account, qos=qos, constraint=constraint,
                                     signal_delay_s=signal_delay_s, array_parallelism=array_parallelism,
                                     additional_parameters=additional_parameters, srun_args=srun_args, setup=setup)
    elif cluster == "local":
        if setup:
            specific["local_setup"] = list(setup)
    executor.update_parameters(**generic, **{k: v for k, v in specific.items() if v is not None})
    return executor


def _check_executor_args(cluster: str, nodes: int, tasks_per_node: int, timeout_min: int,
                         array_parallelism: int) -> None:
    """One-line ConfigError for a bad cluster name or count, or for 'slurm' without the SLURM commands."""
    check_choice("cluster", cluster, CLUSTERS)
    check_positive("nodes", nodes)
    check_positive("tasks_per_node", tasks_per_node)
    check_positive("timeout_min", timeout_min)
    check_positive("array_parallelism", array_parallelism)
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("cluster: 'slurm' needs the SLURM client commands (sbatch, squeue) on PATH")


def _generic_parameters(job_name: str, timeout_min: int, nodes: int, tasks_per_node: int, stderr_to_stdout: bool,
                        gpus_per_node: int | None, cpus_per_task: int | None, mem_gb: float | None
                        ) -> dict[str, Any]:
    """submitit's cluster-independent parameters; a resource left at None is left out (the cluster's default)."""
    generic: dict[str, Any] = dict(name=job_name, timeout_min=int(timeout_min), nodes=nodes,
                                   tasks_per_node=tasks_per_node, stderr_to_stdout=stderr_to_stdout)
    if gpus_per_node is not None:
        generic["gpus_per_node"] = int(gpus_per_node)
    if cpus_per_task is not None:
        generic["cpus_per_task"] = int(cpus_per_task)
    if mem_gb is not None:
        generic["mem_gb"] = mem_gb
    return generic


def _slurm_parameters(*, partition: str | None, account: str | None, qos: str | None, constraint: str | None,
                      signal_delay_s: int, array_parallelism: int, additional_parameters: Mapping[str, Any] | None,
                      srun_args: Sequence[str] | None, setup: Sequence[str] | None) -> dict[str, Any]:
    """submitit's ``slurm_*`` parameters (a None value is dropped by the caller: SLURM's default)."""
    specific: dict[str, Any] = dict(slurm_partition=partition, slurm_account=account, slurm_qos=qos,
                                    slurm_constraint=constraint, slurm_signal_delay_s=int(signal_delay_s),
                                    slurm_array_parallelism=int(array_parallelism))
    if additional_parameters:
        specific["slurm_additional_parameters"] = dict(additional_parameters)
    if srun_args:
        specific["slurm_srun_args"] = list(srun_args)
    if setup:
        specific["slurm_setup"] = list(setup)
    return specific


# ----------------------------------------------------------------------------------------------- job state
def _slurm_env() -> dict[str, str]:
    return dict(os.environ)


def _main_id(job_id: str) -> str:
    return job_id.split("_", 1)[0]


@dataclass(frozen=True)
class JobInfo:
    """What the controller knows about one job (or one array element)."""

    state: str  # PENDING, RUNNING, COMPLETING, COMPLETED, FAILED, CANCELLED, ... or GONE
    restarts: int = 0  # how many times it was requeued
    exit_code: str = "0:0"  # "status:signal"
    reason: str = ""


def _field(line: str, key: str) -> str | None:
    match = re.search(rf"(?:^|\s){key}=(\S*)", line)
    return match.group(1) if match else None


def job_infos(job_ids: Iterable[str]) -> dict[str, JobInfo]:
    """``{job_id: JobInfo}`` from ``scontrol show job`` (array elements as ``123_4``).

    scontrol (unlike sacct) needs no accounting daemon; it keeps finished jobs for ``MinJobAge`` seconds.
    Ids it no longer knows map to state ``"GONE"``. Raises ``RuntimeError`` if the controller is unreachable.
    """
    job_ids = list(dict.fromkeys(job_ids))
    seen: dict[str, JobInfo] = {}
    for main in sorted({_main_id(j) for j in job_ids}, key=int):
        proc = subprocess.run(["scontrol", "--oneliner", "show", "job", main], capture_output=True, text=True,
                              timeout=60, env=_slurm_env())
        if proc.returncode != 0:
            if "Invalid job id" in proc.stderr:
                continue
            raise RuntimeError(f"scontrol show job {main} failed ({proc.returncode}): {proc.stderr.strip()}")
        for line in proc.stdout.splitlines():
            if "JobState=" not in line:
                continue
            info = JobInfo(state=_field(line, "JobState") or "UNKNOWN",
                           restarts=int(_field(line, "Restarts") or 0),
                           exit_code=_field(line, "ExitCode") or "0:0", reason=_field(line, "Reason") or "")
            array_job, array_task = _field(line, "ArrayJobId"), _field(line, "ArrayTaskId")
            if not array_job:
                seen[_field(line, "JobId") or main] = info
                continue
            # one line per started element; a pending remainder shows as a range "3-5%2"
            for part in (array_task or "").split("%")[0].split(","):
                lo, _, hi = part.partition("-")
                if lo.isdigit():
                    for i in range(int(lo), int(hi or lo) + 1):
                        seen[f"{array_job}_{i}"] = info
    return {j: seen.get(j, JobInfo("GONE")) for j in job_ids}


def _tasks(job: submitit.Job) -> list[submitit.Job]:
    return [job.task(k) for k in range(job.num_tasks)]   # a single-task job is its own task 0


def _results_ready(job: submitit.Job) -> bool:
    return all(t.paths.result_pickle.exists() for t in _tasks(job))


def _task_failed(job: submitit.Job) -> bool:
    for t in _tasks(job):
        if t.paths.result_pickle.exists():
            try:
                if load_result(t.paths.result_pickle)[0] == "error":
                    return True
            except Exception:  # noqa: BLE001 - being written; looked at again next round
                pass
    return False


def _tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def _error_text(job: submitit.Job, state: str) -> str:
    """Error trace from a task's result pickle, else the tail of its stderr/stdout logs."""
    parts = []
    for t in _tasks(job):
        rp = t.paths.result_pickle
        if rp.exists():
            try:
                outcome, value = load_result(rp)
            except Exception as e:  # noqa: BLE001 - a torn pickle is reported, not raised
                parts.append(f"[task {t.task_id}] unreadable result pickle {rp}: {e}")
                continue
            if outcome == "error":   # the traceback stays in the task's log; its last line says what failed
                last = str(value).strip().splitlines()[-1] if str(value).strip() else "an error"
                parts.append(f"[task {t.task_id}] raised {last} (traceback: {t.paths.stderr})")
            continue
        log = _tail(t.paths.stderr) or _tail(t.paths.stdout)
        parts.append(f"[task {t.task_id}] no result ({state}); log {t.paths.stderr}:\n{log}".rstrip())
    return "\n".join(parts) or f"no output (state {state}); logs under {job.paths.folder}"


def _collect(job: submitit.Job) -> Any:
    """Results of a finished SLURM job from its pickles (one value, or a list for multi-task jobs)."""
    values = []
    for t in _tasks(job):
        outcome, value = load_result(t.paths.result_pickle)
        if outcome != "success":
            raise JobFailedError(job.job_id, "FAILED", _error_text(job, "FAILED"))
        values.append(value)
    return values if job.num_tasks > 1 else values[0]


def _wait_other(job: submitit.Job, deadline: float | None, poll: float) -> Any:
    """local/debug jobs: submitit knows their state without a scheduler."""
    if not isinstance(job, submitit.DebugJob):
        while not job.done():
            if deadline is not None and time.time() > deadline:
                raise TimeoutError(f"job {job.job_id} still running after timeout")
            time.sleep(poll)
    try:
        return job.results() if job.num_tasks > 1 else job.result()
    except UncompletedJobError as e:  # FailedJobError included
        raise JobFailedError(job.job_id, str(job.state), str(e)) from None


def wait_for(jobs: submitit.Job | Sequence[submitit.Job], timeout: float | None = None, poll: float = 2.0,
             cancel_on_error: bool = False) -> Any:
    """Block until every job ends; return its result (a list for a list of jobs, per task for multi-task jobs).

    Raises :class:`JobFailedError` (with the job's traceback or log tail) as soon as one job fails, is
    cancelled, times out or disappears from the queue without a result, and ``TimeoutError`` after
    ``timeout`` seconds. Requeued / pending jobs are waited for. ``cancel_on_error`` cancels the other jobs.
    """
    single = isinstance(jobs, submitit.Job)
    job_list: list[submitit.Job] = [jobs] if single else list(jobs)  # type: ignore[list-item]
    deadline = None if timeout is None else time.time() + timeout
    results: dict[int, Any] = {}
    try:
        others = [i for i, j in enumerate(job_list) if not isinstance(j, submitit.SlurmJob)]
        for i in others:
            results[i] = _wait_other(job_list[i], deadline, poll)
        _wait_slurm(job_list, results, deadline, timeout, poll)
    except BaseException:
        if cancel_on_error:
            for i, job in enumerate(job_list):
                if i not in results:
                    job.cancel(check=False)
        raise
    ordered = [results[i] for i in range(len(job_list))]
    return ordered[0] if single else ordered


def _wait_slurm(job_list: list[submitit.Job], results: dict[int, Any], deadline: float | None,
                timeout: float | None, poll: float) -> None:
    """Poll the jobs of ``job_list`` without an entry in ``results`` (the SLURM ones) until each has its result
    there (filled in as they finish); raises as :func:`wait_for` does."""
    pending = [i for i in range(len(job_list)) if i not in results]
    ended_at: dict[int, float] = {}
    restarts: dict[int, int] = {}  # Restarts seen while the job was not completing
    while pending:
        _collect_ready(job_list, pending, results)
        if not pending:
            break
        try:
            infos = job_infos(job_list[i].job_id for i in pending)
        except (RuntimeError, subprocess.SubprocessError, OSError):
            infos = {}  # controller busy or restarting: ask again next round
        now = time.time()
        for i in list(pending):
            job = job_list[i]
            _raise_if_ended(job, infos.get(job.job_id, JobInfo("UNKNOWN")), i, restarts, ended_at, now)
        if deadline is not None and time.time() > deadline:
            ids = ", ".join(job_list[i].job_id for i in pending)
            raise TimeoutError(f"jobs {ids} still running after {timeout} s")
        time.sleep(poll)


def _collect_ready(job_list: list[submitit.Job], pending: list[int], results: dict[int, Any]) -> None:
    """Move every pending job whose tasks all left a result pickle into ``results``; JobFailedError as soon as
    one task of a pending job raised."""
    for i in list(pending):
        job = job_list[i]
        if _results_ready(job):
            results[i] = _collect(job)
            pending.remove(i)
        elif _task_failed(job):  # one rank raised: the job is lost even if others still run
            raise JobFailedError(job.job_id, "FAILED", _error_text(job, "FAILED"))


def _raise_if_ended(job: submitit.Job, info: JobInfo, key: int, restarts: dict[int, int],
                    ended_at: dict[int, float], now: float) -> None:
    """JobFailedError once ``job`` has ended (a terminal state, or COMPLETING without a requeue) and no result
    pickle showed up within the grace period; ``restarts``/``ended_at`` (by ``key``) carry earlier rounds."""
    state = info.state
    killed = info.exit_code.rpartition(":")[2] not in ("", "0")  # ended by a signal
    if state != "COMPLETING":
        restarts[key] = info.restarts
    elif restarts.get(key) == info.restarts or (key not in restarts and killed):
        # its tasks are being killed and it is not being requeued (a requeue bumps Restarts first):
        # cancelled or failed, slurm just waits KillWait for processes that ignore SIGTERM
        state = f"COMPLETING (exit {info.exit_code}, reason {info.reason})"
    if state not in TERMINAL_STATES and not state.startswith("COMPLETING ("):
        ended_at.pop(key, None)
        return
    grace = CANCELLED_GRACE_S if state == "CANCELLED" or killed else RESULT_GRACE_S
    if now - ended_at.setdefault(key, now) >= grace and not _results_ready(job):
        raise JobFailedError(job.job_id, state, _error_text(job, state))
