"""bench_progressive: the schedules it trains with, the prediction from per-resolution epoch times, epoch times
read back from MLflow, and a quick run whose result is internally consistent (no wall-clock thresholds)."""
from __future__ import annotations

import json
import math

import mlflow
import pytest
import torch

from benchmarks import bench_progressive
from benchmarks.bench_progressive import (epoch_resolutions, epoch_train_times, predicted_ratio, progressive_steps,
                                          run_order)
from pipeline.config import ResolutionScheduleConfig, from_dict
from pipeline.schedules import ResolutionSchedule


@pytest.fixture(autouse=True)
def _no_global_mlflow_uri(monkeypatch):
    """mlflow.set_tracking_uri() also exports MLFLOW_TRACKING_URI; keep it from leaking between tests."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow.set_tracking_uri(None)


def test_progressive_schedule_ends_at_the_fixed_resolution():
    steps = progressive_steps([64, 96, 128], epochs=4)
    assert steps == [[0, 64], [1, 96], [2, 128]]
    sched = ResolutionSchedule(from_dict(ResolutionScheduleConfig, {"kind": "steps", "steps": steps}), 4)
    assert [sched.at(e)[0] for e in range(4)] == epoch_resolutions([64, 96, 128], 4) == [64, 96, 128, 128]
    with pytest.raises(ValueError, match="epochs"):
        progressive_steps([64, 96, 128], epochs=2)


def test_predicted_ratio_sums_the_schedule_epochs():
    epoch_s = {64: 1.0, 96: 2.0, 128: 4.0}
    assert predicted_ratio(epoch_s, [64, 96, 128], 4) == pytest.approx((1 + 2 + 4 + 4) / (4 * 4))
    assert predicted_ratio({128: 3.0}, [128], 2) == pytest.approx(1.0)


def test_runs_alternate():
    assert run_order(1) == ["fixed", "progressive"]
    assert run_order(2) == ["fixed", "progressive", "progressive", "fixed"]
    assert run_order(3).count("fixed") == run_order(3).count("progressive") == 3


def test_epoch_train_times_from_mlflow(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment("bench")
    with mlflow.start_run() as run:   # logged once per epoch of 4 steps: per-step means over the epoch
        for step, (res, comp, wait) in zip((4, 8, 12), [(64, 100, 10), (96, 200, 0), (128, 400, 20)]):
            mlflow.log_metrics({"train/resolution": res, "time/compute_ms": comp, "time/data_wait_ms": wait}, step=step)
    got = epoch_train_times(tmp_path, run.info.run_id, steps_per_epoch=4)
    assert [r for r, _ in got] == [64, 96, 128]
    assert [s for _, s in got] == pytest.approx([0.44, 0.8, 1.68])


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_progressive")
    threads = torch.get_num_threads()
    payload = bench_progressive.main(["--quick", "--results-dir", str(out)])
    assert torch.get_num_threads() == threads   # the benchmark's --threads does not leak into the caller
    return payload, json.loads((out / "bench_progressive_quick.json").read_text())


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def test_quick_per_resolution_is_consistent(quick):
    payload, doc = quick
    assert doc["benchmark"] == "bench_progressive_quick" and doc["summary"] == payload["summary"]
    res, final, spe = doc["resolutions"], doc["resolutions"][-1], doc["steps_per_epoch"]
    rows = {row["resolution"]: row for row in doc["per_resolution"]}
    assert list(rows) == res and spe >= 1
    for r, row in rows.items():
        assert all(_positive(row[k]) for k in ("step_s", "epoch_s", "epoch_vs_final", "epoch_s_in_runs"))
        assert row["epoch_s"] == pytest.approx(row["step_s"] * spe)
        assert row["epoch_vs_final"] == pytest.approx(row["epoch_s"] / rows[final]["epoch_s"])
        assert row["pixels_vs_final"] == pytest.approx((r / final) ** 2)
        assert len(doc["samples_s"][str(r)]) == doc["rounds"]
        # the reported ordering matches the reported times, and the summary says the same
        assert (row["epoch_vs_final"] < 1) == (row["epoch_s"] < rows[final]["epoch_s"])
        assert doc["summary"][f"epoch time {r}px / {final}px"].startswith(f"{row['epoch_vs_final']:.3f} ")
    assert rows[final]["epoch_vs_final"] == 1.0
    epoch_s = {r: row["epoch_s"] for r, row in rows.items()}
    assert doc["ratios"]["predicted"] == pytest.approx(predicted_ratio(epoch_s, res, doc["epochs"]))


def test_quick_runs_are_consistent(quick):
    _, doc = quick
    res, final, epochs = doc["resolutions"], doc["resolutions"][-1], doc["epochs"]
    assert doc["schedule"] == progressive_steps(res, epochs)
    assert doc["schedule_epochs"] == epoch_resolutions(res, epochs)
    assert [r["kind"] for r in doc["runs"]] == doc["order"] == run_order(1)
    for run in doc["runs"]:
        assert run["steps"] == epochs * doc["steps_per_epoch"]           # same optimizer steps in every run
        assert run["epoch_resolutions"] == ([final] * epochs if run["kind"] == "fixed" else doc["schedule_epochs"])
        assert len(run["epoch_train_s"]) == epochs and all(_positive(s) for s in run["epoch_train_s"])
        assert run["train_s"] == pytest.approx(sum(run["epoch_train_s"]))
        assert run["train_s"] <= run["wall_time_s"]
        assert 0 <= run["top1"] <= 100
    kinds = doc["kinds"]
    assert kinds["fixed"]["steps"] == kinds["progressive"]["steps"]
    assert doc["ratios"]["train_steps"] == pytest.approx(kinds["progressive"]["train_s"] / kinds["fixed"]["train_s"])
    assert doc["ratios"]["wall_time"] == pytest.approx(kinds["progressive"]["wall_time_s"]
                                                       / kinds["fixed"]["wall_time_s"])
    assert all(_positive(v) for v in doc["ratios"].values())
    assert doc["summary"]["progressive / fixed train-step time"] == (
        f"{doc['ratios']['train_steps']:.3f} (predicted {doc['ratios']['predicted']:.3f})")
