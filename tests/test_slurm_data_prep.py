"""Data-prep shard writing as a SLURM job array (launchers.executor via data_prep.tasks) gives byte-identical
shards to a local run."""
from __future__ import annotations

import json

import pytest

from data_prep.demo_dataset import make_demo_dataset
from data_prep.write_webdataset import write_webdataset
from tests.slurm.fixtures import slurm_cluster  # noqa: F401 - fixture

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_job_array_writes_the_same_shards_as_a_local_run(slurm_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    src = tmp_path / "src"
    make_demo_dataset(src, num_classes=3, train_per_class=6, val_per_class=3, min_side=24, max_side=48,
                      large_images=1, large_side=96, seed=3)
    local, slurm = tmp_path / "local", tmp_path / "slurm"
    write_webdataset(src, local, cluster="pool", workers=1, progress=False, shard_max_count=4)
    manifests = write_webdataset(src, slurm, cluster="slurm", array_size=3, folder=tmp_path / "submitit",
                                 progress=False, shard_max_count=4, executor_params={"timeout_min": 10})

    info_local = json.loads((local / "wds" / "_info.json").read_text())
    info_slurm = json.loads((slurm / "wds" / "_info.json").read_text())
    for split in ("train", "val"):
        a, b = info_local["splits"][split], info_slurm["splits"][split]
        assert a["filenames"] == b["filenames"] and len(a["filenames"]) > 1
        assert a["shard_sha256"] == b["shard_sha256"]
        assert a["num_samples"] == b["num_samples"] > 0
        for name in a["filenames"]:
            assert (local / "wds" / name).read_bytes() == (slurm / "wds" / name).read_bytes()
    assert (local / "classes.json").read_text() == (slurm / "classes.json").read_text()
    # the shards really came from array tasks on the cluster
    assert manifests["train"]["params"]["cluster"] == "slurm"
    logs = sorted(p.name for p in (tmp_path / "submitit").glob("*_log.out"))
    assert len(logs) >= 3 and all("_" in name for name in logs), logs
