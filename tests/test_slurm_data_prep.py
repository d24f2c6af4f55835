"""Data-prep writing as a SLURM job array (launchers.executor via data_prep.tasks): WebDataset shards are
byte-identical to a local run's, FFCV .beton files (one array element per split) hold the same samples."""
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


def test_ffcv_one_array_job_per_split_matches_a_local_run(slurm_cluster, tmp_path, monkeypatch):
    """FFCV through the same executor code: one SLURM array element per split (DatasetWriter writes one file),
    the same samples as an in-process run (resuming through an array is tested with submitit's local executor in
    test_data_prep_ffcv.py; here it would add two more jobs)."""
    from data_prep.write_ffcv import write_ffcv
    from helpers_data_prep import read_beton

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    src = tmp_path / "src"
    make_demo_dataset(src, num_classes=3, train_per_class=4, val_per_class=2, min_side=24, max_side=48,
                      large_images=1, large_side=96, seed=3)
    kw = dict(max_resolution=32, write_mode="proportion", workers=1, progress=False)
    local, slurm = tmp_path / "local", tmp_path / "slurm"
    write_ffcv(src, local, **kw)
    manifests = write_ffcv(src, slurm, cluster="slurm", folder=tmp_path / "submitit",
                           executor_params={"timeout_min": 10}, **kw)
    for split in ("train", "val"):
        got = read_beton(slurm / "ffcv" / f"{split}.beton")
        assert got == read_beton(local / "ffcv" / f"{split}.beton") and len(got) > 0
        assert manifests[split]["params"]["cluster"] == "slurm" and manifests[split]["reused"] is False
    logs = sorted(p.name for p in (tmp_path / "submitit").glob("*_log.out"))
    assert len(logs) == 2 and all("_" in name for name in logs), logs   # two array elements, one per split
