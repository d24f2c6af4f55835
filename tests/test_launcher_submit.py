"""launchers/slurm_submit.py planning: --dry-run output and one-line validation errors (no cluster needed);
launchers.executor on submitit's local/debug backends; launchers.dist_env / train_job helpers."""
from __future__ import annotations

import json
import os
import shutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_train import tiny_data, tiny_recipe  # noqa: F401 - session fixtures (shared tiny dataset)
from launchers import slurm_submit
from launchers.dist_env import torch_dist_env
from launchers.executor import JobFailedError, make_executor, wait_for
from launchers.train_job import with_resume_auto
from pipeline.config import ConfigError
from pipeline.distributed import port_for_job
from tests.helpers_tracking import runs_of, suite_store
from tests.slurm import jobs
from tests.slurm.fixtures import submitit_folder  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]


def _submit(capsys, *argv: str) -> tuple[int, str, str]:
    rc = slurm_submit.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_dry_run_prints_sbatch_parameters_and_training_config(capsys, tiny_data, tiny_recipe, tmp_path,
                                                             monkeypatch):
    store = tmp_path / "store" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")  # an explicit store: still left untouched
    rc, out, err = _submit(capsys, "--nodes", "4", "--gpus-per-node", "8", "--partition", "p", "--account", "acc",
                           "--qos", "high", "--constraint", "a100", "--time", "72:00:00", "--cpus-per-task", "10",
                           "--mem", "480", "--recipe", str(tiny_recipe), "--model", "cpvt_b", "--data",
                           str(tiny_data), "--run-dir", str(tmp_path / "run"), "--dry-run", "optim.weight_decay=0.02")
    assert rc == 0, err
    assert "world size: 32" in out
    assert "global batch 128 = per-rank batch 4 x accumulation 1 x 32 ranks (data.batch_size per rank" in out
    assert "  gpus_per_node: 8  [flag]" in out and "  recipe: " in out
    if "sbatch parameters:" in out:  # needs the SLURM client installed (make setup-test)
        for line in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=p", "--account=acc",
                     "--qos=high", "--constraint=a100", "--time=4320", "--cpus-per-task=10", "--mem=480GB",
                     "--signal=USR2@120", "--requeue"):
            assert f"#SBATCH {line}" in out, line
    assert "name: cpvt_b" in out and "weight_decay: 0.02" in out  # the validated training config
    assert '"train_batch_size": 128' in out  # the resolved DeepSpeed config
    assert "--resume auto" in out
    assert f"MLflow: sqlite:///{store} (experiment 'cpvt'; the run is created at submission)" in out
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    assert not (tmp_path / "store").exists()  # ... and creates no MLflow run


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "0"], "error: --nodes: 0 must be > 0"),
    (["--model", "cpvt_huge"], "error: --model: 'cpvt_huge' is not one of ['cpvt_b', "),
    (["--nodes", "3", "--global-batch", "64"],
     "error: data.global_batch_size: global batch 64 cannot be split over 3 ranks (64 is not divisible by 3)"),
    (["--time", "soon"], "error: --time: 'soon' is not a SLURM time"),
    (["--cluster", "k8s"], "error: --cluster: 'k8s' is not one of ['slurm', 'local', 'debug']"),
    (["--gpus-per-node", "8", "--model", "cpvt_b", "--time", "0:05:00", "checkpoint.every_steps=100000",
      "schedule.resolution.resolution=224"],
     "error: --time: 0:05:00 is shorter than one checkpoint interval"),
    (["--time", "10", "--step-time-s", "60", "checkpoint.every_steps=20"],
     "error: --time: 0:10:00 is shorter than one checkpoint interval"),
    (["data.format=tfrecord"], "error: data.format: 'tfrecord' is not one of ['wds', 'ffcv']"),
])
def test_bad_submissions_fail_with_one_line(capsys, tiny_data, tiny_recipe, tmp_path, argv, message):
    rc, out, err = _submit(capsys, "--recipe", str(tiny_recipe), "--data", str(tiny_data), "--run-dir",
                           str(tmp_path / "run"), "--dry-run", *argv)
    assert rc == 2 and out == ""
    assert err.startswith(message), err
    assert err.count("\n") == 1


def test_missing_data_path_fails_before_submission(capsys, tiny_recipe, tmp_path):
    rc, _, err = _submit(capsys, "--recipe", str(tiny_recipe), "--data", str(tmp_path / "nope"), "--cluster",
                         "local")
    assert rc == 2 and err == f"error: --data: {tmp_path / 'nope'} does not exist\n"
    assert not list(tmp_path.iterdir())


def test_a_short_shard_fails_before_submission(capsys, tiny_data, tiny_recipe, tmp_path):
    """A shard smaller than ``_info.json`` records is found at submission (a stat per shard), not by the job."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("ffcv"))
    shard = data / "wds" / "train-000000.tar"
    size = shard.stat().st_size
    os.truncate(shard, size - 512)
    rc, _, err = _submit(capsys, "--recipe", str(tiny_recipe), "--data", str(data), "--run-dir",
                         str(tmp_path / "run"), "--cluster", "local")
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("error: data.root: 1 of ") and f"{shard} ({size - 512} bytes, _info.json says {size})" in err
    assert not (tmp_path / "run").exists()


def _launcher_env() -> dict[str, str]:
    """This process's environment without any rendezvous or MLflow settings, one OpenMP thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    return env


@pytest.mark.slow
def test_local_cluster_trains_through_the_same_path(tiny_data, tiny_recipe, tmp_path):
    """The script from a checkout, --cluster local: 2 submitit tasks, same TrainJob, rendezvous and trainer."""
    env = _launcher_env()
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "launchers/slurm_submit.py", "--cluster", "local", "--tasks-per-node",
                           "2", "--recipe", str(tiny_recipe), "--data", str(tiny_data), "--run-dir", str(run_dir),
                           "--time", "15", "--wait", "run.max_steps=2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "on local (2 tasks)" in proc.stdout and f"MLflow: {suite_store()}" in proc.stdout
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["world_size"] == 2 and final["global_step"] == 2
    assert f"finished: global_step=2 MLflow run {final['mlflow_run_id']}" in proc.stdout


@pytest.mark.slow
def test_debug_cluster_trains_in_process(tiny_data, tiny_recipe, tmp_path):
    """--cluster debug: submitit's in-process executor, one rank, same TrainJob and trainer, the printed run."""
    env = _launcher_env()
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "launchers/slurm_submit.py", "--cluster", "debug", "--recipe",
                           str(tiny_recipe), "--data", str(tiny_data), "--run-dir", str(run_dir), "--time", "15",
                           "--wait", "run.max_steps=2"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "on debug (1 tasks)" in proc.stdout
    run_id = re.search(rf"^MLflow: {re.escape(suite_store())} experiment 'cpvt' run (\w+)$",
                       proc.stdout, re.M).group(1)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert (final["world_size"], final["global_step"], final["exit_code"]) == (1, 2, 0)
    assert final["mlflow_run_id"] == run_id
    assert f"finished: global_step=2 MLflow run {run_id}" in proc.stdout
    [run] = runs_of(run_dir)
    assert run.info.run_id == run_id and run.info.status == "FINISHED" and run.data.params["world_size"] == "1"


def test_parse_time():
    assert slurm_submit.parse_time_min("90") == 90
    assert slurm_submit.parse_time_min("72:00:00") == 72 * 60
    assert slurm_submit.parse_time_min("1-12:30:00") == 36 * 60 + 30
    assert slurm_submit.parse_time_min("2-0") == 48 * 60
    assert slurm_submit.parse_time_min("10:30") == 11  # MM:SS rounds up
    with pytest.raises(ConfigError):
        slurm_submit.parse_time_min("0")


def test_local_and_debug_executors_share_the_wait_path(submitit_folder):
    local = make_executor(submitit_folder / "local", "local", timeout_min=2)
    assert wait_for([local.submit(jobs.double, 2), local.submit(jobs.double, 5)], timeout=120) == [4, 10]
    with pytest.raises(JobFailedError, match="ValueError: broken shard"):
        wait_for(local.submit(jobs.fail_with, "broken shard"), timeout=120)
    debug = make_executor(submitit_folder / "debug", "debug")
    assert wait_for(debug.submit(jobs.double, 4)) == 8
    with pytest.raises(ConfigError, match="cluster: 'kube' is not one of"):
        make_executor(submitit_folder, "kube")


def test_local_multi_task_job_gets_rendezvous_env(submitit_folder):
    ex = make_executor(submitit_folder, "local", nodes=1, tasks_per_node=2, timeout_min=2)
    envs = wait_for(ex.submit(jobs.rendezvous_env), timeout=120)
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in envs] == [("0", "0", "2"), ("1", "1", "2")]
    assert len({e["MASTER_PORT"] for e in envs}) == 1


def test_dist_env_from_slurm_variables():
    env = {"SLURM_JOB_ID": "1234", "SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "127.0.0.1"}
    got = torch_dist_env(env)
    assert got == {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port_for_job("1234")), "RANK": "5",
                   "WORLD_SIZE": "16", "LOCAL_RANK": "1"}
    assert 12000 <= port_for_job("1234") < 32000   # below the Linux ephemeral range (32768-60999)
    assert port_for_job("77_1") != port_for_job("77_2")  # array elements may share a node


def test_requeued_runs_resume_automatically():
    assert with_resume_auto(["--data", "d", "--resume", "none", "x.y=1"]) == ["--data", "d", "x.y=1", "--resume",
                                                                             "auto"]
    assert with_resume_auto(["checkpoint.resume=/ckpt"]) == ["--resume", "auto"]


def test_requeues_are_bounded_per_run(tmp_path, monkeypatch):
    from launchers.train_job import RequeueLimitError, TrainJob, read_state

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "0")  # restored after the test (the job exports its own values)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")  # SLURM restarted this job 3 times
    with pytest.raises(RequeueLimitError, match=r"requeued 3 times \(max_requeues=2\)"):
        TrainJob(["--data", str(tmp_path)], str(tmp_path / "run"), max_requeues=2)()
    state = read_state(tmp_path / "run")
    assert state["requeues"] == 3 and state["events"][0]["restarts"] == 3


def test_self_requeue_stops_at_max_requeues(tmp_path, request):
    """TrainJob's own requeue (USR2 -> checkpoint -> requeue): the bound is checked before anything is requeued.

    The state is what two earlier runs of this job wrote (each requeued itself once); this run was stopped by
    USR2 at step 7 and the trainer returned EXIT_PREEMPTED: a third requeue would exceed max_requeues=2."""
    import signal

    from launchers.train_job import RequeueLimitError, TrainJob, read_state, write_state
    from pipeline import preemption, train

    run_dir = tmp_path / "run"
    events = [{"event": e, "job_id": "41"} for e in ("start", "stopped", "requeue", "start", "stopped", "requeue",
                                                      "start")]
    write_state(run_dir, {"requeues": 2, "events": events})
    request.addfinalizer(preemption.clear_stop)
    preemption.request_stop(signal.SIGUSR2)  # what the USR2 handler records
    summary = {"exit_code": train.EXIT_PREEMPTED, "global_step": 7, "checkpoint": str(run_dir / "ckpt/step_7")}
    job = TrainJob(["--data", str(tmp_path)], str(run_dir), max_requeues=2)
    with pytest.raises(RequeueLimitError, match=r"ckpt/step_7 after 2 requeues \(max_requeues=2\); the "
                                                r"checkpoint is saved: resubmit with --resume auto"):
        job.after_preemption(0, summary)
    state = read_state(run_dir)
    assert state["requeues"] == 2  # not requeued again
    assert state["events"][-1]["event"] == "stopped" and state["events"][-1]["signal"] == "SIGUSR2"
    assert [e["event"] for e in state["events"]].count("requeue") == 2
    # the requeued submission would carry the same MLflow run and resume automatically
    nxt = TrainJob(["--resume", "none"], str(run_dir), 2, mlflow_run_id="abc", tracking_uri="sqlite:///x.db")
    again = nxt.checkpoint().function
    assert (again.argv, again.mlflow_run_id, again.tracking_uri) == (["--resume", "auto"], "abc", "sqlite:///x.db")


def _site(tmp_path: Path, **values) -> Path:
    import yaml

    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_card_dry_run_nodes_4_model_cpvt_b(capsys, tiny_data, tmp_path, monkeypatch):
    """``slurm_submit.py --nodes 4 --model cpvt_b --dry-run`` with a site file describing 8-GPU nodes: the paper's
    recipe, 32 ranks, global batch 1024 = 32 per rank; every value says where it came from; a flag wins."""
    site = _site(tmp_path, data_root=str(tiny_data), partition="gpu", account="lab", gpus_per_node=8,
                 cpus_per_task=12, runs_root="runs", time="24:00:00")
    monkeypatch.setenv("CPVT_SITE", str(site))
    rc, out, err = _submit(capsys, "--nodes", "4", "--model", "cpvt_b", "--dry-run")
    assert rc == 0, err
    src = f"[site file {site}]"
    assert "world size: 32" in out
    assert f"  recipe: {ROOT / 'pipeline/recipes/cpvt_b.yaml'}  [the paper's recipe for --model cpvt_b]" in out
    assert ("world size 32 = 4 nodes x 8 tasks; global batch 1024 = per-rank batch 32 x accumulation 1 x 32 ranks "
            "(data.global_batch_size)") in out
    for line in (f"gpus_per_node: 8  {src}", "tasks_per_node: 8  [one task per GPU]", f"partition: gpu  {src}",
                 f"data_root: {tiny_data}  {src}", f"runs_root: {tmp_path / 'runs'}  {src}",
                 f"cpus_per_task: 12  {src}", "loader workers: 11 per rank (12 CPUs per task)"):
        assert f"  {line}" in out, line
    assert f"run dir: {tmp_path / 'runs'}/cpvt_b-" in out
    assert f"MLflow: sqlite:///{tmp_path / 'runs' / 'mlflow.db'} " in out   # the project store under runs_root
    assert "repeats: 3" in out and "global_batch_size: 1024" in out and '"train_micro_batch_size_per_gpu": 32' in out
    if "sbatch parameters:" in out:
        assert "#SBATCH --ntasks-per-node=8" in out and "#SBATCH --gpus-per-node=8" in out
    rc, out, err = _submit(capsys, "--nodes", "4", "--model", "cpvt_b", "--partition", "big", "--dry-run")
    assert rc == 0 and "  partition: big  [flag]" in out
    rc, out, err = _submit(capsys, "--nodes", "3", "--model", "cpvt_b", "--dry-run")   # 24 ranks
    assert rc == 2 and err.startswith("error: data.global_batch_size: global batch 1024 cannot be split over 24 "
                                      "ranks"), err


def test_site_file_errors_are_one_line(capsys, tmp_path, monkeypatch):
    for text, needle in (("gpus_per_nodes: 8\n", "gpus_per_nodes: unknown field"),
                         ("time: 24:00:00\n", "time: quote it"),
                         ("gpus_per_node: -1\n", "gpus_per_node: -1 must be >= 0")):
        (tmp_path / "site.yaml").write_text(text)
        monkeypatch.setenv("CPVT_SITE", str(tmp_path / "site.yaml"))
        rc, out, err = _submit(capsys, "--dry-run")
        assert rc == 2 and err.startswith(f"error: site file {tmp_path / 'site.yaml'}: {needle}"), err
        assert err.count("\n") == 1
    monkeypatch.setenv("CPVT_SITE", str(tmp_path / "missing.yaml"))
    rc, _, err = _submit(capsys, "--dry-run")
    assert rc == 2 and "CPVT_SITE: site file" in err and "does not exist" in err


def test_checkpoint_interval_follows_a_short_time_limit(capsys, tiny_data, tiny_recipe, tmp_path):
    """5 min limit, 2 min signal delay, 60 s/step, an epoch of 8 steps: the job checkpoints every step."""
    p = slurm_submit.plan(["--cluster", "local", "--recipe", str(tiny_recipe), "--data", str(tiny_data), "--run-dir",
                           str(tmp_path / "run"), "--time", "5", "--step-time-s", "60", "checkpoint.every_steps=0"])
    assert "checkpoint.every_steps=1" in p.train_argv
    [line] = [c for c in p.checks if c.startswith("checkpoint.every_steps=")]
    assert line.startswith("checkpoint.every_steps=1 (derived: one epoch = 8 steps (checkpoint.every_steps=0) x 60 "
                           "s/step (--step-time-s) = 8.0 min is longer than the 3.0 min before the requeue signal")
    long = slurm_submit.plan(["--cluster", "local", "--recipe", str(tiny_recipe), "--data", str(tiny_data),
                              "--run-dir", str(tmp_path / "run"), "--time", "60", "--step-time-s", "1",
                              "checkpoint.every_steps=0"])
    # an epoch fits in the time limit: checkpoints at epoch ends, as the command line asked
    assert [a for a in long.train_argv if a.startswith("checkpoint.every_steps")] == ["checkpoint.every_steps=0"]


def test_throughput_table_and_gpu_check_results(tmp_path):
    est = slurm_submit.estimate_step_s("cpvt_b", 32, 1, 224, "V100")
    assert est == (pytest.approx(32 / 285.5), "the paper's V100 throughput")
    assert slurm_submit.estimate_step_s("cpvt_b", 32, 1, 224, None)[1].startswith("GPU type unknown: the paper's V100")
    doc = {"gpu_check": 1, "profile": "gpu", "environment": {"gpu": "NVIDIA A100-SXM4-80GB"},
           "attribution": {"bare_engine_img_s": 9000.0, "wds_img_s": 5001.4, "ffcv_img_s": None}}
    (tmp_path / "gpu_check.json").write_text(json.dumps(doc))
    rows = slurm_submit.measured_img_s(tmp_path / "gpu_check.json")
    assert rows["A100"]["cpvt_ti"] == pytest.approx(5001.4)   # the pipeline's own measured img/s
    assert rows["A100"]["cpvt_b"] == pytest.approx(5001.4 * 285.5 / 2500.7)   # the paper's V100 ratio
    (tmp_path / "gpu_check.json").write_text(json.dumps(doc | {"profile": "cpu-smoke"}))
    assert slurm_submit.measured_img_s(tmp_path / "gpu_check.json") == {}   # a CPU smoke run measures nothing


# `sinfo` / `scontrol` output captured from GPU clusters (this machine's test cluster has no GPUs to show)
SINFO_GRES = "gpu:a100:8(S:0-1)\ngpu:a100:4(S:0)\n"
SCONTROL_PARTITION = ("PartitionName=gpu AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=NO "
                      "QoS=N/A DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO "
                      "MaxNodes=UNLIMITED MaxTime=2-00:00:00 MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED "
                      "Nodes=gpu[001-016] PriorityJobFactor=1 PriorityTier=1 RootOnly=NO ReqResv=NO "
                      "OverSubscribe=NO OverTimeLimit=NONE PreemptMode=OFF State=UP TotalCPUs=2048 TotalNodes=16 "
                      "SelectTypeParameters=NONE JobDefaults=(null) DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED "
                      "TRES=cpu=2048,mem=16000000M,node=16,billing=2048,gres/gpu=128\n")
SCONTROL_NODES = (
    "NodeName=gpu001 Arch=x86_64 CoresPerSocket=32 CPUAlloc=0 CPUEfctv=128 CPUTot=128 CPULoad=0.51 "
    "AvailableFeatures=a100,ib ActiveFeatures=a100,ib Gres=gpu:a100:8(S:0-1) NodeAddr=gpu001 NodeHostName=gpu001 "
    "Version=23.02.7 OS=Linux 5.14.0 RealMemory=1000000 AllocMem=0 FreeMem=980000 Sockets=2 Boards=1 State=IDLE "
    "ThreadsPerCore=2 TmpDisk=0 Weight=1 Owner=N/A MCS_label=N/A Partitions=gpu CfgTRES=cpu=128,mem=1000000M,"
    "billing=128,gres/gpu=8 AllocTRES=\n"
    "NodeName=gpu002 Arch=x86_64 CoresPerSocket=32 CPUAlloc=64 CPUEfctv=128 CPUTot=128 CPULoad=30.2 "
    "Gres=gpu:a100:8(S:0-1),gpu:1g.10gb:0 NodeAddr=gpu002 State=MIXED Partitions=gpu\n")


def test_parse_real_sinfo_and_scontrol_output():
    from launchers import partition

    assert partition.parse_gres(SINFO_GRES) == (4, "a100")   # the smallest node decides the tasks per node
    assert partition.parse_gres("gpu:8\n") == (8, None)
    assert partition.parse_gres("gpu:v100:4,mps:400\n") == (4, "v100")
    assert partition.parse_gres("(null)\n") == (0, None)
    assert partition.parse_gres("") is None
    assert partition.parse_cpus("128\n") == 128 and partition.parse_cpus("64+\n") == 64
    assert partition.parse_default_partition("gpu\ncpu*\ndebug\n") == "cpu"
    assert partition.parse_partition_nodes(SCONTROL_PARTITION) == "gpu[001-016]"
    assert partition.parse_scontrol_nodes(SCONTROL_NODES) == ((8, "a100"), 128)
    assert slurm_submit.known_gpu_type("a100") == "A100"
    assert slurm_submit.known_gpu_type("NVIDIA H100 80GB HBM3") == "H100"
