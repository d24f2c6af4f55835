"""Training through launchers/slurm_submit.py on a real local SLURM cluster: 2 nodes x 1 task (gloo, bf16, the
shared tiny dataset), and a requeue mid-training that resumes the same run."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from helpers_train import tiny_data, tiny_recipe  # noqa: F401 - session fixtures (shared tiny dataset)
from launchers import slurm_submit
from launchers.executor import job_infos, wait_for
from launchers.train_job import read_state
from tests.slurm.fixtures import slurm_cluster  # noqa: F401 - fixture

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS_PER_EPOCH = 4  # 32 train images / (batch 4 x 2 ranks)


@pytest.fixture
def job_env(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two "nodes" share this machine's cores
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(k, raising=False)


def _submit(tiny_data, tiny_recipe, run_dir: Path, *overrides: str):
    plan = slurm_submit.plan(["--cluster", "slurm", "--nodes", "2", "--time", "20", "--signal-delay-s", "30",
                              "--recipe", str(tiny_recipe), "--data", str(tiny_data), "--run-dir", str(run_dir),
                              "--deepspeed-config", "deepspeed_configs/zero2_bf16.json", *overrides])
    assert plan.world_size == 2
    return plan, slurm_submit.submit(plan)


def _mlflow_runs(plan):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(plan.tracking_uri)
    exp = client.get_experiment_by_name(plan.experiment)
    return client, client.search_runs([exp.experiment_id])


def test_two_node_training_logs_one_mlflow_run(slurm_cluster, job_env, tiny_data, tiny_recipe, tmp_path):
    plan, job = _submit(tiny_data, tiny_recipe, tmp_path / "run", "run.epochs=2")
    summaries = wait_for(job, timeout=480)
    assert [s["world_size"] for s in summaries] == [2, 2]
    assert [s["global_step"] for s in summaries] == [2 * STEPS_PER_EPOCH] * 2
    assert summaries[0]["exit_code"] == 0
    client, runs = _mlflow_runs(plan)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].info.run_id == summaries[0]["mlflow_run_id"]
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert steps == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert runs[0].data.params["world_size"] == "2"
    # both tasks really ran on the two slurmd nodes
    events = read_state(plan.run_dir)["events"]
    assert [e["event"] for e in events] == ["start"] and events[0]["world"] == "2"


def test_requeue_mid_training_resumes_the_same_run(slurm_cluster, job_env, tiny_data, tiny_recipe, tmp_path):
    from pipeline import checkpointing

    epochs = 30
    total = epochs * STEPS_PER_EPOCH
    plan, job = _submit(tiny_data, tiny_recipe, tmp_path / "run", f"run.epochs={epochs}",
                        "checkpoint.every_steps=4", "checkpoint.keep_last=2")
    ckpt_dir = plan.run_dir / "checkpoints"
    deadline = time.time() + 300
    while checkpointing.find_latest(ckpt_dir) is None:  # mid-training: after the first periodic checkpoint
        assert time.time() < deadline, "no checkpoint written"
        assert job_infos([job.job_id])[job.job_id].state in ("PENDING", "RUNNING"), job.stderr()
        time.sleep(0.5)
    slurm_cluster.run("scontrol", "requeue", job.job_id)  # what an admin or a REQUEUE preemption does
    # a requeued job waits ~2 min (BeginTime) before it may start again; let it start now
    deadline = time.time() + 120
    while job_infos([job.job_id])[job.job_id].state != "PENDING":
        assert time.time() < deadline, job_infos([job.job_id])
        time.sleep(0.5)
    slurm_cluster.run("scontrol", "update", f"JobId={job.job_id}", "StartTime=now")
    summaries = wait_for(job, timeout=480)

    assert [s["global_step"] for s in summaries] == [total, total]
    events = read_state(plan.run_dir)["events"]
    assert [e["event"] for e in events] == ["start", "stopped", "start"], events
    stopped = events[1]
    assert stopped["signal"] == "SIGTERM" and 0 < stopped["global_step"] < total
    assert events[2]["restarts"] == 1
    log = Path(str(job.paths.stdout).replace("%t", "0")).read_text()
    assert f"at epoch" in log and f"(global {stopped['global_step']})" in log  # resumed from the stop checkpoint
    client, runs = _mlflow_runs(plan)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, total + 1))  # continuous: nothing lost, nothing logged twice
    final = json.loads((plan.run_dir / "final_metrics.json").read_text())
    assert final["mlflow_run_id"] == runs[0].info.run_id
