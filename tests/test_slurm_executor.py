"""launchers.executor against a real local SLURM cluster (2 slurmd nodes, no accounting daemon / no sacct)."""
from __future__ import annotations

import socket
import time

import pytest

from launchers.executor import JobFailedError, job_infos, make_executor, wait_for
from pipeline.distributed import port_for_job
from tests.slurm import jobs
from tests.slurm.fixtures import slurm_cluster, submitit_folder  # noqa: F401 - fixtures

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _wait_state(job_id: str, wanted: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if job_infos([job_id])[job_id].state == wanted:
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} never reached {wanted}: {job_infos([job_id])}")


def test_cluster_has_two_idle_nodes(slurm_cluster):
    slurm_cluster.wait_idle(120)  # jobs of earlier tests may still be completing
    out = slurm_cluster.run("sinfo", "--noheader", "-N", "-o", "%N %t %c").stdout.split("\n")
    nodes = sorted(line.split() for line in out if line.strip())
    assert nodes == [["n1", "idle", "2"], ["n2", "idle", "2"]]
    for node in ("n1", "n2"):
        assert "NodeAddr=127.0.0.1" in slurm_cluster.run("scontrol", "show", "node", node).stdout
    # no accounting daemon: this is why executor.wait_for must not depend on sacct
    assert slurm_cluster.run("sacct", "-n", check=False).returncode != 0


def test_wait_for_returns_results_of_jobs_and_arrays(slurm_cluster, submitit_folder):
    ex = make_executor(submitit_folder, "slurm", timeout_min=5, partition=slurm_cluster.partition)
    assert wait_for(ex.submit(jobs.double, 21), timeout=120) == 42
    array = ex.map_array(jobs.double, [1, 2, 3])
    assert wait_for(array, timeout=120) == [2, 4, 6]


def test_wait_for_surfaces_the_error_text(slurm_cluster, submitit_folder):
    ex = make_executor(submitit_folder, "slurm", timeout_min=5)
    job = ex.submit(jobs.fail_with, "disk quota exceeded on /scratch")
    with pytest.raises(JobFailedError) as err:
        wait_for(job, timeout=120)
    assert err.value.job_id == job.job_id
    assert "ValueError: disk quota exceeded on /scratch" in str(err.value)


def test_cancelled_running_job_raises_promptly(slurm_cluster, submitit_folder):
    ex = make_executor(submitit_folder, "slurm", timeout_min=5)
    job = ex.submit(jobs.sleep_for, 600)
    _wait_state(job.job_id, "RUNNING")
    slurm_cluster.run("scancel", job.job_id)
    with pytest.raises(JobFailedError) as err:  # TimeoutError here would mean wait_for hung on the cancel
        wait_for(job, timeout=120, poll=0.5)
    assert "exit 0:15" in err.value.state or err.value.state == "CANCELLED"


def test_cancelled_pending_job_raises(slurm_cluster, submitit_folder):
    ex = make_executor(submitit_folder, "slurm", timeout_min=5, additional_parameters={"begin": "now+3600"})
    job = ex.submit(jobs.double, 1)
    _wait_state(job.job_id, "PENDING")
    slurm_cluster.run("scancel", job.job_id)
    with pytest.raises(JobFailedError) as err:
        wait_for(job, timeout=60, poll=0.5)
    assert err.value.state == "CANCELLED"


def test_two_node_job_gets_rendezvous_env(slurm_cluster, submitit_folder):
    ex = make_executor(submitit_folder, "slurm", nodes=2, tasks_per_node=1, timeout_min=5)
    envs = wait_for(ex.submit(jobs.rendezvous_env), timeout=120)
    assert [e["RANK"] for e in envs] == ["0", "1"]
    assert {e["node"] for e in envs} == {"n1", "n2"}
    assert {e["WORLD_SIZE"] for e in envs} == {"2"} and {e["LOCAL_RANK"] for e in envs} == {"0"}
    # the first node's NodeAddr (its name "n1" does not resolve), one port for the whole job
    assert {e["MASTER_ADDR"] for e in envs} == {"127.0.0.1"}
    assert len({e["MASTER_PORT"] for e in envs}) == 1
    # and the variables really rendezvous: a gloo all-reduce across both nodes
    assert wait_for(ex.submit(jobs.all_reduce_ranks), timeout=180) == [3.0, 3.0]


def test_a_taken_derived_port_does_not_stop_the_rendezvous(slurm_cluster, submitit_folder):
    """The port derived from the job id is held by another process on the first node (a second local cluster
    with the same job ids, another job, any service): rank 0 picks a free port instead and the other node learns
    it through the job's folder; the 2-node job still rendezvous."""
    ex = make_executor(submitit_folder, "slurm", nodes=2, tasks_per_node=1, timeout_min=5)
    first = ex.submit(jobs.double, 1)
    assert wait_for(first, timeout=120) == [2, 2]
    held = {}
    for job_id in range(int(first.job_id) + 1, int(first.job_id) + 21):   # the next jobs' derived ports
        port = port_for_job(str(job_id), 0)
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
            held[str(job_id)] = (port, s)
        except OSError:
            s.close()
    try:
        job = ex.submit(jobs.all_reduce_ranks_and_port)
        results = wait_for(job, timeout=180)
    finally:
        for _, s in held.values():
            s.close()
    assert job.job_id in held, (job.job_id, sorted(held))
    assert [value for value, _ in results] == [3.0, 3.0]
    ports = {port for _, port in results}
    assert len(ports) == 1 and ports != {str(held[job.job_id][0])}, (ports, held[job.job_id][0])
