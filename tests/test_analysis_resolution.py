"""Resolution analysis over a real (tiny) WebDataset: accuracies, the plotted data, MLflow logging."""
from __future__ import annotations

import json

import mlflow
import pytest
import torch

from helpers_analysis import tiny_cpvt, tiny_wds
from pipeline.analysis.common import log_to_mlflow
from pipeline.analysis.resolution import evaluate_resolutions, format_table, plot_resolution_curves


@pytest.fixture(autouse=True)
def _no_global_mlflow_uri(monkeypatch):
    """mlflow.set_tracking_uri() also exports MLFLOW_TRACKING_URI; keep it from leaking between tests."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def wds_root(tmp_path_factory):
    return tiny_wds(tmp_path_factory.mktemp("res_data"))


def constant_model(cls: int):
    """A real CPVT whose head always predicts class ``cls``: accuracy = that class's share of the val split."""
    model = tiny_cpvt("cpvt_ti")
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.0, 0.0, 0.0]))
        model.head.bias[cls] = 10.0
        model.head.bias[(cls + 1) % 3] = 5.0
    return model


def test_accuracy_per_resolution_counts_every_val_sample(wds_root):
    res = evaluate_resolutions(constant_model(1), wds_root, [32, 48, 64], batch_size=4)
    assert sorted(res) == [32, 48, 64]
    for r in res.values():
        assert r["n"] == 9  # 3 classes x 3 val images, each exactly once
        assert r["top1"] == pytest.approx(100 / 3)
        assert r["top5"] == pytest.approx(100.0)  # 3 classes < 5


def test_resolution_changes_what_the_model_sees(wds_root):
    model = tiny_cpvt("cpvt_ti", seed=3)
    res = evaluate_resolutions(model, wds_root, [32, 64], batch_size=16)
    assert res[32]["loss"] != pytest.approx(res[64]["loss"])


def test_non_multiple_of_patch_rejected(wds_root):
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        evaluate_resolutions(tiny_cpvt(), wds_root, [40])


def test_plot_data_and_table(tmp_path):
    curves = {"cpvt": {384: {"top1": 73.2, "top5": 91.0}, 224: {"top1": 72.4, "top5": 91.2}},
              "deit": {224: {"top1": 72.2, "top5": 91.1}, 384: {"top1": 71.2, "top5": 90.0}}}
    out = tmp_path / "res.png"
    plotted = plot_resolution_curves(curves, out)
    assert out.stat().st_size > 0
    assert plotted == {"cpvt": {"resolution": [224, 384], "top1": [72.4, 73.2], "top5": [91.2, 91.0]},
                       "deit": {"resolution": [224, 384], "top1": [72.2, 71.2], "top5": [91.1, 90.0]}}
    table = format_table(curves)
    assert "| cpvt | 72.4 | 73.2 |" in table and "| CPVT-Ti | 72.4 | 73.2 |" in table


def test_log_to_mlflow_new_and_existing_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    png = tmp_path / "res.png"
    plot_resolution_curves({"a": {224: {"top1": 50.0, "top5": 90.0}}}, png)
    run_id = log_to_mlflow(run_id=None, experiment="analysis", tracking_uri=uri, metrics={"res_top1_224": 50.0},
                           artifacts=[png], run_name="res")
    assert log_to_mlflow(run_id=run_id, experiment=None, tracking_uri=uri, metrics={"res_top1_384": 40.0}) == run_id
    assert log_to_mlflow(run_id=None, experiment=None, tracking_uri=uri) is None
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.data.metrics == {"res_top1_224": 50.0, "res_top1_384": 40.0}
    assert [a.path for a in client.list_artifacts(run_id)] == ["res.png"]
    assert json.loads(json.dumps(run.data.metrics))  # plain numbers
