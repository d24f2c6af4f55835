"""Training on a real local SLURM cluster: through launchers/slurm_submit.py 2 nodes x 1 task (gloo, precision
auto, the shared tiny dataset), a requeue mid-training that resumes the same run, a job that fails; and plain
``srun python pipeline/train.py`` without submitit."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit

from helpers_train import data_with_damaged_shard
from helpers_train import tiny_data, tiny_recipe  # noqa: F401 - session fixtures (shared tiny dataset)
from launchers import slurm_submit
from launchers.executor import job_infos, wait_for
from launchers.train_job import read_state
from pipeline.device import cpu_has_native_bf16
from pipeline.distributed import port_for_job
from tests.slurm.fixtures import slurm_cluster  # noqa: F401 - fixture

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 4  # 32 train images / (batch 4 x 2 ranks)


@pytest.fixture
def job_env(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two "nodes" share this machine's cores
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(k, raising=False)


def _argv(tiny_data, tiny_recipe, run_dir: Path, *overrides: str, nodes: int = 2) -> list[str]:
    return ["--cluster", "slurm", "--nodes", str(nodes), "--time", "20", "--signal-delay-s", "30", "--recipe",
            str(tiny_recipe), "--data", str(tiny_data), "--run-dir", str(run_dir), "--deepspeed-config",
            "deepspeed_configs/zero2.json", *overrides]


def _submit(capsys, tiny_data, tiny_recipe, run_dir: Path, *overrides: str):
    """``slurm_submit.py`` as its command line runs it; returns the plan, the job and the MLflow run id it printed."""
    argv = _argv(tiny_data, tiny_recipe, run_dir, *overrides)
    plan = slurm_submit.plan(argv)  # what main() resolves (side-effect free), for the checks below
    assert plan.world_size == 2
    capsys.readouterr()
    assert slurm_submit.main(argv) == 0
    out = capsys.readouterr().out
    job_id = re.search(r"^submitted job (\d+) on slurm \(2 tasks\)$", out, re.M).group(1)
    run_id = re.search(rf"^MLflow: {re.escape(plan.tracking_uri)} experiment 'cpvt' run (\w+)$", out, re.M).group(1)
    # the run exists from submission on, in the store the job writes to
    _, runs = _mlflow_runs(plan)
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].data.tags["launcher.job_id"] == job_id
    assert runs[0].info.status in ("SCHEDULED", "RUNNING")  # RUNNING once the trainer continued it
    return plan, submitit.SlurmJob(plan.folder, job_id, tasks=(0, 1)), run_id


def _mlflow_runs(plan):
    from mlflow.tracking import MlflowClient

    from tests.helpers_tracking import runs_of

    return MlflowClient(plan.tracking_uri), runs_of(plan.run_dir, plan.tracking_uri, plan.experiment)


def test_two_node_training_logs_one_mlflow_run(slurm_cluster, job_env, tiny_data, tiny_recipe, tmp_path, capsys):
    plan, job, run_id = _submit(capsys, tiny_data, tiny_recipe, tmp_path / "run", "run.epochs=2")
    summaries = wait_for(job, timeout=480)
    assert [s["world_size"] for s in summaries] == [2, 2]
    assert [s["global_step"] for s in summaries] == [2 * STEPS_PER_EPOCH] * 2
    assert summaries[0]["exit_code"] == 0
    client, runs = _mlflow_runs(plan)
    # the job continued the run created (and printed) at submission: exactly one run
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].info.run_id == summaries[0]["mlflow_run_id"] == run_id
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


def test_preemption_and_requeue_resume_the_same_run(slurm_cluster, job_env, tiny_data, tiny_recipe, tmp_path,
                                                    capsys):
    epochs = 8
    total = epochs * STEPS_PER_EPOCH
    plan, job, run_id = _submit(capsys, tiny_data, tiny_recipe, tmp_path / "run", f"run.epochs={epochs}",
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
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_id == run_id
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, total + 1))  # continuous: nothing lost, nothing logged twice
    final = json.loads((plan.run_dir / "final_metrics.json").read_text())
    assert final["mlflow_run_id"] == runs[0].info.run_id and final["global_step"] == total


def test_preempted_two_node_job_continues_on_one_node(slurm_cluster, job_env, tiny_data, tiny_recipe, tmp_path,
                                                      capsys):
    """Preempted on 2 nodes (SIGTERM: checkpoint, no self-requeue), resubmitted with ``--nodes 1`` and the same
    global batch 8 (4 x accumulation 2): the run continues from the checkpoint (ZeRO-2 state re-partitioned) in
    the same MLflow run, which finishes with every step logged once."""
    epochs = 3
    total = epochs * STEPS_PER_EPOCH
    common = (f"run.epochs={epochs}", "checkpoint.every_steps=2", "run.stop_check_steps=1")
    plan, job, run_id = _submit(capsys, tiny_data, tiny_recipe, tmp_path / "run", *common)
    _wait_for_checkpoint_after(job, plan.run_dir / "checkpoints", 0)
    slurm_cluster.run("scancel", "--signal=TERM", job.job_id)
    deadline = time.time() + 300
    while job_infos([job.job_id])[job.job_id].state in ("PENDING", "RUNNING", "COMPLETING"):
        assert time.time() < deadline, job_infos([job.job_id])
        time.sleep(0.5)
    [stop] = [e for e in read_state(plan.run_dir)["events"] if e["event"] == "stopped"]
    assert stop["signal"] == "SIGTERM" and 0 < stop["global_step"] < total

    capsys.readouterr()
    argv = _argv(tiny_data, tiny_recipe, plan.run_dir, *common, "data.batch_size=4", "optim.grad_accum=2", nodes=1)
    assert slurm_submit.main(argv) == 0
    out = capsys.readouterr().out
    job_id = re.search(r"^submitted job (\d+) on slurm \(1 tasks\)$", out, re.M).group(1)
    assert re.search(r"^MLflow: .* run (\w+)$", out, re.M).group(1) == run_id   # the same run, not a new one
    summary = wait_for(submitit.SlurmJob(plan.folder, job_id, tasks=(0,)), timeout=600)   # one task: its result
    assert (summary["world_size"], summary["global_step"], summary["exit_code"]) == (1, total, 0)
    log = Path(str(submitit.SlurmJob(plan.folder, job_id, tasks=(0,)).paths.stdout).replace("%t", "0")).read_text()
    assert "continuing a 2-rank checkpoint on 1 ranks" in log and f"(global {stop['global_step']})" in log
    client, runs = _mlflow_runs(plan)
    assert len(runs) == 1 and runs[0].info.run_id == run_id and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == list(range(1, total + 1))   # continuous over the two jobs: nothing lost or repeated


def _srun(cluster, *cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``srun --nodes=2 --ntasks-per-node=1 --label CMD`` from a checkout (the job is cancelled if it hangs)."""
    name = f"srun-test-{time.time_ns()}"
    try:
        return subprocess.run(["srun", "--nodes=2", "--ntasks-per-node=1", "--time=5", f"--job-name={name}",
                               "--kill-on-bad-exit=1", "--label", *cmd], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
    finally:
        cluster.run("scancel", f"--name={name}", check=False)


RENDEZVOUS = ("import json, os; from pipeline.distributed import detect_env; "
              "print(json.dumps({**detect_env().__dict__, 'job': os.environ['SLURM_JOB_ID'], "
              "'node': os.environ['SLURMD_NODENAME']}))")


def _rendezvous(text: str) -> list[dict]:
    return sorted((json.loads(line.split(": ", 1)[1]) for line in text.splitlines() if ": {" in line),
                  key=lambda e: e["rank"])


def test_srun_rendezvous_uses_the_first_node_address_and_a_job_port(slurm_cluster, job_env, monkeypatch, tmp_path):
    """``srun python ...`` without submitit: the same NodeAddr lookup as the launcher (node names "n1"/"n2" do
    not resolve here), a port from the job id; an exported MASTER_PORT wins; a batch script is one process."""
    proc = _srun(slurm_cluster, sys.executable, "-c", RENDEZVOUS, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    envs = _rendezvous(proc.stdout)
    assert [(e["rank"], e["world_size"], e["local_rank"], e["source"]) for e in envs] == [(0, 2, 0, "slurm"),
                                                                                           (1, 2, 0, "slurm")]
    assert {e["node"] for e in envs} == {"n1", "n2"}
    assert {e["master_addr"] for e in envs} == {"127.0.0.1"}
    assert {e["master_port"] for e in envs} == {port_for_job(envs[0]["job"])}

    monkeypatch.setenv("MASTER_PORT", "23456")
    proc = _srun(slurm_cluster, sys.executable, "-c", RENDEZVOUS, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {e["master_port"] for e in _rendezvous(proc.stdout)} == {23456}
    monkeypatch.delenv("MASTER_PORT")

    # the batch script itself (no srun) sees SLURM_PROCID=0 SLURM_NTASKS=2 but is a single process
    out = tmp_path / "batch.out"
    script = tmp_path / "batch.sh"
    script.write_text(f"#!/bin/bash\n{sys.executable} -c \"{RENDEZVOUS}\" | sed 's/^/0: /'\n")
    slurm_cluster.run("sbatch", "--wait", "--nodes=2", "--ntasks-per-node=1", "--time=5", f"--chdir={ROOT}",
                      f"--output={out}", str(script), timeout=120)
    [batch] = _rendezvous(out.read_text())
    assert (batch["rank"], batch["world_size"], batch["source"]) == (0, 1, "single"), out.read_text()


def test_srun_train_py_two_nodes(slurm_cluster, job_env, tiny_data, tiny_recipe, tmp_path):
    """``srun python pipeline/train.py`` (no submitit): 2 nodes x 1 task, gloo, ZeRO-2 (precision auto), one epoch."""
    run_dir = tmp_path / "run"
    proc = _srun(slurm_cluster, sys.executable, "pipeline/train.py", "--recipe", str(tiny_recipe), "--data",
                 str(tiny_data), "--run-dir", str(run_dir), "--deepspeed_config",
                 "deepspeed_configs/zero2.json", "run.epochs=1")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    prec = "bf16" if cpu_has_native_bf16() else "fp32"   # run.precision auto on these CPU nodes
    assert "0: model cpvt_ti" in proc.stdout and f"world=2 precision={prec} zero=2" in proc.stdout
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert (final["world_size"], final["global_step"], final["exit_code"]) == (2, STEPS_PER_EPOCH, 0)
    # both ranks joined: each saved its own ZeRO optimizer partition and RNG state in the final checkpoint
    ckpt = Path(final["checkpoint"])
    for rank in (0, 1):
        prefix = "bf16_" if prec == "bf16" else ""
        assert (ckpt / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()
        assert (ckpt / f"rng_rank{rank}.pt").is_file()
    assert not list(ckpt.glob("*zero_pp_rank_2_mp_rank_00_optim_states.pt"))
    from tests.helpers_tracking import runs_of

    [run] = runs_of(run_dir)
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    assert run.info.run_id == final["mlflow_run_id"]


def test_failing_training_job_surfaces_its_error(slurm_cluster, job_env, tiny_data, tiny_recipe, tmp_path):
    """``slurm_submit.py --wait``: a data folder that passes every check before submission but has a damaged
    shard (only the job finds out) -> the job's one-line error on stderr with where its traceback is, exit code
    1, the MLflow run FAILED."""
    bad = data_with_damaged_shard(tiny_data, tmp_path / "data")
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "launchers/slurm_submit.py", "--cluster", "slurm", "--time", "10",
                           "--recipe", str(tiny_recipe), "--data", str(bad), "--run-dir", str(run_dir), "--wait",
                           "run.epochs=1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    job_id = re.search(r"^submitted job (\d+) on slurm \(1 tasks\)$", proc.stdout, re.M).group(1)
    run_id = re.search(r"^MLflow: .* run (\w+)$", proc.stdout, re.M).group(1)
    found = re.search(rf"^job {job_id} failed:\n\[task 0\] raised pipeline\.data\.tar_samples\.ShardReadError: a "
                      rf"shard could not be read at step \d+: {re.escape(str(bad))}/wds/train-000000\.tar: tar header "
                      rf"checksum mismatch .*\(traceback: (\S+)\)$", proc.stderr, re.M)
    assert found, proc.stderr
    assert "Traceback (most recent call last)" in Path(found.group(1)).read_text()
    from tests.helpers_tracking import runs_of

    [run] = runs_of(run_dir)
    assert run.info.run_id == run_id and run.info.status == "FAILED"
