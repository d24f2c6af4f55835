"""pytest fixtures for tests that need a real SLURM cluster (import them into a test module).

    from tests.slurm.fixtures import slurm_cluster  # noqa: F401

``slurm_cluster`` (session scope) starts :class:`tests.slurm.cluster.LocalSlurmCluster` once, exports
``SLURM_CONF`` for the test process (submitit's sbatch/scontrol/scancel calls and the jobs it submits inherit
it), and stops every daemon at the end of the session -- also when tests fail. Where slurm/munge cannot be
installed or started for lack of root or apt, the tests skip with the reason.
"""
from __future__ import annotations

import cloudpickle
import pytest

from tests.slurm import jobs
from tests.slurm.cluster import ClusterUnavailable, LocalSlurmCluster

# job functions travel inside the submitit pickle, so tasks need not import the tests package
cloudpickle.register_pickle_by_value(jobs)


_SHARED: dict = {"cluster": None, "users": 0}


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    # Every test module that imports this fixture gets its own session-scoped instance; they share one
    # cluster (reference counted) instead of starting one per module.
    if _SHARED["cluster"] is None:
        try:
            cluster = LocalSlurmCluster(tmp_path_factory.mktemp("slurm_cluster"))
            cluster.start()
        except ClusterUnavailable as e:
            pytest.skip(f"no local SLURM cluster: {e}")
        mp = pytest.MonkeyPatch()
        for key, value in cluster.env.items():
            mp.setenv(key, value)
        _SHARED.update(cluster=cluster, monkeypatch=mp)
    _SHARED["users"] += 1
    try:
        yield _SHARED["cluster"]
    finally:
        _SHARED["users"] -= 1
        if _SHARED["users"] == 0:
            _SHARED["monkeypatch"].undo()
            _SHARED["cluster"].stop()
            _SHARED["cluster"] = None


@pytest.fixture
def submitit_folder(tmp_path):
    """A fresh submitit folder per test (job ids restart at 1 on every new cluster: never share one)."""
    folder = tmp_path / "submitit"
    folder.mkdir()
    return folder
