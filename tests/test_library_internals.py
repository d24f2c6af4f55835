"""The private submitit / DeepSpeed / MLflow internals the project relies on, each through its one wrapper
(:mod:`pipeline.submitit_compat`, :mod:`pipeline.deepspeed_compat`, :mod:`pipeline.mlflow_compat`), called on
real input: an upgrade that renames, moves or changes one of them fails here, with the name of what broke,
instead of inside a job."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------- submitit


def test_submitit_version_is_one_the_wrappers_were_checked_against():
    import submitit

    from pipeline.submitit_compat import TESTED_VERSIONS

    assert ".".join(submitit.__version__.split(".")[:2]) in TESTED_VERSIONS, (
        f"submitit {submitit.__version__}: re-check pipeline/submitit_compat.py, then add the version")


def test_parse_node_list_expands_slurm_hostlists(monkeypatch):
    from pipeline.submitit_compat import parse_node_list
    from pipeline import distributed

    assert parse_node_list("n[1-2],gpu03") == ["n1", "n2", "gpu03"]
    assert parse_node_list("a[01-03,7],b5") == ["a01", "a02", "a03", "a7", "b5"]   # as scontrol expands it
    assert parse_node_list("node1") == ["node1"]

    def no_scontrol(*args, **kwargs):
        raise OSError("no scontrol")

    monkeypatch.setattr(distributed.subprocess, "run", no_scontrol)   # expand_hostlist's fallback is the wrapper
    assert distributed.expand_hostlist("n[1-2],gpu03") == ["n1", "n2", "gpu03"]


def test_sbatch_header_renders_the_executor_parameters(tmp_path):
    import submitit

    from pipeline.submitit_compat import sbatch_header

    ex = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    ex.update_parameters(name="cpvt-x", nodes=2, tasks_per_node=4, timeout_min=30, slurm_partition="gpu",
                         slurm_additional_parameters={"requeue": True})
    text = sbatch_header(ex)
    for line in ("#SBATCH --job-name=cpvt-x", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=30", "#SBATCH --requeue"):
        assert line in text.splitlines(), (line, text)
    assert "<submitit task>" in text


def test_load_result_reads_real_result_pickles(tmp_path):
    from launchers.executor import JobFailedError, make_executor, wait_for
    from pipeline.submitit_compat import load_result
    from tests.slurm import fixtures  # noqa: F401 - registers tests.slurm.jobs for pickling by value
    from tests.slurm import jobs

    ex = make_executor(tmp_path, "local", timeout_min=2)
    ok, bad = ex.submit(jobs.double, 21), ex.submit(jobs.fail_with, "broken shard")
    assert wait_for(ok, timeout=120) == 42
    with pytest.raises(JobFailedError, match="broken shard"):
        wait_for(bad, timeout=120)
    assert load_result(ok.paths.result_pickle) == ("success", 42)
    outcome, text = load_result(bad.paths.result_pickle)
    assert outcome == "error" and "ValueError: broken shard" in text


def test_uncompleted_job_error_covers_failed_jobs():
    from submitit.core.utils import FailedJobError

    from pipeline.submitit_compat import UncompletedJobError

    assert issubclass(FailedJobError, UncompletedJobError) and issubclass(UncompletedJobError, Exception)


def test_replace_submission_keeps_the_timeout_settings(tmp_path):
    from submitit.helpers import DelayedSubmission

    from pipeline.submitit_compat import replace_submission, submission_timeout

    path = tmp_path / "submitted.pkl"
    current = DelayedSubmission(sorted, [3, 1, 2])
    current.set_timeout(45, 2)
    current.dump(path)
    replace_submission(path, DelayedSubmission(max, [3, 1, 2]))
    loaded = DelayedSubmission.load(path)
    assert submission_timeout(loaded) == (45, 2)
    assert loaded.result() == 3 and not list(tmp_path.glob("*.tmp*"))   # written atomically, nothing left over


# ----------------------------------------------------------------------------------------------- DeepSpeed


def test_deepspeed_version_is_one_the_wrappers_were_checked_against():
    from importlib.metadata import version

    from pipeline.deepspeed_compat import TESTED_VERSIONS

    v = version("deepspeed")
    assert ".".join(v.split(".")[:2]) in TESTED_VERSIONS, (
        f"deepspeed {v}: re-check pipeline/deepspeed_compat.py, then add the version")


def test_model_states_estimate_follows_zero_partitioning():
    import torch

    from pipeline.deepspeed_compat import model_states_estimate

    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Linear(20, 5))
    n, largest = 10 * 20 + 20 + 20 * 5 + 5, 10 * 20 + 20
    # 16-bit weights (2 bytes) + fp32 grads, master weights and Adam states (18 bytes) partitioned over ranks
    assert model_states_estimate(model, 0, 4) == 20 * n   # stage 0: nothing partitioned
    assert model_states_estimate(model, 2, 2) == 2 * n + 9 * n
    assert model_states_estimate(model, 3, 2) == 4 * largest + 9 * n   # stage 3: the largest layer gathered


def test_fp16_optimizers_expose_loss_scale():
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from pipeline.deepspeed_compat import loss_scale

    for cls in (FP16_Optimizer, DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3):
        assert isinstance(getattr(cls, "loss_scale", None), property), cls

    class Engine:   # what loss_scale reads (fp16 needs CUDA: no real fp16 engine on a CPU-only machine)
        optimizer = type("Opt", (), {"loss_scale": 65536.0})()

    assert loss_scale(Engine()) == 65536.0


ENGINE_SCRIPT = textwrap.dedent("""
    import json
    import torch
    import deepspeed
    from pipeline.deepspeed_compat import inner_optimizer, skipped_steps, zero3_partition

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    out = {}
    for stage in (1, 3):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 8))
        n = sum(p.numel() for p in model.parameters())
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
                  "bf16": {"enabled": True}, "zero_optimization": {"stage": stage, "overlap_comm": False,
                  "stage3_param_persistence_threshold": 0},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        loss = engine(torch.randn(2, 64, dtype=torch.bfloat16)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        inner = inner_optimizer(engine)
        parts = [zero3_partition(p) for p in engine.module.parameters()]
        out[stage] = {"n": n, "inner": type(inner).__name__, "is_torch": isinstance(inner, torch.optim.Optimizer),
                      "states": sum(len(s) for s in inner.state.values()), "skipped": skipped_steps(engine),
                      "partitioned": sum(int(t.numel()) for t in parts if t is not None),
                      "none": sum(t is None for t in parts)}
        engine.destroy()
    print("RESULT " + json.dumps(out), flush=True)
    torch.distributed.destroy_process_group()
""")


@pytest.mark.slow
def test_engine_internals_on_real_engines(tmp_path):
    """One process, gloo, bf16 ZeRO-1 and ZeRO-3 engines on a 2-layer MLP, one step each."""
    from pipeline.net import free_port

    port = free_port()
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    script = tmp_path / "engine_internals.py"
    script.write_text(ENGINE_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    for stage, r in out.items():
        assert r["is_torch"] and r["states"] > 0, (stage, r)   # the torch AdamW, holding the Adam states
        assert r["skipped"] == 0, (stage, r)                   # bf16: nothing skipped
    assert out["1"]["partitioned"] == 0 and out["1"]["none"] == 4          # ZeRO-1 does not partition params
    assert out["3"]["none"] == 0 and out["3"]["partitioned"] >= out["3"]["n"]   # ZeRO-3: every param has one


def test_universal_zero3_load_still_needs_its_repair():
    """The two slips :func:`repair_universal_zero3_load` undoes are still in DeepSpeed's ZeRO-3 universal load:
    once an upgrade fixes them, this fails (re-check the repair, then drop it)."""
    import inspect

    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    source = inspect.getsource(DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3)
    assert '["param_groups"][0].items()' in source             # every group gets group 0's hyper-parameters
    assert "self.optimizer.state[fp32_param]['step'] = state_step" in source   # one step tensor for all


def test_repair_universal_zero3_load_gives_each_group_its_own_state():
    import torch

    from pipeline.deepspeed_compat import repair_universal_zero3_load

    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"params": [a], "weight_decay": 0.05}, {"params": [b], "weight_decay": 0.0}])
    (a.sum() + b.sum()).backward()
    opt.step()
    shared = torch.tensor(3.0)
    for group in opt.param_groups:           # what DeepSpeed's universal load leaves behind
        group["weight_decay"] = 0.05
    for state in opt.state.values():
        state["step"] = shared
    repair_universal_zero3_load(opt, [0.05, 0.0])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    steps = [s["step"] for s in opt.state.values()]
    assert all(s is not shared for s in steps) and steps[0] is not steps[1]
    assert [float(s) for s in steps] == [3.0, 3.0]
    opt.step()                                # each state counts its own steps
    assert [float(s["step"]) for s in opt.state.values()] == [4.0, 4.0]


def test_ds_to_universal_accepts_the_flags_convert_to_universal_passes(monkeypatch):
    from deepspeed.checkpoint import ds_to_universal

    argv = ["ds_to_universal.py", "--input_folder", "in", "--output_folder", "out", "--inject_missing_state",
            "--num_extract_workers", "2", "--num_merge_workers", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    args = ds_to_universal.parse_arguments()
    assert (args.input_folder, args.output_folder, args.inject_missing_state) == ("in", "out", True)
    assert (args.num_extract_workers, args.num_merge_workers) == (2, 2)


# ----------------------------------------------------------------------------------------------- MLflow


def test_mlflow_version_is_one_the_wrappers_were_checked_against():
    import mlflow

    from pipeline.mlflow_compat import TESTED_VERSIONS

    assert ".".join(mlflow.__version__.split(".")[:2]) in TESTED_VERSIONS, (
        f"mlflow {mlflow.__version__}: re-check pipeline/mlflow_compat.py, then add the version")


@pytest.fixture
def mlflow_store(tmp_path):
    from pipeline.mlflow_compat import create_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    create_store(uri, str(tmp_path / "mlartifacts"))
    return uri


def test_create_store_makes_a_store_a_client_can_use(mlflow_store, tmp_path):
    import mlflow

    assert (tmp_path / "mlflow.db").is_file()
    client = mlflow.MlflowClient(mlflow_store)
    exp = client.create_experiment("x", artifact_location=str(tmp_path / "mlartifacts" / "x"))
    assert client.get_experiment(exp).name == "x"


def test_system_metrics_monitor_publishes_a_last_sample_per_node(mlflow_store):
    import mlflow

    from pipeline.mlflow_compat import start_system_metrics, stop_system_metrics

    client = mlflow.MlflowClient(mlflow_store)
    run = client.create_run(client.create_experiment("sysmetrics"))
    monitor = start_system_metrics(run.info.run_id, mlflow_store, "node1", interval_s=3600)
    stop_system_metrics(monitor)   # long before the first interval: the last sample is all there is
    keys = client.get_run(run.info.run_id).data.metrics
    assert keys and all(k.startswith("system/node1/") for k in keys), keys
    assert "system/node1/cpu_utilization_percentage" in keys


def test_shard_dataset_is_logged_with_its_profile(mlflow_store, tmp_path):
    import mlflow

    from pipeline.mlflow_compat import ShardDataset

    profile = {"format": "wds", "splits": {"train": 8}, "num_classes": 2}
    ds = ShardDataset(str(tmp_path), name="data/wds", digest="0123456789", profile=profile)
    assert ds.profile == profile and json.loads(ds.to_dict()["profile"]) == profile
    client = mlflow.MlflowClient(mlflow_store)
    mlflow.set_tracking_uri(mlflow_store)   # conftest's no_leaked_tracking_uri puts the environment back
    with mlflow.start_run(experiment_id=client.create_experiment("datasets")) as run:
        mlflow.log_input(ds, context="training")
    logged = client.get_run(run.info.run_id).inputs.dataset_inputs[0].dataset
    assert (logged.name, logged.digest, json.loads(logged.profile)) == ("data/wds", "0123456789", profile)


def test_forget_active_experiment_undoes_set_experiment(mlflow_store, monkeypatch):
    import mlflow

    from pipeline.mlflow_compat import forget_active_experiment

    mlflow.set_tracking_uri(mlflow_store)   # conftest's no_leaked_tracking_uri puts the environment back
    exp = mlflow.set_experiment("chosen").experiment_id
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)   # set_experiment exports it too
    with mlflow.start_run() as run:
        assert run.info.experiment_id == exp
    forget_active_experiment()
    with mlflow.start_run() as run:
        assert run.info.experiment_id == "0"   # the default experiment again
