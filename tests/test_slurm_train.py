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


def _wait_for_checkpoint_after(job, ckpt_dir: Path, step: int, timeout: float = 300) -> int:
    from pipeline import checkpointing

    deadline = time.time() + timeout
    while True:
        latest = checkpointing.find_latest(ckpt_dir)
        if latest is not None and int(latest.name.split("_")[-1]) > step:
            return int(latest.name.split("_")[-1])
        assert time.time() < deadline, f"no checkpoint after step {step}"
        assert job_infos([job.job_id])[job.job_id].state in ("PENDING", "RUNNING", "COMPLETING"), job.stderr()
        time.sleep(0.5)


def _start_requeued_now(cluster, job, timeout: float = 120) -> None:
    """A requeued job waits ~2 min (BeginTime) before it may start again; let it start (almost) now.

    Not at once: slurmd remembers when it revoked the old run's credential (one-second resolution) and refuses
    a new credential created in the same second ("Job credential revoked"), which fails the job -- the very
    thing the 2 min BeginTime protects against on a real cluster."""
    deadline = time.time() + timeout
    while job_infos([job.job_id])[job.job_id].state != "PENDING":
        assert time.time() < deadline, job_infos([job.job_id])
        time.sleep(0.5)
    time.sleep(2.5)
    cluster.run("scontrol", "update", f"JobId={job.job_id}", "StartTime=now")


def test_preemption_and_requeue_resume_the_same_run(slurm_cluster, job_env, tiny_data, tiny_recipe, tmp_path):
    epochs = 8
    total = epochs * STEPS_PER_EPOCH
    plan, job = _submit(tiny_data, tiny_recipe, tmp_path / "run", f"run.epochs={epochs}",
                        "checkpoint.every_steps=2", "checkpoint.keep_last=2")
    ckpt_dir = plan.run_dir / "checkpoints"
    # 1) the time-limit / preemption notice (#SBATCH --signal=USR2@...): checkpoint, the job requeues itself
    _wait_for_checkpoint_after(job, ckpt_dir, 0)
    slurm_cluster.run("scancel", "--signal=USR2", job.job_id)
    _start_requeued_now(slurm_cluster, job)
    # 2) requeued from outside (admin, PreemptMode=REQUEUE): SIGTERM, checkpoint, SLURM restarts it
    first_stop = None
    deadline = time.time() + 300
    while first_stop is None:
        stops = [e for e in read_state(plan.run_dir)["events"] if e["event"] == "stopped"]
        first_stop = stops[0]["global_step"] if stops else None
        assert time.time() < deadline, read_state(plan.run_dir)
        time.sleep(0.5)
    _wait_for_checkpoint_after(job, ckpt_dir, first_stop)
    slurm_cluster.run("scontrol", "requeue", job.job_id)
    _start_requeued_now(slurm_cluster, job)
    summaries = wait_for(job, timeout=480)

    assert [s["global_step"] for s in summaries] == [total, total]
    state = read_state(plan.run_dir)
    events = state["events"]
    assert [e["event"] for e in events] == ["start", "stopped", "requeue", "start", "stopped", "start"], events
    assert events[1]["signal"] == "SIGUSR2" and events[4]["signal"] == "SIGTERM"
    assert 0 < events[1]["global_step"] < events[4]["global_step"] < total
    assert [events[i]["restarts"] for i in (0, 3, 5)] == [0, 1, 2] and state["requeues"] == 2
    log = Path(str(job.paths.stdout).replace("%t", "0")).read_text()
    for stop in (events[1], events[4]):  # each run resumed from the checkpoint its predecessor saved on the signal
        assert f"(global {stop['global_step']})" in log
    client, runs = _mlflow_runs(plan)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, total + 1))  # continuous: nothing lost, nothing logged twice
    final = json.loads((plan.run_dir / "final_metrics.json").read_text())
    assert final["mlflow_run_id"] == runs[0].info.run_id and final["global_step"] == total
