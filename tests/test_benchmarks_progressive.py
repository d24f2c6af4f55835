"""bench_progressive helpers: the schedule it trains with, and per-resolution step times read back from MLflow."""
from __future__ import annotations

import mlflow
import pytest

from benchmarks.bench_progressive import progressive_steps, step_times
from pipeline.config import from_dict
from pipeline.schedules import ResolutionSchedule, ResolutionScheduleConfig


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
    assert [sched.at(e)[0] for e in range(4)] == [64, 96, 128, 128]
    with pytest.raises(ValueError, match="epochs"):
        progressive_steps([64, 96, 128], epochs=2)


def test_step_times_grouped_by_resolution(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment("bench")
    with mlflow.start_run() as run:
        for step, (res, comp, wait) in enumerate([(64, 100, 10), (64, 120, 0), (128, 400, 20)], start=1):
            mlflow.log_metrics({"train/resolution": res, "time/compute_ms": comp, "time/data_wait_ms": wait}, step=step)
    assert step_times(tmp_path, run.info.run_id) == {64: [0.11, 0.12], 128: [0.42]}
