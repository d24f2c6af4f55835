"""The suite's MLflow store (conftest points the project store at ``<pytest tmp>/runs/mlflow.db``) and the runs
of one run directory in it (every run carries its ``run_dir`` tag, so a shared store still tells them apart)."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.net import free_port
from tests.helpers_train import PY, ROOT, TORCHRUN, job_env


def suite_store() -> str:
    from pipeline import tracking

    return tracking.prepare_store(tracking.project_uri())   # not default_uri(): MLFLOW_TRACKING_URI may be set


def runs_of(run_dir: str | Path, uri: str | None = None, experiment: str = "cpvt") -> list:
    """The runs of ``run_dir`` (any status) in ``uri`` (default: the suite store), newest first."""
    import mlflow

    client = mlflow.MlflowClient(uri or suite_store())
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"tags.run_dir = '{Path(run_dir).resolve()}'",
                              order_by=["attributes.start_time DESC"])


# ----------------------------------------------------------------------------------------- one shared store
# fp32 stated: run.precision auto picks bf16 on a CPU with AMX / AVX512-BF16, and the tags below are asserted
TINY_RUN = ("run.epochs=1", "tracking.system_metrics=true", "run.precision=fp32")


@dataclass
class SharedStore:
    """Two trainings that ran at the same time with the default store, then a demo, all in one project store."""
    runs_root: Path
    uri: str
    two_node: Path          # run dir of the 2-node (2 x 1 rank) job
    single: Path            # run dir of the 1-rank job
    demo: Path              # run dir of the demo
    data: Path
    outputs: dict[str, str]


def _env(runs_root: Path) -> dict[str, str]:
    env = job_env()
    env["CPVT_RUNS_ROOT"] = str(runs_root)   # the default store: <runs_root>/mlflow.db, as a checkout's runs/
    env["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
    return env


def _train(run_dir: Path, recipe: Path, data: Path, *prefix: str) -> list[str]:
    return [*prefix, "pipeline/train.py", "--recipe", str(recipe), "--data", str(data), "--run-dir", str(run_dir),
            "--deepspeed_config", "deepspeed_configs/zero2.json", *TINY_RUN]


def build_shared_store(base: Path, data: Path, recipe: Path) -> SharedStore:
    runs_root = base / "project_runs"
    env = _env(runs_root)
    port = str(free_port())
    two_node, single, demo = base / "two_node", base / "single", base / "demo"
    procs = {f"node{k}": subprocess.Popen(
        _train(two_node, recipe, data, TORCHRUN, "--nnodes", "2", "--node_rank", str(k), "--nproc_per_node", "1",
               "--master_addr", "127.0.0.1", "--master_port", port), cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for k in (0, 1)}
    procs["single"] = subprocess.Popen(_train(single, recipe, data, PY), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
    outputs = {}
    try:
        for name, p in procs.items():
            outputs[name] = p.communicate(timeout=900)[0]
            if p.returncode != 0:
                pytest.fail(f"{name} failed (rc={p.returncode}):\n{outputs[name][-5000:]}")
    finally:
        for q in procs.values():
            if q.poll() is None:
                q.kill()
                q.wait()
    # the demo on the tiny data (its data prep finds the dataset in place and skips), with the same default store
    demo.mkdir()
    (demo / "src").symlink_to(data.parent / "src")
    (demo / "data").symlink_to(data)
    proc = subprocess.run([sys.executable, "-m", "launchers.demo", "--run-dir", str(demo), "--recipe", str(recipe),
                           "--nproc", "1", "--workers", "1", "run.epochs=1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    outputs["demo"] = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"demo failed (rc={proc.returncode}):\n{outputs['demo'][-5000:]}")
    return SharedStore(runs_root, f"sqlite:///{runs_root / 'mlflow.db'}", two_node, single, demo, data, outputs)


@pytest.fixture(scope="session")
def shared_store(tiny_data, tiny_recipe, tmp_path_factory) -> SharedStore:
    return build_shared_store(tmp_path_factory.mktemp("shared_store"), tiny_data, tiny_recipe)
