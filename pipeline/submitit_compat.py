"""Every use of submitit's internals, in one place (tested against the installed version by
``tests/test_library_internals.py``: a submitit upgrade that moves any of these fails there, not in a job).

It lives in ``pipeline/`` (the lowest layer that needs submitit): :mod:`pipeline.distributed` expands SLURM
hostlists with it, the launchers (:mod:`launchers.executor`, :mod:`launchers.train_job`) use the rest.

submitit's public API is what ``submitit/__init__.py`` exports (``AutoExecutor``, ``Job``, ``JobEnvironment``,
``helpers``, ...). Used here beyond it:

* ``submitit.slurm.slurm._parse_node_list`` -- SLURM hostlist expansion (:func:`parse_node_list`);
* ``submitit.slurm.slurm._make_sbatch_string`` and ``AutoExecutor._executor`` -- the ``#SBATCH`` header a
  submission would use, without submitting (:func:`sbatch_header`);
* ``submitit.core.utils`` (not exported by the package): ``pickle_load`` (a task's result pickle:
  :func:`load_result`), ``UncompletedJobError`` (:data:`UncompletedJobError`), ``temporary_save_path``;
* ``DelayedSubmission._timeout_min`` / ``._timeout_countdown`` -- carried over when a task rewrites its own
  submission before requeueing itself (:func:`submission_timeout`, :func:`replace_submission`; what submitit's own
  checkpoint handler does).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import submitit
from submitit.core import utils as _utils
from submitit.slurm.slurm import _make_sbatch_string, _parse_node_list

# a job that ended without a result (``FailedJobError`` is a subclass)
UncompletedJobError = _utils.UncompletedJobError

TESTED_VERSIONS = ("1.5",)   # the major.minor versions tests/test_library_internals.py was written against


def parse_node_list(nodelist: str) -> list[str]:
    """``"n[1-2],gpu03"`` -> ``["n1", "n2", "gpu03"]`` (submitit's SLURM hostlist parser)."""
    return list(_parse_node_list(nodelist))


def sbatch_header(executor: submitit.AutoExecutor, command: str = "<submitit task>") -> str:
    """The sbatch script (``#SBATCH`` lines and the ``srun`` line) a SLURM ``executor`` would submit."""
    inner = executor._executor
    return _make_sbatch_string(command=command, folder=inner.folder, **dict(inner.parameters))


def load_result(path: str | Path) -> tuple[str, Any]:
    """A task's result pickle: ``("success", value)`` or ``("error", traceback text)``."""
    outcome, value = _utils.pickle_load(Path(path))
    return outcome, value


def submission_timeout(submission: submitit.helpers.DelayedSubmission) -> tuple[int, int]:
    """(timeout in minutes, timeouts left before it counts as a failure) of a submission."""
    return submission._timeout_min, submission._timeout_countdown


def replace_submission(submitted_pickle: str | Path, new: submitit.helpers.DelayedSubmission) -> None:
    """Atomically replace the running task's submission pickle with ``new`` (what a requeued job runs),
    keeping the current submission's timeout and remaining timeout count."""
    current = submitit.helpers.DelayedSubmission.load(submitted_pickle)
    new.set_timeout(*submission_timeout(current))
    with _utils.temporary_save_path(submitted_pickle) as tmp:
        new.dump(tmp)


__all__ = ["TESTED_VERSIONS", "UncompletedJobError", "load_result", "parse_node_list", "replace_submission",
           "sbatch_header", "submission_timeout"]
