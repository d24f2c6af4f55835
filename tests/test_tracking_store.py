"""One MLflow store per project: two trainings writing at once into the default store (one of them a 2-node job
whose nodes both log system metrics), then a demo, all in the same store; what a run holds is read back with
``mlflow.search_runs`` (tags, dataset input, final metrics, the demo's logged and registered model)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pytest

from pipeline import tracking
from tests.helpers_tracking import runs_of
from tests.helpers_train import tiny_data, tiny_recipe  # noqa: F401 - session fixtures

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]   # the session store: 3 trainings + a demo


def _final(run_dir):
    return json.loads((run_dir / "final_metrics.json").read_text())


def test_default_store_is_one_per_project(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(tracking.RUNS_ROOT_ENV, str(tmp_path / "r"))
    assert tracking.default_uri() == f"sqlite:///{tmp_path}/r/mlflow.db"
    assert tracking.default_uri("http://mlflow:5000") == "http://mlflow:5000"       # tracking.uri wins
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:5000")
    assert tracking.default_uri() == "http://server:5000"
    assert tracking.artifact_root(f"sqlite:///{tmp_path}/r/mlflow.db") == f"{tmp_path}/r/mlartifacts"
    monkeypatch.delenv(tracking.RUNS_ROOT_ENV)
    assert tracking.default_uri(None) == "http://server:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.default_uri() == f"sqlite:///{tracking.ROOT / 'runs' / 'mlflow.db'}"   # the checkout's runs/


def test_concurrent_trainings_and_a_demo_land_in_one_default_store(shared_store):  # noqa: F811
    s = shared_store
    for name, out in s.outputs.items():
        assert "database is locked" not in out and "Traceback" not in out, f"{name}:\n{out[-3000:]}"
    client = mlflow.MlflowClient(s.uri)
    exp = client.get_experiment_by_name("cpvt")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.artifact_location == str(s.runs_root / "mlartifacts" / "cpvt")
    runs = client.search_runs([exp.experiment_id])
    by_dir: dict = {}
    for r in runs:   # newest first; comparison runs have no run_dir
        if "run_dir" in r.data.tags:
            by_dir.setdefault(r.data.tags["run_dir"], r)
    assert set(by_dir) == {str(s.two_node), str(s.single), str(s.demo)}   # the demo added a run, wiped nothing
    for run_dir, run in by_dir.items():
        assert run.info.status == "FINISHED" and run.info.run_id == _final(Path(run_dir))["mlflow_run_id"]
    assert not (s.demo / "mlflow.db").exists() and not (s.two_node / "mlflow.db").exists()
    url = tracking.training_view_url("http://127.0.0.1:5000", exp.experiment_id)
    assert url in s.outputs["demo"] and url.endswith("/runs?workflowType=machine_learning")


def test_search_runs_reads_back_tags_inputs_and_metrics(shared_store):  # noqa: F811
    s = shared_store
    mlflow.set_tracking_uri(s.uri)
    [run] = runs_of(s.two_node, s.uri)
    t = run.data.tags
    commit, _ = tracking.git_state()
    assert (t["model"], t["recipe"], t["precision"], t["zero_stage"], t["world_size"], t["device"]) == (
        "cpvt_ti", "train_tiny_recipe", "fp32", "2", "2", "cpu")
    assert t["git.commit"] == t["mlflow.source.git.commit"] == commit and re.fullmatch(r"[0-9a-f]{40}", commit)
    assert t["git.dirty"] in ("true", "false")   # the checkout's state when the run started
    df = mlflow.search_runs(experiment_names=["cpvt"], filter_string="tags.world_size = '1'")
    assert set(df["tags.run_dir"]) == {str(s.single), str(s.demo)}   # the tags are searchable columns
    inputs = [i for r in runs_of(s.two_node, s.uri) + runs_of(s.single, s.uri) for i in r.inputs.dataset_inputs]
    assert len(inputs) == 2
    info = tracking.dataset_summary(s.data, "wds")
    for i in inputs:
        d = i.dataset
        assert (d.name, d.digest, d.source_type) == (info["name"], info["digest"], "local")
        assert json.loads(d.profile) == {"format": "wds", "splits": {"train": 32, "val": 16}, "num_classes": 4}
        assert json.loads(d.source)["uri"] == info["source"]
        assert {tag.key: tag.value for tag in i.tags}["mlflow.data.context"] == "training"
    m = run.data.metrics
    final = _final(s.two_node)
    for r, v in final["eval"].items():
        assert m[f"eval/top1_{r}px"] == m[f"final/top1_{r}px"] == pytest.approx(v["top1"])
    assert m["final/throughput_img_s"] == pytest.approx(final["throughput_img_s"])
    assert m["final/data_wait_share"] == pytest.approx(final["data_wait_share"])


def test_every_node_logs_system_metrics_into_the_one_run(shared_store):  # noqa: F811
    s = shared_store
    [run] = runs_of(s.two_node, s.uri)
    keys = set(run.data.metrics)
    for node in ("node0", "node1"):
        assert f"system/{node}/cpu_utilization_percentage" in keys, sorted(keys)
        assert f"system/{node}/system_memory_usage_megabytes" in keys
        assert run.data.tags[f"{node}.host"]
    assert not any(k.startswith("system/node2/") for k in keys)
    [single] = runs_of(s.single, s.uri)
    assert "system/cpu_utilization_percentage" in single.data.metrics   # one node: MLflow's plain names


def test_demo_logs_and_registers_the_exported_model(shared_store):  # noqa: F811
    from pipeline.export import load_export

    s = shared_store
    mlflow.set_tracking_uri(s.uri)
    run = runs_of(s.demo, s.uri)[0]
    [out] = run.outputs.model_outputs
    logged = mlflow.get_logged_model(out.model_id)
    assert logged.name == "model" and logged.source_run_id == run.info.run_id and logged.tags["cpvt.model"] == \
        "cpvt_ti"
    versions = mlflow.MlflowClient(s.uri).search_model_versions("name = 'cpvt_ti'")
    assert [v.source for v in versions if v.run_id == run.info.run_id] == [logged.model_uri]
    pyfunc = mlflow.pyfunc.load_model(logged.model_uri)
    torch_model, _ = load_export(s.demo / "export" / "cpvt_demo.safetensors")
    import torch

    x = np.random.default_rng(0).standard_normal((2, 3, 48, 64)).astype(np.float32)   # any multiple of 16
    with torch.no_grad():
        want = torch_model.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(pyfunc.predict(x), want, rtol=1e-5, atol=1e-5)
