"""Run independent tasks: in this process's pool (all cores, progress bar) or as a submitit job array.

``run_tasks(fn, tasks, cluster=...)`` returns ``[fn(t) for t in tasks]`` in task order whatever the backend:

* ``cluster="pool"`` (default): a ``ProcessPoolExecutor`` with ``workers`` processes (all cores by default;
  ``workers=1`` runs inline) and a tqdm progress bar;
* ``cluster="local" | "debug" | "slurm"``: ``launchers.executor.make_executor(folder, cluster, **params)``,
  one array job per group of tasks (``array_size`` groups, contiguous, so job ``j`` always gets the same tasks;
  default: one per core for local/debug, one per task up to ``MAX_ARRAY`` for slurm), then
  ``launchers.executor.wait_for(jobs)``. ``params`` are make_executor's (``partition``, ``timeout_min``,
  ``cpus_per_task``, ``mem_gb``, ``array_parallelism``, ...).

``fn`` must be a module-level function (it is pickled) and ``fn(task)`` must be idempotent: a rerun of an
interrupted array simply runs every task again and each one skips work it already finished.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from launchers.executor import make_executor, wait_for  # the SLURM helper's submitit wrapper

CLUSTERS = ("pool", "local", "debug", "slurm")
MAX_ARRAY = 256   # default cap on array jobs for cluster="slurm" (override with array_size)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def split_groups(items: Sequence[Any], n: int) -> list[list[Any]]:
    """``items`` into ``min(n, len(items))`` contiguous groups of near-equal size (deterministic)."""
    n = max(1, min(n, len(items)))
    q, r = divmod(len(items), n)
    out, start = [], 0
    for j in range(n):
        stop = start + q + (1 if j < r else 0)
        out.append(list(items[start:stop]))
        start = stop
    return out


def run_group(fn: Callable[[Any], Any], group: list[Any]) -> list[Any]:
    """Body of one array job: the tasks of its group, in order."""
    return [fn(t) for t in group]


def run_tasks(fn: Callable[[Any], Any], tasks: Sequence[Any], *, cluster: str = "pool",
              workers: int | None = None, folder: str | Path | None = None, array_size: int | None = None,
              desc: str = "tasks", progress: bool = True, **executor_params: Any) -> list[Any]:
    """Run ``fn`` on every task and return the results in task order (see module docstring)."""
    if cluster not in CLUSTERS:
        raise ValueError(f"cluster: {cluster!r} is not one of {list(CLUSTERS)}")
    tasks = list(tasks)
    if not tasks:
        return []
    if cluster == "pool":
        workers = workers or default_workers()
        if workers == 1 or len(tasks) == 1:
            return [fn(t) for t in tqdm(tasks, desc=desc, disable=not progress, unit="task")]
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as ex:
            it = ex.map(fn, tasks, chunksize=1)
            return list(tqdm(it, total=len(tasks), desc=desc, disable=not progress, unit="task"))

    if folder is None:
        raise ValueError(f"folder: a log folder is required for cluster={cluster!r}")
    if array_size is None:   # local/debug: one job per core; slurm: one job per task, at most MAX_ARRAY
        array_size = (workers or default_workers()) if cluster != "slurm" else min(len(tasks), MAX_ARRAY)
    groups = split_groups(tasks, array_size)
    executor_params.setdefault("job_name", f"data_prep_{desc.replace(' ', '_')}")
    executor = make_executor(str(folder), cluster, **executor_params)
    jobs = executor.map_array(run_group, [fn] * len(groups), groups)
    results: list[Any] = []
    for group_result in wait_for(jobs, cancel_on_error=True):
        results.extend(group_result)
    return results
