"""SIGKILL a real job at a chosen moment, observed from outside: from an armed point on, the job runs only in
short slices between SIGSTOP freezes of all its processes. While everything is stopped its output (read to the
end of the pipe) and its files are a consistent picture, so the test decides there whether the moment has come
(inside a checkpoint save, inside an evaluation, ...) and SIGKILLs the frozen job. A save or an evaluation that
lasts a few milliseconds of the job's own time is hit without any hook in the product; on a loaded machine the
observer may wake too late once in a while and the moment passes between two freezes, which the result reports
(the caller runs the segment again from the same files)."""
from __future__ import annotations

import codecs
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil
import pytest

from tests.helpers_train import ROOT, job_env, kill_job

Check = Callable[[str], "str | None"]   # the output so far -> a description when it holds, else None


@dataclass
class Killed:
    output: str          # everything the job printed up to the kill
    moment: str | None   # what ``hit`` said about the moment of the kill; None: missed
    frozen: int          # how many freezes it took after arming
    missed: str | None = None   # what ``missed`` said: the moment passed between two freezes


def _frozen_all(procs: list[psutil.Process], timeout: float = 30.0) -> None:
    """Wait until every process really stopped (SIGSTOP waits for a syscall such as fsync to return)."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        while True:
            try:
                if proc.status() in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                    break
            except psutil.NoSuchProcess:
                break
            assert time.monotonic() < deadline, f"{proc.pid} did not stop"
            time.sleep(0.0002)


class Job:
    """One job (``cmd``, started in a session of its own) and its output pipe."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None):
        self.p = subprocess.Popen(cmd, cwd=ROOT, env=env or job_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        os.set_blocking(self.p.stdout.fileno(), False)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self._known: list[psutil.Process] = []   # the job's processes at the last freeze

    def drain(self) -> str:
        """Read whatever the pipe holds now; returns all output so far."""
        while True:
            try:
                chunk = os.read(self.p.stdout.fileno(), 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.text += self._decoder.decode(chunk)
        return self.text

    def freeze(self) -> None:
        """SIGSTOP the job's processes and wait until all stopped: the ones seen before at once, then any that
        appeared since (looking them up takes longer than the moments the tests aim at)."""
        for proc in self._known:
            try:
                proc.send_signal(signal.SIGSTOP)
            except psutil.NoSuchProcess:
                pass
        stopped = {proc.pid for proc in self._known}
        while True:
            try:
                procs = [psutil.Process(self.p.pid), *psutil.Process(self.p.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                procs = []
            new = [proc for proc in procs if proc.pid not in stopped]
            for proc in new:
                stopped.add(proc.pid)
                try:
                    proc.send_signal(signal.SIGSTOP)
                except psutil.NoSuchProcess:
                    pass
            if not new:
                break
        self._known = procs
        _frozen_all(self._known)

    def thaw(self) -> None:
        for proc in self._known:
            try:
                proc.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass

    def kill(self) -> None:
        kill_job(self.p)   # SIGKILL reaches stopped processes too
        self.drain()
        self.p.stdout.close()


def kill_when(cmd: list[str], *, arm: Check, hit: Check, missed: Check, offset_s: float, slice_s: float = 0.0005,
              timeout: float = 600.0, env: dict[str, str] | None = None) -> Killed:
    """Run ``cmd`` at full speed until ``arm(output)`` holds; then wait ``offset_s`` (the seeded delay: where the
    grid of freezes falls in the job's time), and from there freeze the job every ``slice_s`` of running time.
    At the first freeze where ``hit`` holds the job is SIGKILLed. Where ``missed`` holds first (the moment
    passed between two freezes: the observer was not scheduled in time) the job is SIGKILLed too and the result
    says so, for the caller to run this segment again from the same files; the job ending or ``timeout`` fail."""
    job, deadline = Job(cmd, env), time.monotonic() + timeout
    try:
        while not arm(job.drain()):
            if job.p.poll() is not None:
                pytest.fail(f"the job ended (rc={job.p.returncode}) before the arming point:\n{job.drain()[-3000:]}")
            assert time.monotonic() < deadline, job.text[-3000:]
            time.sleep(0.002)
        time.sleep(offset_s)
        frozen = 0
        while True:
            job.freeze()
            frozen += 1
            text = job.drain()
            if (moment := hit(text)) is not None:
                job.kill()
                return Killed(job.text, moment, frozen)
            if (why := missed(text)) is not None:
                job.kill()
                return Killed(job.text, None, frozen, missed=why)
            if job.p.poll() is not None:
                pytest.fail(f"the job ended (rc={job.p.returncode}) before the moment:\n{text[-3000:]}")
            assert time.monotonic() < deadline, text[-3000:]
            job.thaw()
            time.sleep(slice_s)
    finally:
        if job.p.returncode is None:
            job.thaw()
            job.kill()


def files_in(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []
