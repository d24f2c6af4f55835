"""``python -m pipeline.analysis.compare RUN...`` on the shared store: runs by name or id, one PNG of top-1 vs
test resolution with exactly the runs' logged numbers, logged to a comparison run; an unknown run is one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.helpers_tracking import runs_of
from tests.helpers_train import ROOT, job_env, tiny_data, tiny_recipe  # noqa: F401 - session fixtures

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]   # the session store: 3 trainings + a demo


def test_compare_plots_logged_top1_per_resolution_and_logs_the_figure(shared_store, tmp_path):  # noqa: F811
    from pipeline.analysis.compare import compare

    s = shared_store
    two, single = runs_of(s.two_node, s.uri)[0], runs_of(s.single, s.uri)[0]
    res = compare([two.info.run_name, single.info.run_id], tmp_path / "cmp.png", tracking_uri=s.uri, paper=True)
    assert res["run_ids"] == [two.info.run_id, single.info.run_id]
    for run in (two, single):
        final = json.loads((Path(run.data.tags["run_dir"]) / "final_metrics.json").read_text())
        curve = res["plotted"][run.info.run_name]
        assert curve["resolution"] == sorted(int(r) for r in final["eval"])
        assert curve["top1"] == pytest.approx([final["eval"][str(r)]["top1"] for r in curve["resolution"]])
    assert res["plotted"]["paper CPVT-Ti"]["top1"] == [72.4, 73.2, 71.8, 70.3]
    client = mlflow.MlflowClient(s.uri)
    cmp_run = client.get_run(res["mlflow_run_id"])
    assert cmp_run.data.tags["compare.runs"] == f"{two.info.run_id},{single.info.run_id}"
    assert cmp_run.info.experiment_id == two.info.experiment_id
    assert {a.path for a in client.list_artifacts(cmp_run.info.run_id)} == {"cmp.png", "cmp.json"}
    assert (tmp_path / "cmp.png").stat().st_size > 10_000


def test_unknown_run_is_one_line(shared_store):  # noqa: F811
    env = job_env()
    proc = subprocess.run([sys.executable, "-m", "pipeline.analysis.compare", "no-such-run", "--tracking-uri",
                           shared_store.uri, "--no-log"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"error: run 'no-such-run': no run with this id or name in "
                                                    f"{shared_store.uri}")
